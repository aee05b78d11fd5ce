"""The states of tasks, workers and the pool, and which moves between them are legal.

Every state change in the core goes through one of the tables here (the core never
assigns a ``state`` attribute without checking it), so the tables *are* the state
machine: to learn what can happen to a task, read ``TASK_MOVES``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

__all__ = [
    "TaskState", "WorkerState", "PoolState",
    "TASK_MOVES", "WORKER_MOVES", "POOL_MOVES",
    "TASK_TERMINAL", "TASK_UNRESOLVED", "TASK_ON_WORKER",
]


class TaskState(enum.Enum):
    """Where one task (one chunk of a job's input) is in its life."""

    __hash__ = object.__hash__  # members are singletons: hash them at C speed

    QUEUED = "queued"
    """Cut from its job's input, or handed back after a worker went away; waits for a worker."""
    SENT = "sent"
    """In a worker's line behind the task that worker runs (prefetched): not started yet."""
    RUNNING = "running"
    """At the head of its worker's line: the worker is executing it."""
    ABANDONED = "abandoned"
    """Its job was cancelled or gave up on it, but a worker still holds it; its result will
    be dropped. It leaves the worker when the worker reports it or dies."""
    DONE = "done"
    """The worker reported it: its results, or the exception the function raised."""
    FAILED = "failed"
    """The pool failed it: its worker died or was killed for a timeout, or it could not be
    sent."""
    CANCELLED = "cancelled"
    """Cancelled before it ran, or its worker was killed to cancel it."""
    DROPPED = "dropped"
    """An abandoned task left its worker."""


T = TaskState
TASK_MOVES: Mapping[TaskState, frozenset[TaskState]] = {
    T.QUEUED: frozenset({T.SENT, T.RUNNING, T.CANCELLED}),
    T.SENT: frozenset({T.RUNNING, T.QUEUED, T.ABANDONED, T.CANCELLED, T.FAILED}),
    # RUNNING -> QUEUED: handed back when its worker was killed for someone else's sake
    # (terminate, cancel-all) or when a lost task is retried.
    T.RUNNING: frozenset({T.DONE, T.FAILED, T.CANCELLED, T.ABANDONED, T.QUEUED}),
    T.ABANDONED: frozenset({T.DROPPED}),
    T.DONE: frozenset(),
    T.FAILED: frozenset(),
    T.CANCELLED: frozenset(),
    T.DROPPED: frozenset(),
}
TASK_TERMINAL = frozenset(s for s, nxt in TASK_MOVES.items() if not nxt)
#: states in which a task still owes its job an outcome
TASK_UNRESOLVED = frozenset({T.QUEUED, T.SENT, T.RUNNING})
#: states in which a task sits in some worker's line
TASK_ON_WORKER = frozenset({T.SENT, T.RUNNING, T.ABANDONED})
del T


class WorkerState(enum.Enum):
    """Where one worker (one process, thread or remote slot) is in its life."""

    __hash__ = object.__hash__  # members are singletons: hash them at C speed

    SPAWNING = "spawning"
    """Asked for (``SpawnWorker``); the driver has not reported it started yet."""
    STARTING = "starting"
    """Started (its pid is known) and running its initializer."""
    READY = "ready"
    """Takes tasks."""
    STOPPING = "stopping"
    """Asked to exit when done (``StopWorker``), or its initializer failed; no more tasks."""
    KILLING = "killing"
    """Asked to be killed (``KillWorker``); everything it held was already dealt with."""
    EXITED = "exited"
    """Gone; the core forgets it right after this move."""


W = WorkerState
WORKER_MOVES: Mapping[WorkerState, frozenset[WorkerState]] = {
    W.SPAWNING: frozenset({W.STARTING, W.READY, W.STOPPING, W.KILLING, W.EXITED}),
    W.STARTING: frozenset({W.READY, W.STOPPING, W.KILLING, W.EXITED}),
    W.READY: frozenset({W.STOPPING, W.KILLING, W.EXITED}),
    W.STOPPING: frozenset({W.KILLING, W.EXITED}),
    W.KILLING: frozenset({W.EXITED}),
    W.EXITED: frozenset(),
}
del W


class PoolState(enum.Enum):
    """What the user did to the pool, or what happened to it."""

    __hash__ = object.__hash__  # members are singletons: hash them at C speed

    RUNNING = "running"
    """Takes new jobs."""
    CLOSED = "closed"
    """Takes no new jobs; finishes the ones it has, then stops its workers."""
    TERMINATED = "terminated"
    """Every pending job was cancelled or failed and every worker killed."""
    BROKEN = "broken"
    """Workers kept failing to start; every pending job failed with ``BrokenPoolError``."""


P = PoolState
POOL_MOVES: Mapping[PoolState, frozenset[PoolState]] = {
    P.RUNNING: frozenset({P.CLOSED, P.TERMINATED, P.BROKEN}),
    P.CLOSED: frozenset({P.TERMINATED, P.BROKEN}),
    P.BROKEN: frozenset(),
    P.TERMINATED: frozenset(),
}
del P
