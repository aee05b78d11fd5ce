"""Read-only snapshots the pool core hands out: progress, statistics and its story."""

from __future__ import annotations

from dataclasses import dataclass

from .states import PoolState, WorkerState

__all__ = ["Progress", "WorkerStatistics", "PoolStatistics", "StoryEntry"]


@dataclass(frozen=True, slots=True)
class Progress:
    """Items of one job finished (successfully or not) out of the total, for a progress bar.

    ``total`` is ``None`` while a lazy input has not ended.
    """

    done: int
    total: int | None


@dataclass(frozen=True, slots=True)
class WorkerStatistics:
    """One place (slot) of the pool, summed over every worker that has filled it.

    Attributes:
        slot: the place, 0 to processes-1.
        worker_id: the worker filling it now, or ``None`` while it is being replaced.
        pid: that worker's process id, when the driver told it.
        state: that worker's state, or ``None``.
        tasks_done: tasks finished here (the function returned or raised).
        items_done: items in those tasks.
        busy_time: seconds spent running tasks here, the running one included.
        restarts: workers replaced here after they died or were killed.
        recycles: workers replaced here after maxtasksperchild tasks.
        tasks_lost: tasks that failed here because their worker died.
        tasks_timed_out: tasks that failed here for running past their timeout.
        current_task: the task running here now, if any.
    """

    slot: int
    worker_id: int | None
    pid: int | None
    state: WorkerState | None
    tasks_done: int
    items_done: int
    busy_time: float
    restarts: int
    recycles: int
    tasks_lost: int
    tasks_timed_out: int
    current_task: int | None


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    """A snapshot of the whole pool (``Pool.statistics()`` is built from it).

    Task counts are cumulative since the pool started, except ``tasks_queued``,
    ``tasks_running``, ``items_buffered`` and ``jobs_pending`` (now).
    """

    state: PoolState
    processes: int
    workers: tuple[WorkerStatistics, ...]
    jobs_pending: int
    items_buffered: int
    tasks_queued: int
    tasks_running: int
    tasks_done: int
    tasks_failed: int
    tasks_lost: int
    tasks_timed_out: int
    tasks_cancelled: int
    workers_spawned: int
    workers_lost: int
    workers_recycled: int
    start_failures: int


@dataclass(frozen=True, slots=True)
class StoryEntry:
    """One line of the core's story: at ``now``, because of ``stimulus_id``, ``subject``
    (e.g. ``"task 7"``, ``"worker 2"``, ``"job 3"``, ``"pool"``) did ``action``."""

    now: float
    stimulus_id: str
    subject: str
    action: str
