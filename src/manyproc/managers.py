"""Managers: shared objects that live in a server process, used through proxies.

A manager starts (or connects to) a server that holds Python objects -- lists,
dicts, queues, locks, or anything registered -- and hands out *proxies*: local
objects whose method calls run on the real object in the server::

    with manyproc.Manager() as manager:          # starts the server process
        shared = manager.dict()                  # a DictProxy
        p = manyproc.Process(target=work, args=(shared,))   # the proxy travels
        ...

The server can listen on TCP so that programs on other machines connect with the
address and the authkey (see ``examples/remote_manager_server.py``)::

    class QueueManager(BaseManager): pass
    QueueManager.register("get_queue", callable=lambda: the_queue)
    manager = QueueManager(address=("", 50000), authkey=b"secret")
    manager.get_server().serve_forever()

What manyproc adds to the standard library's managers:

* security: every connection is authenticated both ways before anything is
  unpickled, message sizes are bounded (``max_message_size=``), listening on a
  non-loopback address needs an explicit authkey, and ``ssl_context=`` encrypts
  the traffic with TLS;
* faults: the references of a client that dies are dropped with its connections,
  and a dead server gives :class:`ManagerConnectionError` (a ConnectionError and
  an EOFError) naming its address, never a hang;
* proxies reconnect in every process and thread, keep a custom authkey when
  pickled, and an exception raised by a shared object arrives as its own type with
  the server traceback attached.

Where it differs from the standard library, on purpose:

* ``get_server().serve_forever()`` returns once the server is stopped (a client's
  shutdown request, ``server.stop()``, Ctrl-C) instead of exiting the process;
* every manager has ``shutdown()``; on one that only ``connect()``-ed it leaves the
  server alone;
* a manager object sent to another process arrives as a client of the same server;
* the wire protocol is manyproc's own, so a standard library client cannot talk to
  a manyproc server (nor the reverse), and the module has no ``dispatch()`` or
  ``listener_client`` for hand-made requests.

The wire protocol is described in :mod:`manyproc._manager_wire`, the server in
:mod:`manyproc._manager_server` and proxies in :mod:`manyproc._proxies`.
"""

from __future__ import annotations

import array
import os
import queue
import signal
import ssl
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from . import _manager_client as client_side
from . import _manager_wire as wire
from . import connection, process, util
from ._errors import ProcessError
from ._manager_server import Server, public_methods
from ._manager_wire import ManagerConnectionError, RemoteError, RemoteTraceback
from ._proxies import (
    AcquirerProxy,
    ArrayProxy,
    AutoProxy,
    BarrierProxy,
    BaseListProxy,
    BasePoolProxy,
    BaseProxy,
    ConditionProxy,
    DictProxy,
    EventProxy,
    IteratorProxy,
    ListProxy,
    MakeProxyType,
    NamespaceProxy,
    PoolProxy,
    RebuildProxy,
    SetProxy,
    Token,
    ValueProxy,
    adopting,
)
from .reduction import get_spawning_popen

__all__ = ["BaseManager", "SyncManager", "BaseProxy", "Token", "SharedMemoryManager"]

# Names importable from here, as from the standard library's module.
_REEXPORTED = (AcquirerProxy, ArrayProxy, AutoProxy, BarrierProxy, BaseListProxy, BasePoolProxy,
               ConditionProxy, DictProxy, EventProxy, IteratorProxy, ListProxy, MakeProxyType,
               NamespaceProxy, PoolProxy, RebuildProxy, SetProxy, ValueProxy, RemoteTraceback,
               ManagerConnectionError, RemoteError, public_methods)


HAS_SHMEM = True  # SharedMemoryManager exists (its module is imported when used)


def all_methods(obj: Any) -> list[str]:
    """Names of the callable attributes of ``obj``."""
    names = []
    for name in dir(obj):
        try:
            if callable(getattr(obj, name)):
                names.append(name)
        except Exception:
            continue
    return names


class State:
    """Life-cycle of a manager: ``INITIAL`` -> ``STARTED`` -> ``SHUTDOWN``."""

    __slots__ = ("value",)
    INITIAL = 0
    STARTED = 1
    SHUTDOWN = 2

    def __init__(self) -> None:
        self.value = State.INITIAL


class ManagerNotStartedError(ProcessError, ValueError):
    """The manager has no server yet: call ``start()`` or ``connect()`` first."""


