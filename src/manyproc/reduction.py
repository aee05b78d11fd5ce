"""The one pickler for everything that crosses a process boundary.

Order of preference, cheapest first:

1. standard pickle (the C pickler), by reference, for everything importable;
2. cloudpickle, by value, for what cannot be found by name in another process:
   lambdas, closures, nested functions and classes, and whatever lives in an
   interactive ``__main__`` (a REPL, ``python -c``, a notebook);
3. reducers registered by manyproc's own types (connections, locks, shared memory),
   which make those objects travel as handles rather than as copies;
4. protocol-5 out-of-band buffers, so large ``bytes``-like data can travel
   beside the pickle stream instead of inside it.

When something cannot be pickled, the error keeps its standard type but says what
failed, where it sits inside the object (``args[1].lock``), and what to do.
"""

from __future__ import annotations

import copyreg
import io
import os
import pickle
import socket
import sys
import threading
import types
from collections.abc import Callable, Iterable

from . import util

TYPE_CHECKING = False  # typing costs import time in every child; only checkers need it
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "send_handle", "recv_handle", "ForkingPickler", "register", "dump", "DupFd",
    "sendfds", "recvfds", "dumps", "loads", "AbstractReducer",
]

HAVE_SEND_HANDLE = hasattr(socket, "AF_UNIX") and hasattr(socket, "SCM_RIGHTS")
PROTOCOL = 5

_FunctionType = types.FunctionType


def _main_is_importable() -> bool:
    """True when a spawned child can re-import ``__main__`` from a file or module name."""
    main = sys.modules.get("__main__")
    if main is None:
        return False
    spec = getattr(main, "__spec__", None)
    if spec is not None and getattr(spec, "name", None):
        return True
    path = getattr(main, "__file__", None)
    return bool(path) and not str(path).startswith("<")


def _found_by_name(obj: Any) -> bool:
    """True if ``module.qualname`` leads back to ``obj``, so pickling by reference works."""
    qualname = getattr(obj, "__qualname__", None)
    module_name = getattr(obj, "__module__", None)
    if not qualname or not module_name or "<" in qualname:
        return False
    if module_name in ("__main__", "__mp_main__") and not _main_is_importable():
        return False
    module = sys.modules.get(module_name)
    if module is None:
        return False
    target: Any = module
    for part in qualname.split("."):
        target = getattr(target, part, None)
        if target is None:
            return False
    return target is obj


def _load_by_value(blob: bytes) -> Any:
    return pickle.loads(blob)


class ForkingPickler(pickle.Pickler):
    """Pickler used for every message between processes.

    Types register how they travel with :meth:`register`; functions and classes that
    cannot be found by name travel by value through cloudpickle.
    """

    _extra_reducers: dict[type, Callable[[Any], Any]] = {}
    _copyreg_dispatch_table = copyreg.dispatch_table

    def __init__(self, file: Any, protocol: int | None = None, **kwargs: Any) -> None:
        super().__init__(file, PROTOCOL if protocol is None else protocol, **kwargs)
        table = self._copyreg_dispatch_table.copy()
        table.update(self._extra_reducers)
        self.dispatch_table = table

    def reducer_override(self, obj: Any) -> Any:
        # The C pickler calls this only for objects that are not plain containers or
        # atoms, so the common case stays fast.
        if type(obj) is _FunctionType or isinstance(obj, type):
            if not _found_by_name(obj):
                return _load_by_value, (_dumps_by_value(obj),)
        return NotImplemented

    @classmethod
    def register(cls, type_: type, reduce: Callable[[Any], Any]) -> None:
        """Register ``reduce`` as the way objects of ``type_`` are pickled."""
        cls._extra_reducers[type_] = reduce

    @classmethod
    def dumps(cls, obj: Any, protocol: int | None = None) -> memoryview:
        """Pickle ``obj`` and return the bytes as a memoryview."""
        return memoryview(dumps(obj, protocol=protocol))

    loads = staticmethod(pickle.loads)


def register(type_: type, reduce: Callable[[Any], Any]) -> None:
    """Register ``reduce`` for ``type_`` in :class:`ForkingPickler`."""
    ForkingPickler.register(type_, reduce)


_by_value_pickler_class: type | None = None


def _cloudpickler() -> type:
    """Build (once) a cloudpickle pickler that also knows manyproc's reducers."""
    global _by_value_pickler_class
    if _by_value_pickler_class is None:
        import cloudpickle

        base = cloudpickle.Pickler

        class ByValuePickler(base):  # type: ignore[misc, valid-type]
            def __init__(self, file: Any, protocol: int | None = None) -> None:
                super().__init__(file, protocol=protocol)
                table = dict(base.dispatch_table)
                table.update(ForkingPickler._extra_reducers)
                self.dispatch_table = table

        _by_value_pickler_class = ByValuePickler
    return _by_value_pickler_class


