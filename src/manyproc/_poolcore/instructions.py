"""Instructions: what the pool core asks its driver to do.

``PoolCore.handle()`` returns them as a list; the driver carries them out in that order.
Each carries the ``stimulus_id`` of the event that led to it. Instructions to a worker
are never addressed to a worker the core knows has exited.

To workers (the driver owns the transport)::

    SpawnWorker(worker_id, slot)    start a worker; answer WorkerStarted/WorkerReady, and
                                    eventually exactly one WorkerExited
    SendTask(worker_id, task_id,    give the task to the worker; it runs its tasks in the
             job_id, start, items)  order sent and answers each with TaskDone (or
                                    TaskSkipped after a RevokeTask)
    RevokeTask(worker_id, task_id)  the worker should skip this task if it has not begun
                                    it (best effort: its result is dropped either way)
    StopWorker(worker_id, reason)   exit once idle (a graceful sentinel)
    KillWorker(worker_id, reason)   kill it now (SIGKILL or what the backend has)

To faces (the callers' futures and iterators)::

    RequestInput(job_id, count)     read up to ``count`` more items and FeedInput them
    DeliverResults(job_id, ...)     results of items [start, stop) of a streaming job
    JobProgress(job_id, done, total)
    ResolveJob(job_id, outcome)     the job's one and only final word

And once::

    PoolStopped()                   no worker is left and none will be started
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "Outcome", "Reason",
    "Instruction", "SpawnWorker", "SendTask", "RevokeTask", "StopWorker", "KillWorker",
    "RequestInput", "DeliverResults", "JobProgress", "ResolveJob", "PoolStopped",
]


class Outcome(enum.Enum):
    """How a job ended."""

    __hash__ = object.__hash__  # members are singletons: hash them at C speed

    OK = "ok"
    ERROR = "error"
    CANCELLED = "cancelled"


class Reason(enum.Enum):
    """Why a worker is stopped or killed."""

    __hash__ = object.__hash__  # members are singletons: hash them at C speed

    TIMEOUT = "timeout"
    """It ran a task past its task_timeout."""
    CANCELLED = "cancelled"
    """It ran a task whose job was cancelled with CancelMode.KILL."""
    CANCEL_ALL = "cancel_all"
    """Everything was cancelled (Ctrl-C)."""
    TERMINATE = "terminate"
    """The pool was terminated."""
    BROKEN = "broken"
    """The pool broke (workers kept failing to start)."""
    RECYCLE = "recycle"
    """It ran its maxtasksperchild tasks."""
    CLOSE = "close"
    """The pool was closed and has no work left."""
    STOP_TIMEOUT = "stop_timeout"
    """It was told to stop (or its initializer failed) and did not exit in time."""
    START_TIMEOUT = "start_timeout"
    """It was not ready within start_timeout."""


@dataclass(slots=True, kw_only=True)
class Instruction:
    """Base of all instructions: the stimulus that led to it."""

    stimulus_id: str = ""


@dataclass(slots=True, kw_only=True)
class SpawnWorker(Instruction):
    """Start a new worker; ``slot`` (0..processes-1) is the place it takes in the pool."""

    worker_id: int
    slot: int


@dataclass(slots=True, kw_only=True)
class SendTask(Instruction):
    """Send a task to a worker: run the job's function over ``items`` (item ``i`` of the
    task is item ``start + i`` of the job's input)."""

    worker_id: int
    task_id: int
    job_id: int
    start: int
    items: Sequence[object]


@dataclass(slots=True, kw_only=True)
class RevokeTask(Instruction):
    """Tell the worker to skip a task it was sent and has not begun."""

    worker_id: int
    task_id: int


@dataclass(slots=True, kw_only=True)
class StopWorker(Instruction):
    """Ask a worker to exit; it holds no task."""

    worker_id: int
    reason: Reason


@dataclass(slots=True, kw_only=True)
class KillWorker(Instruction):
    """Kill a worker now. Whatever it held has already been resolved or handed back.

    ``timed_out`` is the error a task that ran too long failed with: a backend that can
    ask the worker where it is stuck adds that to it before the kill.
    """

    worker_id: int
    reason: Reason
    timed_out: BaseException | None = None


@dataclass(slots=True, kw_only=True)
class RequestInput(Instruction):
    """Read up to ``count`` more input items of a lazy job and send them with FeedInput."""

    job_id: int
    count: int


@dataclass(slots=True, kw_only=True)
class DeliverResults(Instruction):
    """Results of items ``start`` to ``stop - 1`` of a streaming job.

    ``values`` holds the results from ``start`` on. If ``error`` is set, it stands at
    position ``start + len(values)``, and the remaining items up to ``stop`` have no
    result (they were in the same chunk as the failing one). For ``IMAP`` deliveries come
    in input order without gaps; for ``IMAP_UNORDERED`` in completion order.
    """

    job_id: int
    start: int
    stop: int
    values: Sequence[object]
    error: BaseException | None = None


@dataclass(slots=True, kw_only=True)
class JobProgress(Instruction):
    """``done`` items of the job are finished (successfully or not) out of ``total``
    (``None`` while a lazy input has not ended)."""

    job_id: int
    done: int
    total: int | None


@dataclass(slots=True, kw_only=True)
class ResolveJob(Instruction):
    """The job's final outcome; sent exactly once per job.

    ``OK``: ``value`` is the result (``APPLY``), the list of results (``MAP``) or ``None``
    (streaming jobs: the stream ended). ``ERROR``: ``error`` is the exception.
    ``CANCELLED``: neither.
    """

    job_id: int
    outcome: Outcome
    value: object = None
    error: BaseException | None = None


@dataclass(slots=True, kw_only=True)
class PoolStopped(Instruction):
    """The pool is closed, terminated or broken and its last worker exited."""