def _default_context() -> Any:
    from .context import _default_context as default

    return default.get_context()


class BaseManager:
    """Start or connect to a server of shared objects, and create proxies to them.

    Args:
        address: where the server listens: ``(host, port)`` for TCP, a path for a
            Unix socket; ``None`` picks a fresh local one.
        authkey: the secret every connection must prove it knows (HMAC, both ways);
            default: this process's ``authkey``.  Required for non-loopback addresses.
        serializer: ``'pickle'`` (any picklable object) or ``'xmlrpclib'`` (plain data).
        ctx: the context whose start method starts the server process.
        shutdown_timeout: seconds ``shutdown()`` waits for the server to exit before
            terminating it, then again before killing it.
        ssl_context: an ``ssl.SSLContext`` (or a function returning one, which also
            works with spawn) encrypting connections with TLS: a server-side context
            for ``start()``/``get_server()``; a client-side one for ``connect()``.
        client_ssl_context: the client-side context when ``ssl_context`` is the server's
            (a manager that ``start()``s its server and also uses its proxies needs both).
        max_message_size: largest request, in bytes, the server accepts (``None``: no
            limit); a larger one fails with a RemoteError that says so.
    """

    _registry: dict[str, tuple[Any, Any, Any, Any]] = {}
    _Server: type[Server] = Server

    def __init__(self, address: Any = None, authkey: bytes | None = None,
                 serializer: str = "pickle", ctx: Any = None, *,
                 shutdown_timeout: float = 1.0, ssl_context: Any = None,
                 client_ssl_context: Any = None,
                 max_message_size: int | None = wire.DEFAULT_MAX_MESSAGE_SIZE) -> None:
        wire.get_codec(serializer)  # an unknown serializer fails here, not in the server
        self._explicit_authkey = authkey is not None
        if authkey is None:
            authkey = process.current_process().authkey
        elif not isinstance(authkey, (bytes, bytearray)):
            raise TypeError(f"authkey must be bytes, not {type(authkey).__name__} "
                            f"({authkey!r:.40}); encode a text key, e.g. key.encode()")
        if max_message_size is not None and (not isinstance(max_message_size, int)
                                             or max_message_size <= 0):
            raise ValueError(f"max_message_size must be a positive int or None, not "
                             f"{max_message_size!r}")
        self._address = wire.normalize_address(address)
        self._authkey = process.AuthenticationString(bytes(authkey))
        self._state = State()
        self._serializer = serializer
        self._ctx = ctx or _default_context()
        self._shutdown_timeout = shutdown_timeout
        self._ssl_context = ssl_context
        self._client_ssl_context = client_ssl_context
        self._max_message_size = max_message_size
        self._process: Any = None
        self._finalizer: util.Finalize | None = None
        self._check_ssl_arguments()
        if self._address is not None:
            self._register_client_ssl()

    # ----------------------------------------------------------------- checks

    def _check_ssl_arguments(self) -> None:
        for name, value in (("ssl_context", self._ssl_context),
                            ("client_ssl_context", self._client_ssl_context)):
            if value is not None and not (isinstance(value, ssl.SSLContext) or callable(value)):
                raise TypeError(f"{name} must be an ssl.SSLContext or a function returning "
                                f"one, not {type(value).__name__}")
        if (self._ssl_context is not None or self._client_ssl_context is not None) \
                and self._address is not None and not isinstance(self._address, tuple):
            raise ValueError(f"TLS is for TCP addresses, not {self._address!r}: a Unix socket "
                             "never leaves this machine")

    def _client_ssl(self) -> Any:
        if self._client_ssl_context is not None:
            return self._client_ssl_context
        context = self._ssl_context
        if isinstance(context, ssl.SSLContext) and context.protocol == ssl.PROTOCOL_TLS_SERVER:
            return None
        return context

    def _register_client_ssl(self) -> None:
        context = self._client_ssl()
        if context is not None:
            client_side.register_ssl_context(self._address, context)
        elif self._ssl_context is not None:
            client_side.register_ssl_context(self._address, _missing_client_context)

    def _server_ssl(self) -> ssl.SSLContext | None:
        context = self._ssl_context
        if context is not None and not isinstance(context, ssl.SSLContext):
            context = context()
        if context is not None and context.protocol == ssl.PROTOCOL_TLS_CLIENT:
            raise ValueError("ssl_context is a client-side context (PROTOCOL_TLS_CLIENT), but "
                             "serving needs a server-side one: ssl.SSLContext("
                             "ssl.PROTOCOL_TLS_SERVER) with load_cert_chain(certfile, keyfile)")
        return context

    def _check_can_serve(self) -> None:
        """Refuse a state in which no server can start, and an unprotected public address."""
        if self._state.value == State.STARTED:
            raise ProcessError(
                f"{type(self).__name__} already started its server (at "
                f"{wire.format_address(self._address)}); a manager starts once — make a new "
                "manager object for a second server")
        if self._state.value == State.SHUTDOWN:
            raise ProcessError(f"{type(self).__name__} has shut down; make a new manager "
                               "object to start another server")
        if not self._explicit_authkey and not wire.is_loopback(self._address):
            raise ValueError(
                f"refusing to serve on {wire.format_address(self._address)}, which other "
                "machines can reach, without an explicit authkey: anyone holding the key can "
                "run code in the server. Pass one, e.g. authkey=os.urandom(32) (or a secret "
                "from your configuration), and give the same bytes to the clients; or listen "
                "on 127.0.0.1")
        if self._explicit_authkey and not self._authkey and not wire.is_loopback(self._address):
            raise ValueError("an empty authkey protects nothing on a network address: use a "
                             "long random key, e.g. authkey=os.urandom(32)")

    def _server_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if self._ssl_context is not None:
            options["ssl_context"] = self._ssl_context
        if self._max_message_size != wire.DEFAULT_MAX_MESSAGE_SIZE:
            options["max_message_size"] = self._max_message_size
        return options

    # ----------------------------------------------------------------- serving

    def get_server(self) -> Server:
        """Return a server (bound and listening, not yet serving) for this manager.

        Call ``serve_forever()`` on it to serve in this process.

        Raises:
            ProcessError: the manager already started or shut down.
            ValueError: a non-loopback address without an explicit authkey.
        """
        self._check_can_serve()
        options = self._server_options()
        if "ssl_context" in options:
            options["ssl_context"] = self._server_ssl()
        server = self._Server(self._registry, self._address, self._authkey, self._serializer,
                              **options)
        client_side.mark_shut_down(server.address, False)
        return server

    def connect(self) -> None:
        """Connect to a server that is already running at ``address``.

        Raises:
            ConnectionRefusedError, FileNotFoundError: no server listens there.
            AuthenticationError: the server has a different authkey.
        """
        if self._address is None:
            raise ValueError("connect() needs the server's address: "
                             f"{type(self).__name__}(address=(host, port), authkey=key)")
        client_side.mark_shut_down(self._address, False)
        try:
            client_side.client_for(self._address, self._authkey,
                                   self._serializer).request("ping")
        except ManagerConnectionError as exc:
            if isinstance(exc.__cause__, OSError):
                raise exc.__cause__ from None  # the standard library's error types
            raise
        self._state.value = State.STARTED

    def start(self, initializer: Callable[..., Any] | None = None,
              initargs: Iterable[Any] = ()) -> None:
        """Start the server in a new process (this manager's context's start method).

        Args:
            initializer: called as ``initializer(*initargs)`` in the server process first.

        Raises:
            ProcessError: the manager already started or shut down.
            TypeError: ``initializer`` is not callable.
            OSError: the server cannot listen on ``address`` (e.g. in use).
            Exception: whatever the initializer raised, with the server traceback.
        """
        self._check_can_serve()
        if initializer is not None and not callable(initializer):
            raise TypeError(f"initializer must be a callable, not {type(initializer).__name__} "
                            f"({initializer!r:.60})")
        if isinstance(self._ssl_context, ssl.SSLContext) \
                and self._ctx.get_start_method() != "fork":
            raise ValueError(
                "an ssl.SSLContext cannot travel to a server process started with "
                f"{self._ctx.get_start_method()!r}: pass a function that builds it, "
                "ssl_context=make_server_context, or use the 'fork' context")
        reader, writer = connection.Pipe(duplex=False)
        kwargs: dict[str, Any] = {}
        options = self._server_options()
        if options:
            kwargs["options"] = options
        self._process = self._ctx.Process(
            target=type(self)._run_server,
            args=(self._registry, self._address, self._authkey, self._serializer, writer,
                  initializer, tuple(initargs)),
            kwargs=kwargs)
        ident = ":".join(str(i) for i in self._process._identity)
        self._process.name = f"{type(self).__name__}-{ident}"
        try:
            self._process.start()
        finally:
            writer.close()
        try:
            status = self._await_server(reader)
        finally:
            reader.close()
        self._address = wire.normalize_address(status)
        client_side.mark_shut_down(self._address, False)
        self._state.value = State.STARTED
        self._register_client_ssl()
        self._finalizer = util.Finalize(
            self, type(self)._finalize_manager,
            args=(self._process, self._address, self._authkey, self._state, self._serializer,
                  self._shutdown_timeout),
            exitpriority=0)

    def _await_server(self, reader: connection.Connection) -> Any:
        """Wait for the server process to report its address, or its failure."""
        ready = connection.wait([reader, self._process.sentinel])
        message: Any = None
        if reader in ready or reader.poll():
            try:
                message = reader.recv()
            except EOFError:
                message = None
        if isinstance(message, tuple) and message[:1] == ("ready",):
            return message[1]
        self._process.join(self._shutdown_timeout)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join()
        if isinstance(message, tuple) and message[:1] == ("failed",):
            _kind, exc, server_tb = message
            if isinstance(exc, BaseException):
                exc.__cause__ = RemoteTraceback(f"\n\"\"\"\n{server_tb}\"\"\"")
                raise exc
        raise ProcessError(
            f"the {type(self).__name__} server process exited (exit code "
            f"{self._process.exitcode}) before it started serving; its error, if any, is on "
            "its stderr above")

    @classmethod
    def _run_server(cls, registry: Mapping[str, Any], address: Any, authkey: bytes,
                    serializer: str, writer: connection.Connection,
                    initializer: Callable[..., Any] | None = None, initargs: Sequence[Any] = (),
                    options: Mapping[str, Any] | None = None) -> None:
        """Body of the server process: build the server, report its address, serve."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the user's program
        try:
            if initializer is not None:
                initializer(*initargs)
            options = dict(options or {})
            context = options.get("ssl_context")
            if context is not None and not isinstance(context, ssl.SSLContext):
                options["ssl_context"] = context()
            server = cls._Server(registry, address, authkey, serializer, **options)
        except BaseException as exc:
            _report_failure(writer, exc)
            sys.exit(1)  # the parent raises the error; no second traceback on stderr
        writer.send(("ready", server.address))
        writer.close()
        server.serve_forever()

    # ----------------------------------------------------------------- proxies

    def _client(self) -> client_side.ManagerClient:
        if self._state.value != State.STARTED:
            where = "shut down" if self._state.value == State.SHUTDOWN else "not started"
            raise ManagerNotStartedError(
                f"the {type(self).__name__} is {where}: call start() (or connect() to a "
                "running server) before creating shared objects")
        return client_side.client_for(self._address, self._authkey, self._serializer)

    def _create(self, typeid: str, /, *args: Any, **kwds: Any) -> tuple[Token, tuple[str, ...]]:
        """Create a shared object of ``typeid`` in the server; return its token and exposed."""
        ident, exposed = self._client().request("create", typeid, args, kwds)
        return Token(typeid, self._address, ident), tuple(exposed)

    def _debug_info(self) -> str:
        """A text listing the server's shared objects and their reference counts."""
        return self._client().request("describe")

    def _number_of_objects(self) -> int:
        """How many shared objects the server holds."""
        return self._client().request("count")

    # ----------------------------------------------------------------- lifecycle

    def join(self, timeout: float | None = None) -> None:
        """Wait for the server process (if this manager started one) to end."""
        if self._process is not None:
            self._process.join(timeout)
            if not self._process.is_alive():
                self._process = None

    def shutdown(self) -> None:
        """Stop the server this manager started; its shared objects are gone afterwards.

        A manager that only ``connect()``-ed leaves the server (and the proxies of
        this process, which share its connections) alone.
        """
        if self._finalizer is not None:
            self._finalizer()
        elif self._state.value == State.STARTED:
            self._state.value = State.SHUTDOWN

    @staticmethod
    def _finalize_manager(process_obj: Any, address: Any, authkey: bytes, state: State,
                          serializer: str, shutdown_timeout: float) -> None:
        """Ask the server to stop, then terminate (and at last kill) it if it does not."""
        if process_obj.is_alive():
            util.info("sending shutdown message to manager")
            try:
                client_side.client_for(address, authkey, serializer).request("shutdown")
            except Exception as exc:
                util.debug("shutdown request failed: %s", exc)
            process_obj.join(shutdown_timeout)
            if process_obj.is_alive():
                util.info("manager still alive after shutdown request; terminating it")
                process_obj.terminate()
                process_obj.join(shutdown_timeout)
                if process_obj.is_alive():
                    process_obj.kill()
                    process_obj.join()
        state.value = State.SHUTDOWN
        client_side.forget_clients(address)
        client_side.mark_shut_down(address)

    def __enter__(self) -> BaseManager:
        if self._state.value == State.INITIAL:
            self.start()
        elif self._state.value == State.SHUTDOWN:
            raise ProcessError(f"{type(self).__name__} has shut down; make a new manager")
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.shutdown()

    @property
    def address(self) -> Any:
        """The server's address (the real port once started, for port 0)."""
        return self._address

    def __reduce__(self) -> Any:
        # In another process the manager is a client of the same server: it creates
        # shared objects there, but does not own (or shut down) the server process.
        if get_spawning_popen() is not None:
            authkey: Any = self._authkey
        elif bytes(self._authkey) != bytes(process.current_process().authkey):
            authkey = bytes(self._authkey)  # a key of its own, which the receiver cannot know
        else:
            authkey = None
        return _rebuild_manager, (type(self), self._address, authkey, self._serializer,
                                  self._state.value, self._shutdown_timeout,
                                  self._max_message_size)

    def __repr__(self) -> str:
        state = {State.INITIAL: "initial", State.STARTED: "started",
                 State.SHUTDOWN: "shut down"}.get(self._state.value, "?")
        return f"<{type(self).__name__} {state} at {wire.format_address(self._address)}>"

    # ----------------------------------------------------------------- registration

    @classmethod
    def register(cls, typeid: str, callable: Callable[..., Any] | None = None,  # noqa: A002
                 proxytype: Any = None, exposed: Sequence[str] | None = None,
                 method_to_typeid: Mapping[str, str] | None = None,
                 create_method: bool = True) -> None:
        """Register a type of shared object (and, by default, a method creating one).

        Args:
            typeid: the name of the type, and of the creating method.
            callable: builds the object in the server (``None``: the one positional
                argument given to the creating method is shared as it is, or the type
                is only returned by other objects' methods).
            proxytype: the proxy class (default :func:`AutoProxy`).
            exposed: the method names proxies may call (default: the proxy type's
                ``_exposed_``, else every public method).
            method_to_typeid: methods whose result is shared (returned as a proxy of
                the given typeid) rather than copied.
            create_method: add ``manager.<typeid>(...)``.
        """
        if not isinstance(typeid, str) or not typeid:
            raise TypeError(f"typeid must be a non-empty str, not {typeid!r}")
        if callable is not None and not _is_callable(callable):
            raise TypeError(f"callable for {typeid!r} must be callable (or None), not "
                            f"{type(callable).__name__}")
        if "_registry" not in cls.__dict__:
            cls._registry = cls._registry.copy()
        if proxytype is None:
            proxytype = AutoProxy
        exposed = exposed or getattr(proxytype, "_exposed_", None)
        if exposed is not None:
            if isinstance(exposed, str) or not all(isinstance(n, str) for n in exposed):
                raise TypeError(f"exposed for {typeid!r} must be a sequence of method names "
                                f"(str), not {exposed!r}")
            exposed = tuple(exposed)
        method_to_typeid = method_to_typeid or getattr(proxytype, "_method_to_typeid_", None)
        if method_to_typeid:
            if not isinstance(method_to_typeid, Mapping) or not all(
                    isinstance(k, str) and isinstance(v, str)
                    for k, v in method_to_typeid.items()):
                raise TypeError(f"method_to_typeid for {typeid!r} must map method names (str) "
                                f"to typeids (str), not {method_to_typeid!r}")
            method_to_typeid = dict(method_to_typeid)
        cls._registry[typeid] = (callable, exposed, method_to_typeid, proxytype)
        if create_method:
            setattr(cls, typeid, _creator(cls, typeid, proxytype))