def _dumps_by_value(obj: Any) -> bytes:
    buf = io.BytesIO()
    _cloudpickler()(buf, protocol=PROTOCOL).dump(obj)
    return buf.getvalue()


def dumps(obj: Any, protocol: int | None = None, *,
          buffer_callback: Callable[[pickle.PickleBuffer], Any] | None = None) -> bytes:
    """Pickle ``obj`` for another process; on failure explain what could not be pickled.

    Raises:
        pickle.PicklingError, TypeError, AttributeError: with the same type the
            standard pickler raised, and a message naming the offending part.
    """
    if protocol is None and buffer_callback is None:
        data = dumps_parts(obj)
        return data if type(data) is bytes else b"".join(data)
    return _dumps_slow(obj, protocol, buffer_callback)


def _dumps_slow(obj: Any, protocol: int | None,
                buffer_callback: Callable[[pickle.PickleBuffer], Any] | None) -> bytes:
    buf = io.BytesIO()
    try:
        ForkingPickler(buf, protocol, buffer_callback=buffer_callback).dump(obj)
    except (pickle.PicklingError, TypeError, AttributeError, ValueError, RecursionError) as exc:
        # A by-reference lookup can fail where by-value succeeds (a function rebound
        # under its name, a module not importable elsewhere): try cloudpickle whole.
        try:
            return _dumps_by_value(obj)
        except Exception:
            pass
        raise explained(exc, obj) from None
    return buf.getvalue()


class _Sink:
    """The pickler's output file: it keeps the chunks the C pickler writes, uncopied.

    A small pickle arrives as one fresh ``bytes``; a large ``bytes`` inside the
    object arrives as that very object, so big payloads are never copied.
    """

    __slots__ = ("parts", "write")

    def __init__(self) -> None:
        self.parts: list[Any] = []
        self.write = self.parts.append


class _PicklerState:
    __slots__ = ("pickler", "sink", "extra", "copyreg", "busy")

    def __init__(self) -> None:
        self.sink = _Sink()
        self.pickler = ForkingPickler(self.sink)
        self.extra = len(ForkingPickler._extra_reducers)
        self.copyreg = len(copyreg.dispatch_table)
        self.busy = False


class _PerThread(threading.local):
    state: _PicklerState | None = None


_per_thread = _PerThread()


def dumps_parts(obj: Any) -> Any:
    """Pickle ``obj`` as :func:`dumps` does, for a writer that can send parts back to back.

    Returns one ``bytes``, or for a large pickle a list of parts to send back to back.

    Building a pickler costs more than pickling a small message, so each thread
    keeps one and resets it per message.  Anything unusual (a failure to pickle,
    a newly registered reducer) takes the slow path of :func:`dumps`, which also
    explains failures; the bytes are the same either way.  The parts are a
    snapshot: mutable buffers inside ``obj`` are copied, immutable ``bytes`` not.
    """
    out = _dumps_uncopied(obj)
    if type(out) is list:
        return [p if type(p) is bytes else bytes(p) for p in out]
    return out


def _dumps_uncopied(obj: Any) -> Any:
    """:func:`dumps_parts` without the snapshot: one ``bytes``, or a list of raw parts.

    Each buffer of 64 KiB or more inside ``obj`` arrives as a part of its own, as
    the pickler handed it over: the very ``bytes`` or ``bytearray`` object, or a
    ``pickle.PickleBuffer`` over an array's memory (see :mod:`manyproc._bigdata`).
    The caller must copy what it needs before ``obj`` changes.
    """
    state = _per_thread.state
    if (state is None or state.busy or state.extra != len(ForkingPickler._extra_reducers)
            or state.copyreg != len(copyreg.dispatch_table)):
        fresh = _PicklerState()
        if state is None or not state.busy:  # a nested call (from a reducer) keeps its own
            _per_thread.state = fresh
        state = fresh
    parts = state.sink.parts
    state.busy = True
    try:
        state.pickler.dump(obj)
    except Exception:
        _per_thread.state = None  # a pickler that failed mid-stream is not reused
        return _dumps_slow(obj, None, None)  # pickles the same way, or explains the failure
    except BaseException:
        _per_thread.state = None
        raise
    if len(parts) == 1:
        out: Any = parts.pop()
        if type(out) is not bytes:
            out = bytes(out)
    else:
        out = parts[:]
        parts.clear()
    state.pickler.clear_memo()  # do not keep the message alive through the memo
    state.busy = False
    return out


