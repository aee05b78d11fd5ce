"""This process's side of the conversation with managers' servers.

There is one :class:`ManagerClient` per manager (address and serializer) per process::

    ManagerClient
      session link   one per process: hello, create, incref, release, count ...
                     (short requests, taken in turn under a lock)
      call links     one per thread: method calls on shared objects, which may block
                     (a queue's get) without holding up the other threads

The references this process holds belong to the session; the server drops them
when the session's last connection closes, so a process killed with SIGKILL
leaves nothing behind.  Releasing a reference sends a one-way ``release``
message and never blocks, so it is safe from finalizers; when the session is busy
the release waits in a queue and goes out with the next request.

After a fork the child starts with no clients (its parent's sockets are never
used); the proxies it inherited take a reference of their own through a new
session (see :mod:`manyproc._proxies`).
"""

from __future__ import annotations

import collections
import itertools
import os
import ssl
import threading
from collections.abc import Callable
from typing import Any

from . import _manager_wire as wire
from . import process, util

__all__ = ["ManagerClient", "client_for", "existing_client", "forget_clients",
           "register_ssl_context", "tag_of", "codec_context"]


def tag_of(ident: Any) -> str:
    """The tag of the server that made object ``ident`` (idents look like ``'3fa2c01d:1b'``)."""
    if isinstance(ident, str):
        return ident.partition(":")[0]
    return ""


# --------------------------------------------------------------------------- codec context


class _CodecContext(threading.local):
    """What the message being (de)serialized in this thread is for; read by proxies' pickling.

    Attributes:
        sending_to: tag of the server a request is being encoded for (its proxies
            travel without their authkey: the server knows it).
        received_from: ``(tag, address, client)`` of the server whose reply is being
            decoded (its proxies take that address, and may adopt a reference).
        request_server: the server decoding a request (its own proxies in there
            become server-owned).
        replying: ``(server, refs)`` while a server encodes a reply; ``refs``
            collects the idents of its proxies inside (given to the receiving session).
    """

    sending_to: str | None = None
    received_from: tuple[str, Any, ManagerClient] | None = None
    request_server: Any = None
    replying: tuple[Any, list[str]] | None = None


codec_context = _CodecContext()


class context:  # noqa: N801 - used like a function: ``with context("name", value):``
    """Set one attribute of :data:`codec_context` for the duration of a ``with`` block."""

    __slots__ = ("name", "value", "saved")

    def __init__(self, name: str, value: Any) -> None:
        self.name = name
        self.value = value

    def __enter__(self) -> None:
        self.saved = getattr(codec_context, self.name)
        setattr(codec_context, self.name, self.value)

    def __exit__(self, *exc_info: Any) -> None:
        setattr(codec_context, self.name, self.saved)


# --------------------------------------------------------------------------- TLS contexts

# address -> client-side ssl context, or a function that builds one (which, unlike a
# context, also travels to spawned children)
_ssl_contexts: dict[Any, Any] = {}
_built_contexts: dict[Any, ssl.SSLContext] = {}


def register_ssl_context(address: Any, context: Any) -> None:
    """Use ``context`` (an SSLContext, or a function returning one) to reach ``address``."""
    address = wire.normalize_address(address)
    _ssl_contexts[address] = context
    _built_contexts.pop(address, None)


def expect_tls(address: Any) -> None:
    """A proxy of a TLS manager arrived: make sure this process knows how to reach it."""
    address = wire.normalize_address(address)
    if address not in _ssl_contexts:
        _ssl_contexts[address] = _NoContext(address)


def uses_tls(address: Any) -> bool:
    return wire.normalize_address(address) in _ssl_contexts


class _NoContext:
    def __init__(self, address: Any) -> None:
        self.address = address

    def __call__(self) -> ssl.SSLContext:
        raise wire.ManagerConnectionError(
            f"the manager at {wire.format_address(self.address)} uses TLS, but this process "
            "has no ssl context for it: create a manager for that address with "
            "ssl_context= (a client context) in this process first, or give the manager a "
            "function that builds the context, which travels to spawned children")


