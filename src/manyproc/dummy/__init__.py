"""The manyproc API on threads: the same names as :mod:`manyproc`, run in this process.

Useful to debug code written for processes, or for I/O-bound work where threads
suffice.  ``Process`` is a thread, ``Queue`` is :class:`queue.Queue`, locks are
:mod:`threading` locks and ``Pool`` is :class:`manyproc.pool.ThreadPool`.
"""

from __future__ import annotations

import array
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from queue import Queue  # noqa: F401 - re-exported
from threading import (  # noqa: F401 - re-exported
    Barrier,
    BoundedSemaphore,
    Condition,
    Event,
    Lock,
    RLock,
    Semaphore,
)
from typing import Any

from .connection import Pipe

__all__ = [
    "Process", "current_process", "active_children", "freeze_support", "Lock", "RLock",
    "Semaphore", "BoundedSemaphore", "Condition", "Event", "Barrier", "Queue", "Manager",
    "Pipe", "Pool", "JoinableQueue",
]

JoinableQueue = Queue


class DummyProcess(threading.Thread):
    """A thread dressed as a Process: ``start``, ``join``, ``is_alive``, ``exitcode``."""

    def __init__(self, group: None = None, target: Callable[..., Any] | None = None,
                 name: str | None = None, args: Iterable[Any] = (),
                 kwargs: Mapping[str, Any] | None = None) -> None:
        super().__init__(group, target, name, tuple(args), dict(kwargs or {}))
        self._pid = None
        self._children: weakref.WeakKeyDictionary[DummyProcess, None] = (
            weakref.WeakKeyDictionary())
        self._start_called = False
        self._parent = current_process()

    def start(self) -> None:
        if self._parent is not current_process():
            raise RuntimeError(
                f"Parent is {self._parent!r} but current_process is {current_process()!r}")
        self._start_called = True
        parent_children = getattr(self._parent, "_children", None)
        if parent_children is not None:
            parent_children[self] = None
        super().start()

    @property
    def exitcode(self) -> int | None:
        """0 once the thread has finished, None before."""
        if self._start_called and not self.is_alive():
            return 0
        return None


Process = DummyProcess
current_process = threading.current_thread
current_process()._children = weakref.WeakKeyDictionary()  # type: ignore[attr-defined]


def active_children() -> list[DummyProcess]:
    """Threads started from this thread that are still running."""
    children = getattr(current_process(), "_children", None)
    if children is None:
        return []
    for child in list(children):
        if not child.is_alive():
            children.pop(child, None)
    return list(children)


def freeze_support() -> None:
    """Nothing to do for threads."""


class Namespace:
    """A plain object whose attributes are set from keyword arguments."""

    def __init__(self, /, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in sorted(self.__dict__.items())
                          if not k.startswith("_"))
        return f"{type(self).__name__}({shown})"


dict = dict  # noqa: A001 - mirrors manager.dict()
list = list  # noqa: A001 - mirrors manager.list()


def Array(typecode: str, sequence: Iterable[Any], lock: bool = True) -> array.array[Any]:  # noqa: N802
    """A plain :class:`array.array` (threads share memory already)."""
    return array.array(typecode, sequence)


class Value:
    """A boxed value with ``.value``, like a shared ctypes Value."""

    def __init__(self, typecode: str, value: Any, lock: bool = True) -> None:
        self._typecode = typecode
        self._value = value

    @property
    def value(self) -> Any:
        return self._value

    @value.setter
    def value(self, value: Any) -> None:
        self._value = value

    def __repr__(self) -> str:
        return f"<{type(self).__name__}({self._typecode!r}, {self._value!r})>"


def Manager() -> Any:  # noqa: N802
    """Threads need no server: the "manager" is this module itself."""
    import sys

    return sys.modules[__name__]


def shutdown() -> None:
    """Nothing to shut down for threads."""


def Pool(processes: int | None = None, initializer: Callable[..., Any] | None = None,  # noqa: N802
         initargs: Iterable[Any] = ()) -> Any:
    """A pool of worker threads (:class:`manyproc.pool.ThreadPool`)."""
    from manyproc.pool import ThreadPool

    return ThreadPool(processes, initializer, initargs)


