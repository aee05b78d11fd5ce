"""Contexts: one object per start method, carrying the whole public API.

``manyproc.get_context('spawn')`` returns a context whose ``Process``, ``Lock``,
``Queue``, ``Pool`` ... all use the spawn start method, without touching the
global default.  The module-level functions of :mod:`manyproc` are the methods
of the default context, whose start method may be chosen once with
:func:`set_start_method`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Sequence

from . import process, reduction
from ._errors import AuthenticationError, BufferTooShort, ProcessError, TimeoutError

TYPE_CHECKING = False  # typing costs import time in every child; only checkers need it
if TYPE_CHECKING:
    from typing import Any

    from .connection import Connection
    from .managers import SyncManager
    from .pool import Pool as _Pool
    from .queues import JoinableQueue as _JoinableQueue
    from .queues import Queue as _Queue
    from .queues import SimpleQueue as _SimpleQueue

__all__ = ()  # the contexts are reached through manyproc.get_context()

START_METHODS = ("fork", "spawn", "forkserver")


def _platform_default_start_method() -> str:
    """The start method the running Python's multiprocessing uses by default."""
    if sys.platform == "darwin" or sys.platform == "win32":
        return "spawn"
    if sys.version_info >= (3, 14):
        return "forkserver"
    return "fork"