def _ssl_context_for(address: Any) -> ssl.SSLContext | None:
    context = _built_contexts.get(address)
    if context is None:
        context = _ssl_contexts.get(address)
        if context is not None and not isinstance(context, ssl.SSLContext):
            context = context()
        if context is not None:
            _built_contexts[address] = context
    return context


def _get_spawn_state() -> dict[Any, Any]:
    # A context does not pickle: spawned children get the factories, and a note that the
    # other addresses need TLS (so the error says what to do).
    return {address: (context if not isinstance(context, ssl.SSLContext)
                      else _NoContext(address))
            for address, context in _ssl_contexts.items()}


def _set_spawn_state(state: dict[Any, Any]) -> None:
    _ssl_contexts.update(state)


util.register_spawn_state(__name__)


# --------------------------------------------------------------------------- links


class _Link:
    """One authenticated connection to the server and the request numbering on it."""

    def __init__(self, client: ManagerClient, channel: wire.Channel, purpose: str) -> None:
        self.client = client
        self.channel = channel
        self.purpose = purpose
        self.seq = itertools.count(1)
        self.broken = False
        self.writing = False
        self.creates: dict[int, None] = {}  # seq of 'create' requests whose reply is pending

    def close(self) -> None:
        self.broken = True
        wire.call_quietly(self.channel.close)

    def _lost(self, exc: BaseException) -> wire.ManagerConnectionError:
        self.close()
        where = wire.format_address(self.client.address)
        return wire.ManagerConnectionError(
            f"lost the connection to the manager at {where} ({type(exc).__name__}: {exc}); "
            "its server process has exited (shut down, crashed or killed) or the network "
            "failed. Objects held by that manager are gone")

    def send(self, request: wire.Request) -> None:
        """Encode and send ``request``; an encoding error raises before anything is sent."""
        if self.broken:
            raise self._lost(OSError("the connection was closed after an earlier failure"))
        try:
            with context("sending_to", self.client.tag):
                payload = self.client.codec.dumps(request.to_wire())
        except Exception as exc:
            raise _explained(exc, request, self.client.codec) from None
        self.writing = True
        try:
            self.channel.send(payload)
        except OSError as exc:
            raise self._lost(exc) from None
        except BaseException:
            self.close()  # a frame may be half written: the stream is unusable
            raise
        finally:
            self.writing = False

    def roundtrip(self, op: str, args: tuple[Any, ...]) -> wire.Reply:
        """Send a request and return its reply (skipping replies to interrupted requests)."""
        seq = next(self.seq)
        self.send(wire.Request(seq, op, args))
        if op == "create":
            self.creates[seq] = None
        try:
            while True:
                reply = self._receive()
                if reply.seq == seq or reply.seq == -1:
                    self.creates.pop(seq, None)
                    if reply.seq == -1:
                        self.close()
                    return reply
                self._drop_stale(reply)
        except (EOFError, OSError) as exc:
            if isinstance(exc, wire.ManagerConnectionError):
                raise
            raise self._lost(exc) from None
        except BaseException:
            if self.purpose == "call":
                # The server may still be blocked in that call: start afresh next time.
                self.close()
            raise

    def _receive(self) -> wire.Reply:
        data = self.channel.recv(None)
        client = self.client
        with context("received_from", (client.tag, client.address, client)):
            return wire.Reply.from_wire(client.codec.loads(data))

    def _drop_stale(self, reply: wire.Reply) -> None:
        """Forget the reply to an interrupted request; give back what it created for us."""
        if reply.seq in self.creates:
            del self.creates[reply.seq]
            if reply.status == "ok":
                try:
                    self.client.release(reply.value[0])
                except (TypeError, IndexError, KeyError):
                    pass
        elif reply.status == "proxy":
            try:
                self.client.release(reply.value[1])
            except (TypeError, IndexError, KeyError):
                pass