def set_shm_threshold(nbytes: int | None) -> None:
    """Send messages holding ``nbytes`` or more of big buffers through shared memory.

    Big buffers are ``bytes``, ``bytearray`` and numpy arrays (protocol-5 buffers)
    of 64 KiB or more each; ``None`` keeps every message in the pipe.  Applies to
    ``Pipe`` connections and queues of this process and of the children it starts
    afterwards; the default is 1 MiB, or ``MANYPROC_SHM_THRESHOLD`` (e.g. ``4M``,
    ``off``).  See :mod:`manyproc._bigdata`.

    Raises:
        TypeError: ``nbytes`` is not an int or None.
        ValueError: ``nbytes`` is negative.
    """
    from . import _bigdata

    _bigdata.set_threshold(nbytes)


def get_shm_threshold() -> int | None:
    """How many bytes of big buffers send a message through shared memory (None: never)."""
    from . import _bigdata

    return _bigdata.get_threshold()


def loads(data: Any, *, buffers: Iterable[Any] | None = None) -> Any:
    """Unpickle data made by :func:`dumps`."""
    return pickle.loads(data, buffers=buffers)


def dump(obj: Any, file: Any, protocol: int | None = None) -> None:
    """Pickle ``obj`` to ``file`` (a binary file object) with :class:`ForkingPickler`."""
    file.write(dumps(obj, protocol))


# --------------------------------------------------------------------------- diagnosis

_HINTS: list[tuple[Callable[[Any], bool], str]] = [
    (lambda o: type(o).__module__ in ("_thread", "threading"),
     "thread locks and threads belong to one process: use manyproc.Lock (or a Manager) to "
     "share a lock, or create the object inside the child, e.g. in the pool initializer"),
    (lambda o: isinstance(o, (io.IOBase, socket.socket)),
     "open files and sockets cannot be copied: pass the path or address and open it in the "
     "child, or send a socket with manyproc.reduction.DupFd"),
    (lambda o: isinstance(o, types.GeneratorType),
     "generators cannot be pickled: pass a list, or a function that builds the generator in "
     "the child"),
    (lambda o: isinstance(o, types.ModuleType),
     "modules travel by name only: import the module inside the function instead of passing it"),
]
_DEFAULT_HINT = ("make the object picklable (define __reduce__ or __getstate__), pass only the "
                 "data the child needs, or create the object inside the child")


def _children(obj: Any) -> list[tuple[str, Any]]:
    """Parts of ``obj`` that are pickled with it, each with a path suffix."""
    if isinstance(obj, dict):
        return [(f"[{k!r}]", v) for k, v in list(obj.items())[:200]]
    if isinstance(obj, (list, tuple)):
        return [(f"[{i}]", v) for i, v in enumerate(list(obj)[:200])]
    if isinstance(obj, (set, frozenset)):
        return [(f"{{item {i}}}", v) for i, v in enumerate(list(obj)[:200])]
    if isinstance(obj, (str, bytes, int, float, type, types.FunctionType)) or obj is None:
        return []
    try:
        reduced = obj.__reduce_ex__(PROTOCOL)
    except Exception:
        return []
    if not isinstance(reduced, tuple):
        return []
    parts: list[tuple[str, Any]] = []
    state = reduced[2] if len(reduced) > 2 else None
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
        state = {**(state[0] or {}), **state[1]}  # (dict state, slot state)
    if isinstance(state, dict):
        parts += [(f".{k}" if isinstance(k, str) and k.isidentifier() else f"[{k!r}]", v)
                  for k, v in list(state.items())[:200]]
    elif state is not None:
        parts.append((".__getstate__()", state))
    args = reduced[1] if len(reduced) > 1 else ()
    if isinstance(args, tuple):
        parts += [(f"<arg {i}>", a) for i, a in enumerate(args[:50])
                  if a is not type(obj) and not isinstance(a, type)]
    return parts


def _picklable(obj: Any) -> bool:
    try:
        ForkingPickler(io.BytesIO()).dump(obj)
        return True
    except Exception:
        try:
            _dumps_by_value(obj)
            return True
        except Exception:
            return False


def find_unpicklable(obj: Any, path: str = "", depth: int = 0) -> tuple[str, Any] | None:
    """Return ``(path, part)`` for the innermost part of ``obj`` that cannot be pickled."""
    if _picklable(obj):
        return None
    if depth < 12:
        for suffix, child in _children(obj):
            found = find_unpicklable(child, path + suffix, depth + 1)
            if found is not None:
                return found
    return path, obj


def explain(obj: Any, error: BaseException, root: str = "the object") -> str:
    """Build the message: what failed, where inside ``obj``, why, and what to do."""
    found = find_unpicklable(obj)
    if found is None:
        culprit_path, culprit = "", obj
    else:
        culprit_path, culprit = found
    where = f"{root}{culprit_path}" if culprit_path else root
    hint = next((h for test, h in _HINTS if _safe(test, culprit)), _DEFAULT_HINT)
    try:
        shown = repr(culprit)
    except Exception:
        shown = f"<{type(culprit).__name__} object>"
    if len(shown) > 120:
        shown = shown[:117] + "..."
    return (f"cannot pickle {type(culprit).__qualname__} object {shown} found at {where} "
            f"({error}); {hint}")