def _rebuild_manager(cls: type[BaseManager], address: Any, authkey: bytes | None,
                     serializer: str, state: int, shutdown_timeout: float,
                     max_message_size: int | None) -> BaseManager:
    manager = cls.__new__(cls)
    BaseManager.__init__(manager, address, authkey, serializer,
                         shutdown_timeout=shutdown_timeout, max_message_size=max_message_size)
    manager._explicit_authkey = authkey is not None
    manager._state.value = State.STARTED if state == State.STARTED else State.INITIAL
    return manager


def _is_callable(obj: Any) -> bool:
    return callable(obj)


def _creator(cls: type, typeid: str, proxytype: Any) -> Callable[..., Any]:
    def create(self: BaseManager, /, *args: Any, **kwds: Any) -> Any:
        token, exposed = self._create(typeid, *args, **kwds)
        try:
            with adopting(token.id):
                return proxytype(token, self._serializer, manager=self, authkey=self._authkey,
                                 exposed=exposed)
        except BaseException:
            self._client().release(token.id)
            raise

    create.__name__ = typeid
    create.__qualname__ = f"{cls.__name__}.{typeid}"
    create.__doc__ = f"Create a shared {typeid!r} object in the server; return its proxy."
    return create


def _report_failure(writer: connection.Connection, exc: BaseException) -> None:
    """Tell the parent why the server could not start (as the exception itself if it pickles)."""
    text = wire.format_exception_text(exc)
    try:
        writer.send(("failed", exc, text))
    except Exception:
        try:
            writer.send(("failed", RuntimeError(f"{type(exc).__name__}: {exc}"), text))
        except Exception:
            pass


