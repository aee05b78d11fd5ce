"""The server of a manager: the process that holds the shared objects.

Theory of operation
-------------------
The server owns a table of *referents* (the shared objects), each under an
ident ``'<server tag>:<n>'``.  A referent lives while references to it exist;
references belong to *sessions* (one per client process, see
:mod:`manyproc._manager_client`) or to the server itself (a proxy stored inside
another shared object, e.g. a managed list in a managed dict)::

    accept thread ──> one thread per connection ──> handshake (TLS, HMAC both ways)
                                                ──> loop: frame -> Request -> op handler
                                                          -> Reply -> frame

    referents  ident -> _Referent(obj, exposed, method_to_typeid, refs)
    sessions   id    -> _Session(refs: Counter[ident], open connections)

A session's references are dropped when its last connection closes (the client
exited, crashed or was killed); a referent is destroyed when its reference count
reaches zero.  Objects are destroyed *outside* the table lock, because destroying
one may release others (the proxies it contained), which needs the lock again;
releases that happen while the lock is held wait in a queue and are applied by
the lock's holder before it lets go.

Every request goes through :meth:`Server._dispatch`, which looks ``op`` up in the
table :attr:`Server.ops`; subclasses add operations by extending that table.
"""

from __future__ import annotations

import collections
import itertools
import os
import ssl
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar

from . import _manager_client as client_side
from . import _manager_wire as wire
from . import process, util

__all__ = ["Server", "RequestError"]

#: The server's own references (proxies stored inside shared objects).
INTERNAL = "<server>"

_VIEW_TYPES: tuple[type, ...] = (type({}.keys()), type({}.values()), type({}.items()))


class RequestError(Exception):
    """A request the server refuses; the client gets a RemoteError with this message."""


def public_methods(obj: Any) -> list[str]:
    """Names of the callable attributes of ``obj`` that do not start with '_'."""
    names = []
    for name in dir(obj):
        if name.startswith("_"):
            continue
        try:
            attr = getattr(obj, name)
        except Exception:
            continue
        if callable(attr):
            names.append(name)
    return names


def _lock_is_held(obj: Any) -> bool:
    """``locked()`` for lock-like referents that lack it (RLock, Semaphore before 3.14)."""
    owned = getattr(obj, "_is_owned", None)
    if owned is not None and owned():
        return True
    if obj.acquire(False):
        obj.release()
        return False
    return True


#: Methods every referent answers, exposed or not (name -> function of the referent).
ALWAYS_AVAILABLE: dict[str, Callable[[Any], Any]] = {
    "#GETVALUE": lambda obj: obj,
    "__repr__": repr,
    "__str__": str,
}

#: Stand-ins for exposed methods a referent lacks.
FALLBACKS: dict[str, Callable[[Any], Any]] = {"locked": _lock_is_held}


class _Referent:
    __slots__ = ("obj", "typeid", "exposed", "method_to_typeid", "refs")

    def __init__(self, obj: Any, typeid: str, exposed: frozenset[str],
                 method_to_typeid: Mapping[str, str] | None) -> None:
        self.obj = obj
        self.typeid = typeid
        self.exposed = exposed
        self.method_to_typeid = method_to_typeid
        self.refs = 0


class _Session:
    __slots__ = ("id", "name", "refs", "connections")

    def __init__(self, session_id: str, name: str) -> None:
        self.id = session_id
        self.name = name
        self.refs: collections.Counter[str] = collections.Counter()
        self.connections = 0


class _Link:
    """The server's side of one connection."""

    __slots__ = ("channel", "session", "name", "call", "busy", "guard")

    def __init__(self, channel: wire.Channel) -> None:
        self.channel = channel
        self.session: _Session | None = None
        self.name = ""
        self.call: tuple[Any, str] | None = None  # (method, typeid) being answered
        self.busy = False  # between reading a request and sending its reply
        self.guard = threading.Lock()


