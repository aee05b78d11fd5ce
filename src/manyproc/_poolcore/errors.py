"""Exceptions of the pool core.

Two kinds, kept apart on purpose (the "you broke it" / "the world broke it" split)::

    RuntimeError
    └── PoolCoreError              the driver broke the core's protocol, or the core found
        │                          itself inconsistent: a bug, never the user's doing
        └── InvalidTransition      a task was asked to move between two states that are
                                   not linked; carries the task's story

    ProcessError (manyproc)
    ├── BrokenPoolError            workers kept dying before they were ready: the pool
    │                              gave up instead of restarting them forever
    │                              (also concurrent.futures.BrokenExecutor)
    └── PoolClosedError            work was submitted to a closed or terminated pool
                                   (also ValueError, like Pool's "Pool not running",
                                   and RuntimeError, like an executor after shutdown)

A driver that catches ``PoolCoreError`` must treat the pool as lost: kill every worker
and fail every job, since the core's bookkeeping can no longer be trusted.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import BrokenExecutor

from manyproc._errors import ProcessError, describe_exitcode

__all__ = ["PoolCoreError", "InvalidTransition", "BrokenPoolError", "PoolClosedError"]


class PoolCoreError(RuntimeError):
    """The pool core's protocol was broken (a driver bug) or its state is inconsistent."""


class InvalidTransition(PoolCoreError):
    """A task was told to move to a state it cannot reach from where it is.

    Attributes:
        task_id: the task.
        start: the state it was in (its name).
        finish: the state it was asked to enter (its name).
        story: the task's past moves as ``(now, stimulus_id, state name)`` tuples.
    """

    def __init__(self, task_id: int, start: str, finish: str,
                 story: Sequence[tuple[float, str, str]]) -> None:
        self.task_id = task_id
        self.start = start
        self.finish = finish
        self.story = tuple(story)
        lines = "\n".join(f"    t={now:.6f} [{stim}] -> {state}" for now, stim, state in story)
        super().__init__(
            f"pool core bug: task {task_id} cannot go from {start} to {finish}. "
            f"Its story so far:\n{lines or '    (empty)'}\n"
            "Please report this with the story above; the pool must be terminated."
        )


class BrokenPoolError(ProcessError, BrokenExecutor):
    """Workers kept exiting before they were ready, so the pool stopped replacing them.

    Every job that was still pending fails with this error. When a worker's initializer
    raised, that exception is the ``__cause__``.

    Attributes:
        failures: how many workers in a row failed to start.
        exitcode: how the last of them ended (``None`` if unknown or it never started).
    """

    def __init__(self, message: str | None = None, *, failures: int = 0,
                 exitcode: int | None = None, detail: str = "") -> None:
        self.failures = failures
        self.exitcode = exitcode
        if message is None:
            how = detail or (f"the last one {describe_exitcode(exitcode)}"
                             if exitcode is not None else "the last one could not be started")
            message = (
                f"the pool is broken: {failures} worker processes in a row ended before they "
                f"were ready to take tasks ({how}). Pending work was failed instead of "
                "restarting workers forever. Check the initializer (run it once in the parent "
                "to see it fail) and that a worker can start at all, then create a new pool."
            )
        super().__init__(message)

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_broken, (self.args[0] if self.args else None, self.failures,
                                  self.exitcode))


def _rebuild_broken(message: str | None, failures: int, exitcode: int | None) -> BrokenPoolError:
    return BrokenPoolError(message, failures=failures, exitcode=exitcode)


class PoolClosedError(ProcessError, ValueError, RuntimeError):
    """Work was submitted after the pool was closed or terminated."""


# Tracebacks and pickles name these by their public home (manyproc loads them lazily).
BrokenPoolError.__module__ = "manyproc"
PoolClosedError.__module__ = "manyproc"
