"""Exceptions raised by manyproc.

The tree keeps every standard ``except`` clause working::

    Exception
    └── ProcessError                       (multiprocessing.ProcessError)
        ├── BufferTooShort                 message larger than the caller's buffer
        ├── AuthenticationError            the peer failed the HMAC challenge
        ├── TimeoutError                   a wait ran out (AsyncResult.get(timeout))
        │   └── TaskTimeoutError           a task ran past task_timeout (also builtin TimeoutError)
        ├── WorkerLostError                a worker died holding a task; also BrokenExecutor

Messages are built in ``__init__`` from the data attributes, so that an exception
rebuilt in another process (or raised with keyword data) reads the same.
"""

from __future__ import annotations

import builtins
import signal
from concurrent.futures import BrokenExecutor

TYPE_CHECKING = False  # typing costs import time in every child; only checkers need it
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "ProcessError",
    "BufferTooShort",
    "AuthenticationError",
    "TimeoutError",
    "TaskTimeoutError",
    "WorkerLostError",
]


class ProcessError(Exception):
    """Base class of the errors manyproc raises itself."""


class BufferTooShort(ProcessError):
    """A received message did not fit the buffer; ``args[0]`` holds the whole message."""


class AuthenticationError(ProcessError):
    """The peer did not prove it holds the same authkey."""


class TimeoutError(ProcessError):  # noqa: A001 - the standard library's name
    """A wait with a timeout expired before the result was ready."""


def describe_exitcode(exitcode: int | None) -> str:
    """Say in words how a process ended, e.g. ``killed by SIGKILL`` or ``exited with code 3``."""
    if exitcode is None:
        return "is still running"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"was killed by {name}"
    return f"exited with code {exitcode}"


_DEATH_HINTS = {
    -signal.SIGKILL: "SIGKILL usually means the out-of-memory killer or a user's kill -9",
    -signal.SIGSEGV: "SIGSEGV is a crash in C code (an extension module or ctypes)",
    -signal.SIGABRT: "SIGABRT is an abort() in C code or a failed C assertion",
    -signal.SIGTERM: "SIGTERM means something asked the worker to stop",
}


class WorkerLostError(ProcessError, BrokenExecutor):
    """A worker process died while it held a task; the task failed, the pool goes on.

    Attributes:
        exitcode: the worker's exit code, negative for a signal number.
        pid: the worker's process id.
        task: a short description of the task the worker held (may be ``None``).
        signal_name: e.g. ``'SIGKILL'`` when the worker was killed by a signal.
        crash_report: what the worker's fault handler wrote as it crashed (the Python
            stack of every thread at a segfault, an abort...), or ``None``.
    """

    def __init__(
        self,
        message: str | None = None,
        *,
        exitcode: int | None = None,
        pid: int | None = None,
        task: Any = None,
        crash_report: str | None = None,
    ) -> None:
        self.exitcode = exitcode
        self.pid = pid
        self.task = task
        self.crash_report = crash_report
        self.signal_name: str | None = None
        if exitcode is not None and exitcode < 0:
            try:
                self.signal_name = signal.Signals(-exitcode).name
            except ValueError:
                self.signal_name = f"signal {-exitcode}"
        if message is None:
            how = ("ended (its exit status is unknown)" if exitcode is None
                   else describe_exitcode(exitcode))
            message = (
                f"worker process (pid {pid}) {how} while running "
                f"{task if task is not None else 'a task'}"
            )
            hint = _DEATH_HINTS.get(exitcode) if exitcode is not None else None
            if hint:
                message += f"; {hint}"
            message += ". The task failed; the pool replaced the worker and goes on."
            if crash_report:
                message += f"\nThe worker's fault handler reported:\n{crash_report.rstrip()}"
        super().__init__(message)

    def __reduce__(self) -> Any:
        return (_rebuild_worker_lost, (self.args[0] if self.args else None, self.exitcode,
                                       self.pid, self.task, self.crash_report))


def _rebuild_worker_lost(message: str | None, exitcode: int | None, pid: int | None,
                         task: Any, crash_report: str | None = None) -> WorkerLostError:
    return WorkerLostError(message, exitcode=exitcode, pid=pid, task=task,
                           crash_report=crash_report)


class TaskTimeoutError(TimeoutError, builtins.TimeoutError):
    """A task ran longer than its ``task_timeout``; its worker was killed and replaced.

    It is both ``manyproc.TimeoutError`` and the builtin ``TimeoutError``
    (which ``concurrent.futures.TimeoutError`` is on Python 3.11+).

    Attributes:
        timeout, task, pid: the limit, the task that passed it, its worker's pid.
        worker_stack: where the worker was stuck when it was killed (the Python stack
            of each of its threads), if the pool could ask it; else ``None``.
    """

    def __init__(self, message: str | None = None, *, timeout: float | None = None,
                 task: Any = None, pid: int | None = None) -> None:
        self.timeout = timeout
        self.task = task
        self.pid = pid
        self.worker_stack: str | None = None
        if message is None:
            fate = (f"its worker (pid {pid}) was killed and replaced" if pid is not None else
                    "its worker was replaced (a worker thread cannot be killed: it finishes "
                    "the call in the background, its result dropped)")
            message = (
                f"{task if task is not None else 'task'} ran longer than its "
                f"task_timeout of {timeout} s; {fate}. "
                "Raise task_timeout= if the task needs more time."
            )
        Exception.__init__(self, message)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""

    def add_worker_stack(self, stack: str) -> None:
        """Record where the worker was stuck, and show it in the message."""
        self.worker_stack = stack
        self.args = (f"{self.args[0] if self.args else ''}\nWhere the worker was stuck:\n"
                     f"{stack.rstrip()}",)

    def __reduce__(self) -> Any:
        return (_rebuild_task_timeout, (self.args[0] if self.args else None, self.timeout,
                                        self.task, self.pid, self.worker_stack))


def _rebuild_task_timeout(message: str | None, timeout: float | None, task: Any,
                          pid: int | None, worker_stack: str | None = None) -> TaskTimeoutError:
    error = TaskTimeoutError(message, timeout=timeout, task=task, pid=pid)
    error.worker_stack = worker_stack
    return error


# Tracebacks and pickles name these by their public home.
for _public in (ProcessError, BufferTooShort, AuthenticationError, TimeoutError,
                TaskTimeoutError, WorkerLostError):
    _public.__module__ = "manyproc"
del _public