def _explained(exc: Exception, request: wire.Request, codec: wire.Codec) -> Exception:
    """The encoding error of ``request``, saying which argument could not be sent."""
    value: Any
    if request.op == "call" and len(request.args) == 4:
        _ident, method, args, kwds = request.args
        # positional arguments by index, keyword arguments by name
        what, value = f"the arguments of {method}()", {**dict(enumerate(args)), **dict(kwds)}
    else:
        what, value = f"the arguments of the {request.op!r} request", request.args
    if not codec.carries_objects:
        try:
            return type(exc)(f"{what} cannot be sent with the {codec.name!r} serializer, which "
                             f"carries only plain data (None, bool, int, float, str, bytes, "
                             f"lists, str-keyed dicts): {exc}")
        except Exception:
            return exc
    try:
        return type(exc)(wire.explain_unpicklable(value, exc, what))
    except Exception:
        return exc


# --------------------------------------------------------------------------- client


class ManagerClient:
    """This process's connections to one manager's server."""

    def __init__(self, address: Any, authkey: bytes, codec: wire.Codec) -> None:
        self.address = address
        self.authkey = process.AuthenticationString(authkey)
        self.codec = codec
        self.tag: str | None = None
        self.session_id: str | None = None
        self.closed = False
        self._session: _Link | None = None
        self._lock = threading.Lock()
        self._local = threading.local()
        self._pending: collections.deque[str] = collections.deque()

    def __repr__(self) -> str:
        return (f"<ManagerClient {wire.format_address(self.address)} session="
                f"{self.session_id}>")

    # ----------------------------------------------------------------- connecting

    def _open(self, purpose: str) -> _Link:
        if self.closed:
            raise wire.ManagerConnectionError(
                f"the manager at {wire.format_address(self.address)} has been shut down; "
                "its shared objects are gone")
        if wire.normalize_address(self.address) in _shut_down:
            raise wire.ManagerConnectionError(
                f"the manager at {wire.format_address(self.address)} was shut down by this "
                "process; its shared objects are gone")
        try:
            channel = wire.connect(self.address, self.authkey,
                                   ssl_context=_ssl_context_for(self.address))
        except (ConnectionError, FileNotFoundError, TimeoutError) as exc:
            # Callers see the ConnectionError family; BaseManager.connect() unwraps the cause.
            raise wire.ManagerConnectionError(str(exc)) from exc
        link = _Link(self, channel, purpose)
        try:
            me = process.current_process().name
            thread = threading.current_thread().name
            reply = link.roundtrip("hello", (self.session_id, f"{me}|{thread}|{purpose}"))
            session_id, tag = self._unwrap(reply)
        except BaseException:
            link.close()
            raise
        if self.session_id is None:
            self.session_id = session_id
        self.tag = tag
        return link

    def _session_link(self) -> _Link:
        link = self._session
        if link is None or link.broken:
            if link is not None and link.broken:
                raise link._lost(OSError("the session connection was closed after a failure"))
            link = self._session = self._open("session")
        return link

    def _call_link(self) -> _Link:
        link: _Link | None = getattr(self._local, "link", None)
        if link is None or link.broken:
            if self.session_id is None:
                self.request("ping")
            link = self._local.link = self._open("call")
        return link

    # ----------------------------------------------------------------- requests

    def _unwrap(self, reply: wire.Reply) -> Any:
        if reply.status == "ok":
            return reply.value
        if reply.status == "raised":
            raise wire.raised_from_reply(reply.value)
        if reply.status == "error":
            raise wire.error_from_reply(reply.value)
        raise wire.RemoteError(f"unexpected {reply.status!r} reply to a control request\n")

    def request(self, op: str, *args: Any) -> Any:
        """Send a control request over the session and return the reply's value."""
        try:
            with self._lock:
                link = self._session_link()
                self._send_pending(link)
                reply = link.roundtrip(op, args)
        finally:
            self._flush()
        return self._unwrap(reply)

    def call(self, ident: str, method: str, args: tuple[Any, ...],
             kwds: dict[str, Any]) -> wire.Reply:
        """Call ``method`` of shared object ``ident`` from this thread; return the raw reply."""
        link = self._call_link()
        try:
            return link.roundtrip("call", (ident, method, args, kwds))
        finally:
            if self._pending:
                self._flush()

    # ----------------------------------------------------------------- releases

    def release(self, ident: str) -> None:
        """Give back one reference to ``ident``; never blocks, never raises."""
        if self.closed or self.session_id is None:
            return
        self._pending.append(ident)
        self._flush()

    def _send_pending(self, link: _Link) -> None:
        if not self._pending or link.writing:
            return
        idents = []
        while self._pending:
            idents.append(self._pending.popleft())
        link.send(wire.Request(0, "release", (idents,)))

    def _flush(self) -> None:
        # Whoever holds the lock flushes when it is done, so a failed try is no loss.
        while self._pending and not self.closed:
            if not self._lock.acquire(blocking=False):
                return
            try:
                link = self._session
                if link is None or link.broken or link.writing:
                    return
                self._send_pending(link)
            except Exception:
                return
            finally:
                self._lock.release()

    # ----------------------------------------------------------------- closing

    def close(self) -> None:
        """Close every connection of this process to the manager."""
        self.closed = True
        self._pending.clear()
        link, self._session = self._session, None
        if link is not None:
            link.close()
        call = getattr(self._local, "link", None)
        if call is not None:
            call.close()
            self._local.link = None