def _missing_client_context() -> ssl.SSLContext:
    raise ValueError("this manager was given a server-side ssl_context only; its own proxies "
                     "need a client-side one too: pass client_ssl_context="
                     "ssl.create_default_context(cafile=...) that trusts the server's "
                     "certificate")


# --------------------------------------------------------------------------- SyncManager


class Namespace:
    """A plain object whose attributes are shared (through a NamespaceProxy)."""

    def __init__(self, /, **kwds: Any) -> None:
        self.__dict__.update(kwds)

    def __repr__(self) -> str:
        shown = sorted(f"{name}={value!r}" for name, value in self.__dict__.items()
                       if not name.startswith("_"))
        return f"{type(self).__name__}({', '.join(shown)})"


class Value:
    """A value held in the server (``typecode`` is kept for display only)."""

    def __init__(self, typecode: Any, value: Any, lock: Any = True) -> None:
        self._typecode = typecode
        self._value = value

    def get(self) -> Any:
        return self._value

    def set(self, value: Any) -> None:
        self._value = value

    value = property(get, set)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._typecode!r}, {self._value!r})"


def Array(typecode: str, sequence: Iterable[Any], lock: Any = True) -> array.array[Any]:  # noqa: N802
    """An ``array.array`` held in the server."""
    return array.array(typecode, sequence)