def _safe(test: Callable[[Any], bool], obj: Any) -> bool:
    try:
        return bool(test(obj))
    except Exception:
        return False


def explained(error: BaseException, obj: Any, root: str = "the object") -> BaseException:
    """Return an exception of the same type as ``error`` whose message explains the failure."""
    try:
        message = explain(obj, error, root)
    except Exception:
        return error
    try:
        new = type(error)(message)
    except Exception:
        if hasattr(error, "add_note"):
            error.add_note(message)
        return error
    new.__cause__ = error
    return new


# --------------------------------------------------------------------------- spawning state

_spawning = threading.local()


def get_spawning_popen() -> Any:
    """The Popen object of the child being started by this thread, or ``None``."""
    return getattr(_spawning, "popen", None)


def set_spawning_popen(popen: Any) -> None:
    _spawning.popen = popen


def assert_spawning(obj: Any) -> None:
    """Refuse to pickle ``obj`` except while starting a child process."""
    if get_spawning_popen() is None:
        raise RuntimeError(
            f"{type(obj).__name__} objects should only be shared between processes through "
            "inheritance: pass it to Process(args=...) or a Pool initializer, not through a "
            "queue or pipe")


# --------------------------------------------------------------------------- file descriptors


def sendfds(sock: socket.socket, fds: Iterable[int]) -> None:
    """Send file descriptors over a connected AF_UNIX socket."""
    fds = list(fds)
    socket.send_fds(sock, [len(fds).to_bytes(4, "big")], fds)


def recvfds(sock: socket.socket, size: int) -> list[int]:
    """Receive exactly ``size`` file descriptors sent with :func:`sendfds`."""
    data, fds, _flags, _addr = socket.recv_fds(sock, 4, size)
    if not data and not fds:
        raise EOFError("the peer closed the socket before sending file descriptors")
    expected = int.from_bytes(data, "big")
    if len(fds) != size or expected != size:
        for fd in fds:
            os.close(fd)
        raise RuntimeError(f"expected {size} file descriptors, received {len(fds)}")
    return list(fds)


def send_handle(conn: Any, handle: int, destination_pid: int) -> None:
    """Send a file descriptor over a Connection whose end is an AF_UNIX socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=os.dup(conn.fileno())) as s:
        sendfds(s, [handle])


def recv_handle(conn: Any) -> int:
    """Receive a file descriptor sent with :func:`send_handle`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=os.dup(conn.fileno())) as s:
        return recvfds(s, 1)[0]


# In a child of the fork server, fds handed over at start-up arrive as a list and are
# named by their index in it; elsewhere an inherited fd keeps its number.
_inherited_fds: list[int] | None = None


class _InheritedFd:
    """An fd handed to a child at start-up; in the child it is already open."""

    def __init__(self, token: int) -> None:
        self.fd = token

    def detach(self) -> int:
        return self.fd if _inherited_fds is None else _inherited_fds[self.fd]


# A transport layer module installs the function that shares an fd with any process.
_fd_sharer: Callable[[int], Any] | None = None


def _install_fd_sharer(sharer: Callable[[int], Any]) -> None:
    global _fd_sharer
    _fd_sharer = sharer


def DupFd(fd: int) -> Any:  # noqa: N802 - the standard library's name
    """Return an object that, once unpickled in another process, ``detach()``-es a copy of fd."""
    popen = get_spawning_popen()
    if popen is not None:
        return _InheritedFd(popen.duplicate_for_child(fd))
    if _fd_sharer is None:
        from . import resource_sharer  # noqa: F401 - installs the sharer
    if _fd_sharer is None:
        raise RuntimeError("cannot share file descriptors on this platform")
    return _fd_sharer(fd)


def _reduce_socket(s: socket.socket) -> Any:
    return _rebuild_socket, (DupFd(s.fileno()), s.family, s.type, s.proto)


def _rebuild_socket(df: Any, family: int, type_: int, proto: int) -> socket.socket:
    return socket.socket(family, type_, proto, fileno=df.detach())


register(socket.socket, _reduce_socket)


class AbstractReducer:
    """The bundle of pickling functions a context uses; subclass it to customise transport."""

    ForkingPickler = ForkingPickler
    register = staticmethod(register)
    dump = staticmethod(dump)
    send_handle = staticmethod(send_handle)
    recv_handle = staticmethod(recv_handle)
    DupFd = staticmethod(DupFd)
    sendfds = staticmethod(sendfds)
    recvfds = staticmethod(recvfds)

    def __init__(self, *args: Any) -> None:
        pass


util.debug("reduction loaded")