# --------------------------------------------------------------------------- registry

# (address, serializer, authkey) -> client: a wrong key never spoils the right one's client
_clients: dict[tuple[Any, str, bytes], ManagerClient] = {}
_clients_lock = threading.Lock()


def client_for(address: Any, authkey: bytes | None, serializer: str) -> ManagerClient:
    """This process's client of the manager at ``address`` (made on first use)."""
    if authkey is None:
        authkey = process.current_process().authkey
    key = (wire.normalize_address(address), serializer, bytes(authkey))
    client = _clients.get(key)
    if client is None or client.closed:
        with _clients_lock:
            client = _clients.get(key)
            if client is None or client.closed:
                client = ManagerClient(key[0], authkey, wire.get_codec(serializer))
                _clients[key] = client
    return client


def existing_client(address: Any, serializer: str,
                    authkey: bytes | None = None) -> ManagerClient | None:
    """This process's client of the manager at ``address``, if it has one.

    Without ``authkey``: the one that holds a session (the key that worked).
    """
    address = wire.normalize_address(address)
    if authkey is not None:
        client = _clients.get((address, serializer, bytes(authkey)))
        return client if client is not None and not client.closed else None
    for (where, codec, _key), client in list(_clients.items()):
        if where == address and codec == serializer and not client.closed \
                and client.session_id is not None:
            return client
    return None


# Addresses of managers this process shut down: their proxies fail at once, clearly.
_shut_down: set[Any] = set()


def mark_shut_down(address: Any, shut_down: bool = True) -> None:
    """Note that the manager at ``address`` was shut down (or, with False, is back)."""
    address = wire.normalize_address(address)
    if shut_down:
        _shut_down.add(address)
    else:
        _shut_down.discard(address)


def forget_clients(address: Any) -> None:
    """Close and forget this process's clients of the manager at ``address``."""
    address = wire.normalize_address(address)
    with _clients_lock:
        doomed = [key for key in _clients if key[0] == address]
        clients = [_clients.pop(key) for key in doomed]
    for client in clients:
        client.close()


#: Bumped in a forked child: clients cached from before the fork are stale.
generation = 0


def _reset_after_fork() -> None:
    # The child must never write to its parent's sockets; the objects go with their fds.
    global _clients_lock, generation
    generation += 1
    _clients.clear()
    _clients_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def add_fork_hook(hook: Callable[[], None]) -> None:
    """Run ``hook`` in children started by manyproc's fork (after the reset above)."""
    util.register_after_fork(_fork_hooks, lambda _obj: hook())


class _ForkHooks:
    pass


_fork_hooks = _ForkHooks()