def _make_pool(*args: Any, **kwds: Any) -> Any:
    from .pool import Pool  # imported in the server, only when a pool is asked for

    return Pool(*args, **kwds)


class SyncManager(BaseManager):
    """A manager of the standard shared types: containers, queues, locks, values, pools.

    ``manyproc.Manager()`` returns a started one.
    """


# typeid -> (what builds it in the server, proxy type; None = AutoProxy)
_SYNC_TYPES: dict[str, tuple[Any, Any]] = {
    "Queue": (queue.Queue, None),
    "JoinableQueue": (queue.Queue, None),
    "Event": (threading.Event, EventProxy),
    "Lock": (threading.Lock, AcquirerProxy),
    "RLock": (threading.RLock, AcquirerProxy),
    "Semaphore": (threading.Semaphore, AcquirerProxy),
    "BoundedSemaphore": (threading.BoundedSemaphore, AcquirerProxy),
    "Condition": (threading.Condition, ConditionProxy),
    "Barrier": (threading.Barrier, BarrierProxy),
    "Pool": (_make_pool, PoolProxy),
    "list": (list, ListProxy),
    "dict": (dict, DictProxy),
    "set": (set, SetProxy),
    "Value": (Value, ValueProxy),
    "Array": (Array, ArrayProxy),
    "Namespace": (Namespace, NamespaceProxy),
}
for _typeid, (_build, _proxytype) in _SYNC_TYPES.items():
    SyncManager.register(_typeid, _build, _proxytype)