class Server:
    """Serve the shared objects of a manager to authenticated clients.

    Args:
        registry: typeid -> (callable, exposed, method_to_typeid, proxytype).
        address: where to listen (``None``: a fresh Unix socket or TCP port).
        authkey: the key every client must prove it holds.
        serializer: ``'pickle'`` or ``'xmlrpclib'``.
        ssl_context: a server-side ``ssl.SSLContext`` to encrypt connections.
        max_message_size: largest request accepted, in bytes (``None``: no limit).
        handshake_timeout: seconds allowed for each handshake step of a connection.
    """

    #: op -> handler method name.  The argument list of each op is in manyproc._manager_wire.
    ops: ClassVar[dict[str, str]] = {
        "hello": "_op_hello",
        "create": "_op_create",
        "call": "_op_call",
        "incref": "_op_incref",
        "adopt": "_op_adopt",
        "release": "_op_release",
        "methods": "_op_methods",
        "count": "_op_count",
        "describe": "_op_describe",
        "ping": "_op_ping",
        "shutdown": "_op_shutdown",
    }
    #: ops that get no reply
    one_way: ClassVar[frozenset[str]] = frozenset({"release"})

    def __init__(self, registry: Mapping[str, tuple[Any, ...]], address: Any, authkey: bytes,
                 serializer: str, *, ssl_context: ssl.SSLContext | None = None,
                 max_message_size: int | None = wire.DEFAULT_MAX_MESSAGE_SIZE,
                 handshake_timeout: float = wire.HANDSHAKE_TIMEOUT) -> None:
        if not isinstance(authkey, bytes):
            raise TypeError(f"authkey {authkey!r:.40} is of type {type(authkey).__name__}, not "
                            "bytes; encode a text key, e.g. key.encode()")
        if ssl_context is not None and ssl_context.protocol == ssl.PROTOCOL_TLS_CLIENT:
            raise ValueError("the server needs a server-side ssl context: "
                             "ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER) with load_cert_chain(...), "
                             "not a PROTOCOL_TLS_CLIENT one")
        self.registry = dict(registry)
        self.authkey = process.AuthenticationString(authkey)
        self.serializer = serializer
        self.codec = wire.get_codec(serializer)
        self.ssl_context = ssl_context
        self.max_message_size = max_message_size
        self.handshake_timeout = handshake_timeout
        self.listener = wire.ServerSocket(address, backlog=16)
        self.address = self.listener.address
        self.tag = os.urandom(4).hex()
        self._idents = itertools.count(1)
        self._referents: dict[str, _Referent] = {}
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()
        self._deferred: collections.deque[str] = collections.deque()
        self._links: set[_Link] = set()
        self._handshake_slots = threading.BoundedSemaphore(wire.MAX_PENDING_HANDSHAKES)
        self._stop = threading.Event()
        self._stop_requested = False
        util.register_after_fork(self, Server._close_in_child)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {wire.format_address(self.address)} tag={self.tag}>"

    # ----------------------------------------------------------------- serving

    def serve_forever(self) -> None:
        """Serve until a client asks the server to shut down (or Ctrl-C); then return."""
        process.current_process()._manager_server = self  # type: ignore[attr-defined]
        accepter = threading.Thread(target=self._accept_loop, daemon=True,
                                    name=f"manager-accept-{self.tag}")
        try:
            accepter.start()
            util.info("manager serving at %r", self.address)
            self._stop.wait()
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()
            if accepter.ident is not None:
                accepter.join(5)

    def stop(self) -> None:
        """Stop serving: no new connections; idle ones are closed, busy ones after their reply.

        A request being answered still gets its reply; a call that never returns (a
        ``get()`` on an empty queue) keeps its connection until the process exits.
        """
        self._stop.set()
        self.listener.close()
        for link in list(self._links):
            with link.guard:
                if not link.busy:
                    link.channel.shutdown()  # its thread sees end of file

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock = self.listener.accept()
            except OSError:
                if self._stop.is_set() or self.listener.closed:
                    return
                self._stop.wait(0.05)  # e.g. out of file descriptors: do not spin
                continue
            if not self._handshake_slots.acquire(blocking=False):
                util.info("manager: too many connections in the handshake, closing one")
                sock.close()
                continue
            threading.Thread(target=self._serve_connection, args=(sock,), daemon=True,
                             name=f"manager-conn-{self.tag}").start()

    def _serve_connection(self, sock: Any) -> None:
        try:
            channel = wire.secure_accepted(sock, self.authkey, ssl_context=self.ssl_context,
                                           timeout=self.handshake_timeout)
        except Exception as exc:
            util.info("manager: refused a connection: %s", exc)
            wire.call_quietly(sock.close)
            return
        finally:
            self._handshake_slots.release()
        link = _Link(channel)
        self._links.add(link)
        try:
            if not self._stop.is_set():
                self._serve_link(link)
        finally:
            self._links.discard(link)
            channel.close()
            self._leave(link)

    def _serve_link(self, link: _Link) -> None:
        while not self._stop.is_set():
            try:
                data = link.channel.recv(self.max_message_size)
            except wire.MessageTooLarge as exc:
                self._send(link, wire.Reply(-1, "error", (
                    f"the manager at {wire.format_address(self.address)} refused a "
                    f"{exc.size}-byte message: it accepts at most max_message_size={exc.limit} "
                    "bytes. Send smaller objects, or give the manager a larger "
                    "max_message_size= (None for no limit). The connection was closed", "",
                    None)))
                return
            except (EOFError, OSError):
                return
            with link.guard:
                link.busy = True
            try:
                reply = self._dispatch(link, data)
                sent = reply is None or self._send(link, reply)
            finally:
                with link.guard:
                    link.busy = False
            # Drop the request and reply now: a connection may stay idle for long, and an
            # exception's frames would keep shared objects alive meanwhile.
            del data, reply
            if not sent:
                return
            if self._stop_requested:
                self._stop.set()
                return
            if link.session is None:
                return  # the first request was not a valid hello

    def _send(self, link: _Link, reply: wire.Reply) -> bool:
        """Encode and send ``reply``; return False if the connection failed."""
        payload = self._encode(link, reply)
        try:
            link.channel.send(payload)
        except OSError:
            return False
        return True

    def _encode(self, link: _Link, reply: wire.Reply) -> bytes:
        """Encode ``reply``; fall back to a text error when its value cannot be sent."""
        refs: list[str] = []
        try:
            with client_side.context("replying", (self, refs)):
                payload = self.codec.dumps(reply.to_wire())
        except Exception as exc:
            refs.clear()
            if reply.status == "raised" and reply.value[0] is not None:
                return self._encode(link, wire.Reply(reply.seq, "raised",
                                                     (None, *reply.value[1:])))
            what = "the reply"
            if link.call:
                what = f"the result of {link.call[0]}() of the shared {link.call[1]!r} object"
            detail = wire.explain_unpicklable(reply.value, exc, what) \
                if self.codec.carries_objects else f"{type(exc).__name__}: {exc}"
            fallback = wire.Reply(reply.seq, "error", (
                f"the manager could not send back {what}: {detail}", "", None))
            return self.codec.dumps(fallback.to_wire())
        if refs and link.session is not None:
            self._add_refs(link.session, refs)
        return payload

    # ----------------------------------------------------------------- dispatch

    def _dispatch(self, link: _Link, data: Any) -> wire.Reply | None:
        """Decode one request, run its op and return the reply (None for one-way ops)."""
        try:
            with client_side.context("request_server", self):
                request = wire.Request.from_wire(self.codec.loads(data))
        except Exception as exc:
            return wire.Reply(-1, "error", (
                f"the manager could not decode a request ({type(exc).__name__}: {exc}); the "
                "client and the server must use the same serializer", "", None))
        if link.session is None and request.op != "hello":
            return wire.Reply(request.seq, "error", (
                f"the first request on a connection must be 'hello', not {request.op!r}",
                "", None))
        name = self.ops.get(request.op)
        if name is None:
            return wire.Reply(request.seq, "error", (
                f"this manager's server does not support the request {request.op!r}",
                "", None))
        handler = getattr(self, name)
        link.call = None
        try:
            status, value = handler(link, *request.args)
        except RequestError as exc:
            reply = wire.Reply(request.seq, "error", (str(exc), "", self._portable(
                _without_frames(exc.__cause__))))
        except Exception as exc:
            text = wire.format_exception_text(exc)
            reply = wire.Reply(request.seq, "error", (
                f"{request.op} failed in the manager: {type(exc).__name__}: {exc}", text,
                self._portable(_without_frames(exc))))
        else:
            reply = wire.Reply(request.seq, status, value)
        if request.op in self.one_way:
            if reply.status == "error":
                util.info("manager: %s failed: %s", request.op, reply.value[0])
            return None
        return reply

    def _portable(self, exc: BaseException | None) -> BaseException | None:
        return exc if self.codec.carries_objects else None

    # ----------------------------------------------------------------- ops

    def _op_hello(self, link: _Link, session_id: Any, name: Any) -> tuple[str, Any]:
        with self._table() as doomed:
            if session_id is None:
                session = _Session(os.urandom(8).hex(), str(name))
                self._sessions[session.id] = session
            else:
                found = self._sessions.get(session_id) if isinstance(session_id, str) else None
                if found is None:
                    raise RequestError(f"unknown session {session_id!r}: it ended when its "
                                       "process's connections closed")
                session = found
            if link.session is not None:
                self._leave_locked(link, doomed)
            session.connections += 1
            link.session = session
            link.name = str(name)
        return "ok", (session.id, self.tag)

    def _op_create(self, link: _Link, typeid: Any, args: Any = (),
                   kwds: Any = None) -> tuple[str, Any]:
        entry = self.registry.get(typeid) if isinstance(typeid, str) else None
        if entry is None:
            known = ", ".join(sorted(self.registry)) or "none"
            raise RequestError(
                f"no shared type {typeid!r} is registered with this manager (registered: "
                f"{known}); call register({typeid!r}, callable) on the manager class before "
                "start(), in the program that runs the server")
        make, _exposed, _m2t, _proxytype = entry
        args = tuple(args or ())
        kwds = dict(kwds or {})
        if make is None:
            if kwds or len(args) != 1:
                raise RequestError(
                    f"{typeid!r} was registered without a callable, so creating it takes "
                    f"exactly one positional argument (the object to share), not "
                    f"{len(args)} positional and {len(kwds)} keyword arguments")
            obj = args[0]
        else:
            try:
                obj = make(*args, **kwds)
            except BaseException as exc:
                raise RequestError(
                    f"creating a shared {typeid!r} failed: {type(exc).__name__}: {exc}\n\n"
                    f"{wire.format_exception_text(exc, 1)}") from exc
        assert link.session is not None
        ident, exposed = self._add_referent(link.session, typeid, obj)
        return "ok", (ident, exposed)

    def _op_call(self, link: _Link, ident: Any, method: Any, args: Any = (),
                 kwds: Any = None) -> tuple[str, Any]:
        referent = self._referent(ident)
        obj = referent.obj
        link.call = (method, referent.typeid)
        if method in referent.exposed:
            try:
                function = getattr(obj, method)
            except AttributeError as exc:
                fallback = FALLBACKS.get(method)
                if fallback is None:
                    raise RequestError(
                        f"shared {referent.typeid!r} object ({type(obj).__name__}) has no "
                        f"method {method!r}, although it is listed in exposed") from exc

                def function(*a: Any, **k: Any) -> Any:
                    return fallback(obj, *a, **k)
        elif method in ALWAYS_AVAILABLE:
            return "ok", ALWAYS_AVAILABLE[method](obj)
        else:
            exposed = ", ".join(sorted(referent.exposed)) or "none"
            raise RequestError(
                f"method {method!r} of shared {referent.typeid!r} object "
                f"({type(obj).__name__}) is not exposed (exposed: {exposed}); list it in "
                f"exposed= when registering {referent.typeid!r}, or in the proxy type's "
                "_exposed_")
        try:
            result = function(*tuple(args or ()), **dict(kwds or {}))
        except BaseException as exc:  # even SystemExit: the caller's business, not ours
            text = wire.format_exception_text(exc, 1)
            _without_frames(exc)
            return "raised", (self._portable(exc), type(exc).__qualname__, str(exc), text)
        new_typeid = referent.method_to_typeid and referent.method_to_typeid.get(method)
        if new_typeid:
            assert link.session is not None
            new_ident, exposed_names = self._add_referent(link.session, new_typeid, result)
            proxytype = self.registry[new_typeid][3]
            name = None
            if proxytype is not None:
                name = f"{proxytype.__module__}:{proxytype.__qualname__}"
            return "proxy", (new_typeid, new_ident, exposed_names, name)
        if type(result) in _VIEW_TYPES:
            result = list(result)
        return "ok", result

    def _op_incref(self, link: _Link, idents: Any) -> tuple[str, Any]:
        assert link.session is not None
        missing = self._add_refs(link.session, list(idents))
        return "ok", missing

    def _op_adopt(self, link: _Link, from_session: Any, idents: Any) -> tuple[str, Any]:
        """Move one reference per ident from ``from_session`` to this one (a child taking
        over what its parent reserved for it while starting it); incref what was not there."""
        session = link.session
        assert session is not None
        missing = []
        with self._table():
            source = self._sessions.get(from_session) if isinstance(from_session, str) else None
            for ident in idents:
                referent = self._referents.get(ident) if isinstance(ident, str) else None
                if referent is None:
                    missing.append(ident)
                    continue
                held = source.refs.get(ident, 0) if source is not None else 0
                if held > 0:
                    assert source is not None
                    if held == 1:
                        del source.refs[ident]
                    else:
                        source.refs[ident] = held - 1
                else:
                    referent.refs += 1
                session.refs[ident] += 1
        return "ok", missing

    def _op_release(self, link: _Link, idents: Any) -> tuple[str, Any]:
        assert link.session is not None
        with self._table() as doomed:
            for ident in idents:
                self._unref(link.session, ident, doomed)
        return "ok", None

    def _op_methods(self, link: _Link, ident: Any) -> tuple[str, Any]:
        if hasattr(ident, "id"):  # the standard library sends a Token
            ident = ident.id
        return "ok", tuple(sorted(self._referent(ident).exposed))

    def _op_count(self, link: _Link) -> tuple[str, Any]:
        return "ok", self.number_of_objects()

    def _op_describe(self, link: _Link) -> tuple[str, Any]:
        return "ok", self.debug_info()

    def _op_ping(self, link: _Link) -> tuple[str, Any]:
        return "ok", None

    def _op_shutdown(self, link: _Link) -> tuple[str, Any]:
        util.debug("manager received shutdown request")
        self.prepare_shutdown()
        self._stop_requested = True  # _serve_link stops the server once the reply is out
        return "ok", None

    def prepare_shutdown(self) -> None:
        """Hook for subclasses: release outside resources before the server stops."""

    # ----------------------------------------------------------------- the table

    @contextmanager
    def _table(self) -> Iterator[list[Any]]:
        """Hold the table lock; objects put in the yielded list are destroyed after it."""
        doomed: list[Any] = []
        with self._lock:
            yield doomed
            self._apply_deferred(doomed)
        doomed.clear()
        self._drain_deferred()

    def _referent(self, ident: Any) -> _Referent:
        referent = self._referents.get(ident) if isinstance(ident, str) else None
        if referent is None:
            raise RequestError(
                f"no shared object {ident!r} in the manager at "
                f"{wire.format_address(self.address)}: it was released when its last proxy "
                "went away, or the manager was restarted")
        return referent

    def _add_referent(self, session: _Session, typeid: str,
                      obj: Any) -> tuple[str, tuple[str, ...]]:
        _make, exposed, method_to_typeid, _proxytype = self.registry[typeid]
        names = list(public_methods(obj) if exposed is None else exposed)
        if method_to_typeid:
            names.extend(name for name in method_to_typeid if name not in names)
        ident = f"{self.tag}:{next(self._idents):x}"
        referent = _Referent(obj, typeid, frozenset(names),
                             dict(method_to_typeid) if method_to_typeid else None)
        with self._table():
            self._referents[ident] = referent
            referent.refs += 1
            session.refs[ident] += 1
        util.debug("manager created %r object %s", typeid, ident)
        return ident, tuple(names)

    def _add_refs(self, session: _Session, idents: list[Any]) -> list[Any]:
        missing = []
        with self._table():
            for ident in idents:
                referent = self._referents.get(ident) if isinstance(ident, str) else None
                if referent is None:
                    missing.append(ident)
                    continue
                referent.refs += 1
                session.refs[ident] += 1
        return missing

    def _unref(self, session: _Session, ident: Any, doomed: list[Any], count: int = 1) -> None:
        """Drop ``count`` of ``session``'s references to ``ident`` (lock held)."""
        held = session.refs.get(ident, 0)
        count = min(count, held)
        if count <= 0:
            return  # never let a session release what it does not hold
        if held == count:
            del session.refs[ident]
        else:
            session.refs[ident] = held - count
        referent = self._referents.get(ident)
        if referent is None:
            return
        referent.refs -= count
        if referent.refs <= 0:
            del self._referents[ident]
            doomed.append(referent)
            util.debug("manager disposed of %s", ident)

    def _leave(self, link: _Link) -> None:
        with self._table() as doomed:
            self._leave_locked(link, doomed)

    def _leave_locked(self, link: _Link, doomed: list[Any]) -> None:
        session, link.session = link.session, None
        if session is None:
            return
        session.connections -= 1
        if session.connections <= 0 and session.id in self._sessions:
            del self._sessions[session.id]
            for ident, count in list(session.refs.items()):
                self._unref(session, ident, doomed, count)

    # server-owned references, taken by proxies unpickled inside this process

    def hold_internal(self, ident: str) -> bool:
        """Take a reference for a proxy living in the server; False if ``ident`` is gone."""
        session = self._internal_session()
        return not self._add_refs(session, [ident])

    def release_internal(self, ident: str) -> None:
        """Give back a reference taken by :meth:`hold_internal` (safe from finalizers)."""
        self._deferred.append(ident)
        self._drain_deferred()

    def _internal_session(self) -> _Session:
        session = self._sessions.get(INTERNAL)
        if session is None:
            with self._table():
                session = self._sessions.setdefault(INTERNAL, _Session(INTERNAL, INTERNAL))
                session.connections = 1  # never ends
        return session

    def _apply_deferred(self, doomed: list[Any]) -> None:
        session = self._sessions.get(INTERNAL)
        while self._deferred:
            ident = self._deferred.popleft()
            if session is not None:
                self._unref(session, ident, doomed)

    def _drain_deferred(self) -> None:
        # Whoever holds the lock applies the queue before letting go: a failed try is no loss.
        while self._deferred:
            if not self._lock.acquire(blocking=False):
                return
            doomed: list[Any] = []
            try:
                self._apply_deferred(doomed)
            finally:
                self._lock.release()
            doomed.clear()

    # ----------------------------------------------------------------- introspection

    def number_of_objects(self) -> int:
        """How many shared objects the server holds."""
        return len(self._referents)

    def debug_info(self) -> str:
        """One entry per shared object: ident, reference count and a short repr."""
        with self._lock:
            items = sorted(self._referents.items())
        lines = []
        for ident, referent in items:
            try:
                shown = str(referent.obj)[:75]
            except Exception:
                shown = f"<{type(referent.obj).__name__} object>"
            lines.append(f"  {ident}:       refcount={referent.refs}\n    {shown}")
        return "\n".join(lines)

    # ----------------------------------------------------------------- fork

    def _close_in_child(self) -> None:
        # A process forked by the server (a Pool's worker) must not keep its sockets open,
        # or clients would not see end of file when the server dies.
        wire.call_quietly(self.listener._socket.close)
        for link in list(self._links):
            wire.call_quietly(link.channel.close)
        self._links.clear()


def _without_frames(exc: BaseException | None) -> BaseException | None:
    """Detach ``exc``'s traceback (its frames would keep shared objects alive)."""
    if exc is not None:
        exc.__traceback__ = None
        exc.__context__ = None
    return exc