class BaseContext:
    """The public API bound to one start method."""

    _name: str | None = None
    Process: type[process.BaseProcess]

    ProcessError = ProcessError
    BufferTooShort = BufferTooShort
    TimeoutError = TimeoutError
    AuthenticationError = AuthenticationError

    current_process = staticmethod(process.current_process)
    parent_process = staticmethod(process.parent_process)
    active_children = staticmethod(process.active_children)

    def cpu_count(self) -> int:
        """Return the number of CPUs in the system (as ``os.cpu_count()``)."""
        count = os.cpu_count()
        if count is None:
            raise NotImplementedError("cannot determine number of cpus")
        return count

    def Manager(self) -> SyncManager:  # noqa: N802 - standard library names below
        """Start a server process holding shared objects; return its ``SyncManager``."""
        from .managers import SyncManager

        manager = SyncManager(ctx=self.get_context())
        manager.start()
        return manager

    def Pipe(self, duplex: bool = True) -> tuple[Connection, Connection]:  # noqa: N802
        """Return the two ends of a new pipe."""
        from .connection import Pipe

        return Pipe(duplex)

    def Lock(self) -> Any:  # noqa: N802
        """A non-recursive lock shared between processes."""
        from .synchronize import Lock

        return Lock(ctx=self.get_context())

    def RLock(self) -> Any:  # noqa: N802
        """A recursive lock shared between processes."""
        from .synchronize import RLock

        return RLock(ctx=self.get_context())

    def Condition(self, lock: Any = None) -> Any:  # noqa: N802
        """A condition variable shared between processes."""
        from .synchronize import Condition

        return Condition(lock, ctx=self.get_context())

    def Semaphore(self, value: int = 1) -> Any:  # noqa: N802
        """A semaphore shared between processes."""
        from .synchronize import Semaphore

        return Semaphore(value, ctx=self.get_context())

    def BoundedSemaphore(self, value: int = 1) -> Any:  # noqa: N802
        """A bounded semaphore shared between processes."""
        from .synchronize import BoundedSemaphore

        return BoundedSemaphore(value, ctx=self.get_context())

    def Event(self) -> Any:  # noqa: N802
        """An event shared between processes."""
        from .synchronize import Event

        return Event(ctx=self.get_context())

    def Barrier(self, parties: int, action: Callable[[], Any] | None = None,  # noqa: N802
                timeout: float | None = None) -> Any:
        """A barrier shared between processes."""
        from .synchronize import Barrier

        return Barrier(parties, action, timeout, ctx=self.get_context())

    def Queue(self, maxsize: int = 0) -> _Queue:  # noqa: N802
        """A FIFO queue shared between processes."""
        from .queues import Queue

        return Queue(maxsize, ctx=self.get_context())

    def JoinableQueue(self, maxsize: int = 0) -> _JoinableQueue:  # noqa: N802
        """A queue with ``task_done()`` and ``join()``."""
        from .queues import JoinableQueue

        return JoinableQueue(maxsize, ctx=self.get_context())

    def SimpleQueue(self) -> _SimpleQueue:  # noqa: N802
        """A queue with only ``get``, ``put``, ``empty`` and ``close``."""
        from .queues import SimpleQueue

        return SimpleQueue(ctx=self.get_context())

    def Pool(self, processes: int | None = None,  # noqa: N802
             initializer: Callable[..., Any] | None = None, initargs: Iterable[Any] = (),
             maxtasksperchild: int | None = None, **kwargs: Any) -> _Pool:
        """A pool of worker processes (see :class:`manyproc.pool.Pool`)."""
        from .pool import Pool

        return Pool(processes, initializer, initargs, maxtasksperchild,
                    context=self.get_context(), **kwargs)

    def RawValue(self, typecode_or_type: Any, *args: Any) -> Any:  # noqa: N802
        """A ctypes object in shared memory, without a lock."""
        from .sharedctypes import RawValue

        return RawValue(typecode_or_type, *args)

    def RawArray(self, typecode_or_type: Any, size_or_initializer: Any) -> Any:  # noqa: N802
        """A ctypes array in shared memory, without a lock."""
        from .sharedctypes import RawArray

        return RawArray(typecode_or_type, size_or_initializer)

    def Value(self, typecode_or_type: Any, *args: Any, lock: Any = True) -> Any:  # noqa: N802
        """A ctypes object in shared memory, guarded by a lock."""
        from .sharedctypes import Value

        return Value(typecode_or_type, *args, lock=lock, ctx=self.get_context())

    def Array(self, typecode_or_type: Any, size_or_initializer: Any, *,  # noqa: N802
              lock: Any = True) -> Any:
        """A ctypes array in shared memory, guarded by a lock."""
        from .sharedctypes import Array

        return Array(typecode_or_type, size_or_initializer, lock=lock, ctx=self.get_context())

    def freeze_support(self) -> None:
        """In a frozen executable, run the child side when started as a child."""
        if getattr(sys, "frozen", False):
            from ._spawn import is_child_command_line, main_from_command_line

            if is_child_command_line(sys.argv):
                main_from_command_line(sys.argv)
                sys.exit()

    def get_logger(self) -> Any:
        """Return manyproc's logger."""
        from .util import get_logger

        return get_logger()

    def log_to_stderr(self, level: Any = None) -> Any:
        """Log manyproc's records to stderr."""
        from .util import log_to_stderr

        return log_to_stderr(level)

    def allow_connection_pickling(self) -> None:
        """Make connections and sockets picklable (they always are in manyproc)."""
        from . import connection  # noqa: F401 - registers the reducers

    def set_executable(self, executable: str) -> None:
        """Use ``executable`` as the Python interpreter of spawned children."""
        from ._spawn import set_executable

        set_executable(executable)

    def set_forkserver_preload(self, module_names: Sequence[str]) -> None:
        """Modules the fork server imports once, so forked children start with them."""
        from .forkserver import set_forkserver_preload

        set_forkserver_preload(module_names)

    def get_context(self, method: str | None = None) -> BaseContext:
        """Return the context of ``method`` (this one when ``method`` is None)."""
        if method is None:
            return self
        try:
            ctx = _concrete_contexts[method]
        except (KeyError, TypeError):
            raise ValueError(
                f"cannot find context for {method!r}: the start methods are "
                f"{', '.join(repr(m) for m in _available_start_methods())}") from None
        ctx._check_available()
        return ctx

    def get_start_method(self, allow_none: bool = False) -> str | None:
        """Return this context's start method."""
        return self._name

    def set_start_method(self, method: str | None, force: bool = False) -> None:
        raise ValueError(
            "cannot set the start method of a concrete context; call "
            "manyproc.set_start_method(), or use this context as it is")

    def get_all_start_methods(self) -> list[str]:
        """The start methods this platform supports, the default first."""
        return _available_start_methods()

    @property
    def reducer(self) -> Any:
        """The reduction module (or a replacement set by the user)."""
        return _reducer_in_use[0]

    @reducer.setter
    def reducer(self, reducer: Any) -> None:
        _reducer_in_use[0] = reducer

    def _check_available(self) -> None:
        pass