# Types only ever returned by methods (iter() of a dict, a pool's imap and apply_async).
SyncManager.register("Iterator", proxytype=IteratorProxy, create_method=False)
SyncManager.register("AsyncResult", create_method=False)
del _typeid, _build, _proxytype


# --------------------------------------------------------------------------- shared memory


def _destroy_segment(name: str) -> None:
    try:
        from .shared_memory import SharedMemory
    except ImportError:
        from ._os import shm

        try:
            shm.unlink_segment(name)
        except FileNotFoundError:
            pass
        return
    try:
        segment = SharedMemory(name)
    except FileNotFoundError:
        return
    segment.close()
    try:
        segment.unlink()
    except FileNotFoundError:
        pass


class _SegmentTracker:
    """The shared memory segments a SharedMemoryServer unlinks when it stops."""

    def __init__(self, name: str, segment_names: Iterable[str] = ()) -> None:
        self.shared_memory_context_name = name
        self.segment_names: list[str] = list(segment_names)

    def register_segment(self, segment_name: str) -> None:
        self.segment_names.append(segment_name)

    def destroy_segment(self, segment_name: str) -> None:
        if segment_name in self.segment_names:
            self.segment_names.remove(segment_name)
        _destroy_segment(segment_name)

    def unlink(self) -> None:
        for segment_name in list(self.segment_names):
            self.destroy_segment(segment_name)

    def __getstate__(self) -> tuple[str, list[str]]:
        return (self.shared_memory_context_name, self.segment_names)

    def __setstate__(self, state: tuple[str, list[str]]) -> None:
        self.__init__(*state)  # type: ignore[misc]


class SharedMemoryServer(Server):
    """A server that also tracks shared memory segments and unlinks them when it stops."""

    ops = {**Server.ops,
           "track_segment": "_op_track_segment",
           "release_segment": "_op_release_segment",
           "list_segments": "_op_list_segments"}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        address = self.address
        if isinstance(address, bytes):
            address = os.fsdecode(address)
        self.shared_memory_context = _SegmentTracker(f"shm_{address}_{os.getpid()}")

    def _op_create(self, link: Any, typeid: Any, args: Any = (),
                   kwds: Any = None) -> tuple[str, Any]:
        entry = self.registry.get(typeid) if isinstance(typeid, str) else None
        if entry is not None and getattr(entry[3], "_shared_memory_proxy", False):
            kwds = dict(kwds or {})
            kwds["shared_memory_context"] = self.shared_memory_context
        return super()._op_create(link, typeid, args, kwds)

    def _op_track_segment(self, link: Any, segment_name: str) -> tuple[str, Any]:
        self.shared_memory_context.register_segment(segment_name)
        return "ok", None

    def _op_release_segment(self, link: Any, segment_name: str) -> tuple[str, Any]:
        self.shared_memory_context.destroy_segment(segment_name)
        return "ok", None

    def _op_list_segments(self, link: Any) -> tuple[str, Any]:
        return "ok", list(self.shared_memory_context.segment_names)

    def prepare_shutdown(self) -> None:
        self.shared_memory_context.unlink()


class SharedMemoryManager(BaseManager):
    """A manager that creates shared memory blocks and unlinks them all on shutdown.

    ``SharedMemory(size)`` and ``ShareableList(sequence)`` create blocks in this
    process and register them with the server, which removes them when it stops.
    """

    _Server = SharedMemoryServer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if os.name == "posix":
            try:
                from . import resource_tracker
            except ImportError:  # pragma: no cover - built alongside
                pass
            else:
                # Start the tracker now, so the server process and this one share it.
                resource_tracker.ensure_running()
        super().__init__(*args, **kwargs)

    def _track(self, segment_name: str) -> None:
        if self._state.value != State.STARTED:
            raise ManagerNotStartedError(
                "the SharedMemoryManager is not started: call start() (or use it in a with "
                "block) before creating shared memory with it")
        self._client().request("track_segment", segment_name)

    def SharedMemory(self, size: int) -> Any:  # noqa: N802 - the standard library's name
        """Create a shared memory block of ``size`` bytes, unlinked when the manager stops."""
        from . import shared_memory

        if self._state.value != State.STARTED:
            self._track("")  # raises the explanation
        segment = shared_memory.SharedMemory(None, create=True, size=size)
        try:
            self._track(segment.name)
        except BaseException:
            segment.unlink()
            raise
        return segment

    def ShareableList(self, sequence: Iterable[Any] | None) -> Any:  # noqa: N802
        """Create a ShareableList from ``sequence``, unlinked when the manager stops."""
        from . import shared_memory

        if self._state.value != State.STARTED:
            self._track("")
        shareable = shared_memory.ShareableList(sequence)
        try:
            self._track(shareable.shm.name)
        except BaseException:
            shareable.shm.unlink()
            raise
        return shareable