_reducer_in_use: list[Any] = [reduction]


def _available_start_methods() -> list[str]:
    default = _platform_default_start_method()
    if sys.platform == "win32":
        return ["spawn"]
    methods = [default] + [m for m in START_METHODS if m != default]
    if not reduction.HAVE_SEND_HANDLE:
        methods.remove("forkserver")
    return methods


# --------------------------------------------------------------------------- process classes


class ForkProcess(process.BaseProcess):
    """A process started with ``os.fork()``: the child is a copy of the parent."""

    _start_method = "fork"

    @staticmethod
    def _Popen(process_obj: process.BaseProcess) -> Any:
        from ._popen_fork import Popen

        return Popen(process_obj)


class SpawnProcess(process.BaseProcess):
    """A process started as a fresh interpreter that imports what it needs."""

    _start_method = "spawn"

    @staticmethod
    def _Popen(process_obj: process.BaseProcess) -> Any:
        from ._popen_spawn import Popen

        return Popen(process_obj)

    @staticmethod
    def _after_fork() -> None:
        pass  # a fresh interpreter has no inherited state to fix


class ForkServerProcess(process.BaseProcess):
    """A process forked from a clean server process started with spawn."""

    _start_method = "forkserver"

    @staticmethod
    def _Popen(process_obj: process.BaseProcess) -> Any:
        from ._popen_forkserver import Popen

        return Popen(process_obj)


class ForkContext(BaseContext):
    _name = "fork"
    Process = ForkProcess


class SpawnContext(BaseContext):
    _name = "spawn"
    Process = SpawnProcess


class ForkServerContext(BaseContext):
    _name = "forkserver"
    Process = ForkServerProcess

    def _check_available(self) -> None:
        if not reduction.HAVE_SEND_HANDLE:
            raise ValueError("forkserver start method not available on this platform")


_concrete_contexts: dict[str, BaseContext] = {
    "fork": ForkContext(),
    "spawn": SpawnContext(),
    "forkserver": ForkServerContext(),
}


class Process(process.BaseProcess):
    """A process started with the default context's start method."""

    _start_method = None

    @staticmethod
    def _Popen(process_obj: process.BaseProcess) -> Any:
        return _default_context.get_context().Process._Popen(process_obj)

    @staticmethod
    def _after_fork() -> None:
        return _default_context.get_context().Process._after_fork()


class DefaultContext(BaseContext):
    """The global context: its start method is chosen once, on first use or explicitly."""

    Process = Process

    def __init__(self, default: BaseContext) -> None:
        self._default_context = default
        self._actual_context: BaseContext | None = None

    def get_context(self, method: str | None = None) -> BaseContext:
        if method is None:
            if self._actual_context is None:
                self._actual_context = self._default_context
            return self._actual_context
        return super().get_context(method)

    def set_start_method(self, method: str | None, force: bool = False) -> None:
        """Choose the global start method; only once unless ``force=True``.

        Raises:
            RuntimeError: the start method was already chosen and ``force`` is false.
            ValueError: ``method`` is not a start method of this platform.
        """
        if self._actual_context is not None and not force:
            raise RuntimeError(
                f"context has already been set (start method "
                f"{self._actual_context._name!r}); pass force=True to change it, or use "
                "manyproc.get_context(method) for a choice local to your code")
        if method is None and force:
            self._actual_context = None
            return
        self._actual_context = self.get_context(method)

    def get_start_method(self, allow_none: bool = False) -> str | None:
        if self._actual_context is None:
            if allow_none:
                return None
            self._actual_context = self._default_context
        return self._actual_context._name


_default_context = DefaultContext(_concrete_contexts[_platform_default_start_method()])


def _force_start_method(method: str) -> None:
    """In a child, make the default context use the method that started it."""
    _default_context._actual_context = _concrete_contexts[method]


get_spawning_popen = reduction.get_spawning_popen
set_spawning_popen = reduction.set_spawning_popen
assert_spawning = reduction.assert_spawning
