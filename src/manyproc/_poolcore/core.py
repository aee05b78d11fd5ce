"""``PoolCore``: the scheduling state machine every pool runs on (see the package docstring).

Reading guide: ``handle()`` applies each event through one ``_on_*`` method, then
``_settle()`` does the work that follows from the new state (deadlines, dispatch, input
requests, spawning, shutdown). Every task move goes through ``_move()`` and every worker
move through ``_move_worker()``, both checked against the tables in ``states.py``.
"""

from __future__ import annotations

import enum
import heapq
import itertools
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, final

from manyproc._errors import TaskTimeoutError, WorkerLostError, describe_exitcode

from .chunking import TARGET_SECONDS, ChunkSizer
from .errors import BrokenPoolError, InvalidTransition, PoolClosedError, PoolCoreError
from .events import (
    CancelAll,
    CancelJob,
    CancelMode,
    Close,
    Consumed,
    Event,
    FeedInput,
    InputFailed,
    JobKind,
    JobSpec,
    ReleaseWindow,
    RetireWorker,
    SendFailed,
    Start,
    SubmitJob,
    TaskDone,
    TaskProgress,
    TaskSkipped,
    TaskStarted,
    Terminate,
    Tick,
    WorkerExited,
    WorkerInitFailed,
    WorkerReady,
    WorkerStarted,
)
from .instructions import (
    DeliverResults,
    Instruction,
    JobProgress,
    KillWorker,
    Outcome,
    PoolStopped,
    Reason,
    RequestInput,
    ResolveJob,
    RevokeTask,
    SendTask,
    SpawnWorker,
    StopWorker,
)
from .states import (
    POOL_MOVES,
    TASK_MOVES,
    TASK_ON_WORKER,
    TASK_UNRESOLVED,
    WORKER_MOVES,
    PoolState,
    TaskState,
    WorkerState,
)
from .stats import PoolStatistics, Progress, StoryEntry, WorkerStatistics

__all__ = ["PoolConfig", "PoolCore"]

_QUEUED, _SENT, _RUNNING = TaskState.QUEUED, TaskState.SENT, TaskState.RUNNING
_ABANDONED, _DONE, _FAILED = TaskState.ABANDONED, TaskState.DONE, TaskState.FAILED
_CANCELLED, _DROPPED = TaskState.CANCELLED, TaskState.DROPPED
_LIVE_WORKER = frozenset({WorkerState.SPAWNING, WorkerState.STARTING, WorkerState.READY})
_TO_WORKER = (SendTask, RevokeTask, StopWorker, KillWorker)
_ONE_ITEM = ChunkSizer(1, n_workers=1)
_STREAMING = frozenset({JobKind.IMAP, JobKind.IMAP_UNORDERED})


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolConfig:
    """Settings of one pool's core.

    Attributes:
        processes: number of worker places (slots); the core keeps one worker per slot.
        maxtasksperchild: tasks a worker runs before it is replaced (``None``: forever).
        prefetch: tasks a busy worker may hold beyond the one it runs, to hide the round
            trip between tasks. 0 keeps every queued task in the core, where it can still
            go to whichever worker frees up first and be cancelled cleanly.
        deep_prefetch: the same, for tasks measured to take at most
            ``short_task_seconds`` (per task, smoothed per job; pool-wide for APPLY jobs):
            a deep line of tiny tasks lets the driver batch messages. Ignored unless
            larger than ``prefetch``.
        short_task_seconds: see ``deep_prefetch``.
        batch_target_seconds: work to aim for in one task of a job that allows batching
            (``JobSpec.batch_limit``).
        eager_spawn: start every worker at ``Start`` (``Pool``); if false, start workers
            only when queued work has none free to take it (``ProcessPoolExecutor``).
        max_start_failures: this many workers in a row ending before they are ready
            breaks the pool (``BrokenPoolError``) rather than restarting them forever.
        lost_task_retries: times a task whose worker died is given to another worker
            before it fails with ``WorkerLostError`` (0: fail at once).
        start_timeout: seconds a worker may take to become ready before it is killed
            (it then counts as a start failure). ``None``: no limit.
        stop_timeout: seconds a stopped worker may take to exit before it is killed.
        chunk_target_seconds: work to aim for in one adaptive chunk.
        max_chunksize: cap for adaptive chunks (default: ``chunking.DEFAULT_MAX_CHUNKSIZE``).
        default_window: ``max_in_flight`` of lazily fed jobs that do not set one
            (default: twice the number of tasks the workers can hold).
        story_length: story entries kept for debugging (0 keeps none).
    """

    processes: int
    maxtasksperchild: int | None = None
    prefetch: int = 0
    deep_prefetch: int = 0
    short_task_seconds: float = 0.002
    batch_target_seconds: float = 0.001
    eager_spawn: bool = True
    max_start_failures: int = 3
    lost_task_retries: int = 0
    start_timeout: float | None = None
    stop_timeout: float | None = 10.0
    chunk_target_seconds: float = TARGET_SECONDS
    max_chunksize: int | None = None
    default_window: int | None = None
    story_length: int = 10_000

    def __post_init__(self) -> None:
        for name, low, allow_none in (
            ("processes", 1, False), ("maxtasksperchild", 1, True), ("prefetch", 0, False),
            ("deep_prefetch", 0, False),
            ("max_start_failures", 1, False), ("lost_task_retries", 0, False),
            ("max_chunksize", 1, True), ("default_window", 1, True), ("story_length", 0, False),
        ):
            value = getattr(self, name)
            if value is None and allow_none:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                more = " or None" if allow_none else ""
                raise ValueError(f"PoolConfig.{name} must be an int >= {low}{more}, "
                                 f"not {value!r}")
        for name in ("start_timeout", "stop_timeout", "chunk_target_seconds",
                     "short_task_seconds", "batch_target_seconds"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"PoolConfig.{name} must be a positive number of seconds, "
                                 f"not {value!r}")


# --- the core's private records ---------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Slot:
    index: int
    worker: _Worker | None = None
    replace_as: str = ""  # "restart" or "recycle": how to count the next worker placed here
    tasks_done: int = 0
    items_done: int = 0
    busy_time: float = 0.0
    restarts: int = 0
    recycles: int = 0
    tasks_lost: int = 0
    tasks_timed_out: int = 0


@dataclass(slots=True, eq=False)
class _Worker:
    worker_id: int
    slot: _Slot
    spawned_at: float
    state: WorkerState = WorkerState.SPAWNING
    pid: int | None = None
    line: deque[_Task] = field(default_factory=deque)  # head runs; the rest wait, in order
    assigned: int = 0
    ready: bool = False
    stop_deadline: float | None = None
    init_error: BaseException | None = None
    start_timed_out: bool = False
    retiring: bool = False
    crash_report: str | None = None


@dataclass(slots=True, eq=False)
class _Task:
    task_id: int
    job: _Job
    start: int
    count: int
    items: Sequence[object]
    state: TaskState = TaskState.QUEUED
    worker: _Worker | None = None
    started_at: float | None = None
    deadline: float | None = None
    attempts: int = 0


@dataclass(slots=True, eq=False)
class _Chunk:
    """Results of items [start, stop) waiting for their turn, or being delivered."""

    start: int
    stop: int
    values: Sequence[object]
    error: BaseException | None
    holds_slot: bool  # whether delivering it frees a place in the job's window


@dataclass(slots=True, eq=False)
class _Job:
    job_id: int
    seq: int
    spec: JobSpec
    sizer: ChunkSizer
    window: int | None
    segments: deque[tuple[Sequence[object], int]] = field(default_factory=deque)
    buffered: int = 0  # items fed and not yet cut into tasks
    fed: int = 0  # items fed so far (the index the next fed item gets)
    cut: int = 0  # items cut into tasks so far
    exhausted: bool = False
    requested: int = 0  # items asked for with RequestInput and not yet fed
    retry: list[tuple[int, int, _Task]] = field(default_factory=list)  # heap of QUEUED tasks
    live: dict[int, _Task] = field(default_factory=dict)  # tasks that owe an outcome
    unreleased: int = 0  # tasks cut and not yet released (the window's measure)
    unacked: deque[bool] = field(default_factory=deque)  # deliveries awaiting Consumed
    acks_off: bool = False  # ReleaseWindow: deliveries release their task at once
    done_items: int = 0
    dispatched: bool = False
    resolved: bool = False
    results: dict[int, Sequence[object]] = field(default_factory=dict)  # MAP/APPLY: start ->
    held: dict[int, _Chunk] = field(default_factory=dict)  # IMAP: start -> waiting chunk
    next_start: int = 0  # IMAP: position of the next delivery
    task_seconds: float | None = None  # smoothed run time of one task (for deep prefetch)


@dataclass(slots=True)
class _Counters:
    tasks_done: int = 0
    tasks_failed: int = 0
    tasks_lost: int = 0
    tasks_timed_out: int = 0
    tasks_cancelled: int = 0
    workers_spawned: int = 0
    workers_lost: int = 0
    workers_recycled: int = 0
    start_failures: int = 0


# --- the core -----------------------------------------------------------------------------


@final
class PoolCore:
    """The scheduling state of one pool, driven by events, answering with instructions.

    Not thread-safe: the driver serialises every call (one thread, or one lock around
    ``handle()`` and the queries).
    """

    def __init__(self, config: PoolConfig) -> None:
        """Create the core of a pool; nothing happens until ``handle(Start(...))``.

        Args:
            config: the pool's settings.
        """
        self.config = config
        self._state = PoolState.RUNNING
        self._started = False
        self._stopped = False
        self._now = 0.0
        self._stimulus = ""
        self._out: list[Instruction] = []
        self._exited_now: set[int] = set()
        self._jobs: dict[int, _Job] = {}
        self._job_seq = itertools.count()
        self._ready_heap: list[tuple[int, int]] = []  # (job seq, job id): may have work
        self._ready_seqs: set[int] = set()
        self._lazy: dict[int, _Job] = {}  # jobs whose input has not ended
        self._tasks: dict[int, _Task] = {}  # tasks queued or held by a worker
        self._task_ids = itertools.count(1)
        self._workers: dict[int, _Worker] = {}
        self._worker_ids = itertools.count(1)
        self._slots = [_Slot(i) for i in range(config.processes)]
        self._vacant = config.processes  # slots with no live worker
        self._idle: dict[int, _Worker] = {}  # ready, empty line, quota left; oldest first
        self._start_failures = 0  # in a row, reset by any WorkerReady
        self._last_start_failure: tuple[int | None, BaseException | None] = (None, None)
        self._last_init_error: BaseException | None = None
        self._default_window = config.default_window or 2 * config.processes * (
            1 + max(config.prefetch, config.deep_prefetch))
        self._counters = _Counters()
        self._story: deque[tuple[float, str, str, int, str, tuple[object, ...]]] | None = (
            deque(maxlen=config.story_length) if config.story_length else None)
        self._timed = False  # a job had a task_timeout: task deadlines must be checked
        self._apply_seconds: float | None = None  # smoothed run time of APPLY tasks
        self._stopping = 0  # workers in STOPPING: stop deadlines to check
        self._handlers: dict[type, Callable[[Any], None]] = {
            TaskDone: self._on_task_done, FeedInput: self._on_feed, SubmitJob: self._on_submit,
            Consumed: self._on_consumed, Tick: self._on_tick,
            TaskStarted: self._on_task_started, TaskProgress: self._on_task_progress,
            WorkerReady: self._on_worker_ready, WorkerStarted: self._on_worker_started,
            WorkerExited: self._on_worker_exited, WorkerInitFailed: self._on_init_failed,
            RetireWorker: self._on_retire, TaskSkipped: self._on_task_skipped,
            SendFailed: self._on_send_failed, InputFailed: self._on_input_failed,
            CancelJob: self._on_cancel_job, ReleaseWindow: self._on_release_window,
            CancelAll: self._on_cancel_all, Close: self._on_close,
            Terminate: self._on_terminate, Start: self._on_start,
        }

    # --- public surface -------------------------------------------------------------------

    def handle(self, *events: Event) -> list[Instruction]:
        """Apply events in order and return what the driver must now do, in order.

        Raises:
            PoolCoreError: an event broke the protocol (e.g. a result from a worker for a
                task it was not running), or the core found a bug in itself. This is
                fatal: instructions of earlier events in the same call are not returned,
                and the driver must terminate the pool without the core's help.
        """
        for event in events:
            if event.now > self._now:
                self._now = event.now
            self._stimulus = event.stimulus_id
            self._apply(event)
        self._settle()
        out, self._out = self._out, []
        if self._exited_now:
            gone, self._exited_now = self._exited_now, set()
            out = [i for i in out if not (isinstance(i, _TO_WORKER) and i.worker_id in gone)]
        return out

    @property
    def state(self) -> PoolState:
        """RUNNING, CLOSED, TERMINATED or BROKEN."""
        return self._state

    @property
    def accepting(self) -> bool:
        """Whether a ``SubmitJob`` now would be accepted (faces check this first)."""
        return self._state is PoolState.RUNNING

    @property
    def stopped(self) -> bool:
        """Whether ``PoolStopped`` was emitted: no worker is left and none will start."""
        return self._stopped

    @property
    def now(self) -> float:
        """The latest time the core was told."""
        return self._now

    def broken_error(self) -> BrokenPoolError | None:
        """A fresh exception saying why the pool broke, or ``None`` if it did not."""
        if self._state is not PoolState.BROKEN:
            return None
        return self._new_broken_error()

    def next_deadline(self) -> float | None:
        """The earliest time at which the core wants a ``Tick``, or ``None``."""
        if not (self._timed or self._stopping or self.config.start_timeout is not None):
            return None  # nothing in the pool can come due
        best: float | None = None
        start_timeout = self.config.start_timeout
        for w in self._workers.values():
            when: float | None = None
            if w.state is WorkerState.READY and w.line:
                when = w.line[0].deadline
            elif w.state is WorkerState.STOPPING:
                when = w.stop_deadline
            elif start_timeout is not None and w.state in (WorkerState.SPAWNING,
                                                            WorkerState.STARTING):
                when = w.spawned_at + start_timeout
            if when is not None and (best is None or when < best):
                best = when
        return best

    def has_job(self, job_id: int) -> bool:
        """Whether the core still tracks this job (unresolved, or finishing its tasks)."""
        return job_id in self._jobs

    def job_started(self, job_id: int) -> bool:
        """Whether any task of the job was ever sent to a worker (False if unknown)."""
        job = self._jobs.get(job_id)
        return job is not None and job.dispatched

    def progress(self, job_id: int) -> Progress | None:
        """Items of the job finished out of its total, or ``None`` if the job is gone."""
        job = self._jobs.get(job_id)
        if job is None:
            return None
        return Progress(job.done_items, self._total(job))

    def statistics(self) -> PoolStatistics:
        """A snapshot of counters per worker place and for the whole pool."""
        now = self._now
        workers = []
        running = 0
        for slot in self._slots:
            w = slot.worker
            busy = slot.busy_time
            current = None
            head = w.line[0] if w is not None and w.line else None
            if head is not None and head.started_at is not None:
                busy += now - head.started_at
                if head.state is _RUNNING:
                    current = head.task_id
                    running += 1
            workers.append(WorkerStatistics(
                slot=slot.index, worker_id=w.worker_id if w else None,
                pid=w.pid if w else None, state=w.state if w else None,
                tasks_done=slot.tasks_done, items_done=slot.items_done, busy_time=busy,
                restarts=slot.restarts, recycles=slot.recycles, tasks_lost=slot.tasks_lost,
                tasks_timed_out=slot.tasks_timed_out, current_task=current))
        c = self._counters
        return PoolStatistics(
            state=self._state, processes=self.config.processes, workers=tuple(workers),
            jobs_pending=sum(1 for j in self._jobs.values() if not j.resolved),
            items_buffered=sum(j.buffered for j in self._jobs.values()),
            tasks_queued=sum(len(j.retry) for j in self._jobs.values()),
            tasks_running=running, tasks_done=c.tasks_done, tasks_failed=c.tasks_failed,
            tasks_lost=c.tasks_lost, tasks_timed_out=c.tasks_timed_out,
            tasks_cancelled=c.tasks_cancelled, workers_spawned=c.workers_spawned,
            workers_lost=c.workers_lost, workers_recycled=c.workers_recycled,
            start_failures=c.start_failures)

    def story(self, kind: str | None = None, ident: int | None = None, *,
              stimulus_id: str | None = None) -> list[StoryEntry]:
        """What the core remembers having done, oldest first.

        Args:
            kind: keep entries about ``"task"``, ``"job"``, ``"worker"`` or ``"pool"``.
            ident: with ``kind``, keep entries about that one task, job or worker.
            stimulus_id: keep entries caused by that stimulus.
        """
        if self._story is None:
            return []
        return [
            StoryEntry(now, stim, f"{k} {i}" if k != "pool" else "pool",
                       template.format(*(a.value if isinstance(a, enum.Enum) else a
                                         for a in args)))
            for now, stim, k, i, template, args in self._story
            if (kind is None or k == kind) and (ident is None or i == ident)
            and (stimulus_id is None or stim == stimulus_id)
        ]

    def check_invariants(self) -> None:
        """Check the core's bookkeeping against itself (for tests and debugging).

        Raises:
            PoolCoreError: naming the first inconsistency found.
        """
        problems: list[str] = []
        cfg = self.config
        for slot in self._slots:
            w = slot.worker
            if w is not None and (w.slot is not slot or w.state not in _LIVE_WORKER
                                  or self._workers.get(w.worker_id) is not w):
                problems.append(f"slot {slot.index} holds worker {w.worker_id} in {w.state}")
        if self._vacant != sum(1 for slot in self._slots if slot.worker is None):
            problems.append(f"vacant slot count {self._vacant} is off")
        for wid, w in self._workers.items():
            if w.state in _LIVE_WORKER and w.slot.worker is not w:
                problems.append(f"live worker {wid} is not in its slot")
            if len(w.line) > 1 + max(cfg.prefetch, cfg.deep_prefetch):
                problems.append(f"worker {wid} holds {len(w.line)} tasks > 1 + prefetch")
            if cfg.maxtasksperchild is not None and w.assigned > cfg.maxtasksperchild:
                problems.append(f"worker {wid} got {w.assigned} tasks > maxtasksperchild")
            if w.line and w.state is not WorkerState.READY:
                problems.append(f"worker {wid} in {w.state} holds tasks")
            for i, t in enumerate(w.line):
                ok = {_RUNNING, _ABANDONED} if i == 0 else {_SENT, _ABANDONED}
                if t.state not in ok or (t.state is not _ABANDONED and t.worker is not w):
                    problems.append(f"task {t.task_id} in {t.state} at place {i} of worker {wid}")
                if self._tasks.get(t.task_id) is not t:
                    problems.append(f"task {t.task_id} on worker {wid} is not in the task table")
            idle = wid in self._idle
            should = w.state is WorkerState.READY and not w.line and self._quota_left(w)
            if idle != should:
                problems.append(f"worker {wid} idle={idle} but should be {should}")
        for tid, t in self._tasks.items():
            if t.state not in TASK_UNRESOLVED and t.state is not _ABANDONED:
                problems.append(f"task {tid} in {t.state} is still in the task table")
            if t.state in TASK_ON_WORKER and (t.worker is None or t not in t.worker.line):
                problems.append(f"task {tid} in {t.state} is in no worker's line")
            if t.state in TASK_UNRESOLVED and t.job.live.get(tid) is not t:
                problems.append(f"task {tid} in {t.state} is not live in job {t.job.job_id}")
        for jid, job in self._jobs.items():
            if job.window is not None and job.unreleased > job.window and not job.resolved:
                problems.append(f"job {jid} has {job.unreleased} tasks out > window {job.window}")
            if job.buffered != sum(len(s) - off for s, off in job.segments):
                problems.append(f"job {jid} buffered count is off")
            if not job.resolved and job.fed != job.cut + job.buffered:
                problems.append(f"job {jid}: fed {job.fed} != cut {job.cut} + {job.buffered}")
            for tid, t in job.live.items():
                if t.state not in TASK_UNRESOLVED or self._tasks.get(tid) is not t:
                    problems.append(f"job {jid} lists task {tid} in {t.state} as live")
            queued = {t.task_id for _, _, t in job.retry}
            if queued != {tid for tid, t in job.live.items() if t.state is _QUEUED}:
                problems.append(f"job {jid}: queued tasks and the retry heap disagree")
            if job.resolved and (job.buffered or job.retry) and not (
                    job.spec.kind is JobKind.MAP and not job.spec.cancel_on_error):
                problems.append(f"job {jid} is resolved but keeps queued work")
        if problems:
            raise PoolCoreError("pool core inconsistent: " + "; ".join(problems))

    # --- event handlers -------------------------------------------------------------------

    def _apply(self, event: Event) -> None:
        handler = self._handlers.get(type(event))
        if handler is None:
            raise PoolCoreError(f"the pool core does not know the event {event!r}")
        handler(event)

    def _on_tick(self, ev: Tick) -> None:
        pass  # deadlines are checked by _settle()

    def _on_start(self, ev: Start) -> None:
        if not self._started:
            self._started = True
            self._log("pool", 0, "started")

    def _on_submit(self, ev: SubmitJob) -> None:
        if ev.job_id in self._jobs:
            raise PoolCoreError(f"SubmitJob: job id {ev.job_id} is already in use by a pending "
                                "job; the driver must give every job a fresh id")
        spec = ev.spec
        if spec.kind is JobKind.APPLY and (len(ev.items) != 1 or not ev.exhausted):
            raise PoolCoreError(f"SubmitJob: an APPLY job comes with exactly one item and "
                                f"exhausted=True, got {len(ev.items)} items and "
                                f"exhausted={ev.exhausted} (job {ev.job_id})")
        if self._state is not PoolState.RUNNING:
            self._log("job", ev.job_id, "refused: the pool is {}", self._state)
            self._emit(ResolveJob(job_id=ev.job_id, outcome=Outcome.ERROR,
                                  error=self._refusal(), stimulus_id=self._stimulus))
            return
        if spec.kind is JobKind.APPLY:
            self._submit_apply(ev)
            return
        length = len(ev.items) if ev.exhausted else spec.length_hint
        if spec.batch_limit is not None:
            sizer = ChunkSizer(None, n_workers=self.config.processes, length=length,
                               target_seconds=self.config.batch_target_seconds,
                               max_chunksize=spec.batch_limit)
        else:
            sizer = ChunkSizer(spec.chunksize, n_workers=self.config.processes, length=length,
                               target_seconds=self.config.chunk_target_seconds,
                               max_chunksize=self.config.max_chunksize)
        window = spec.max_in_flight
        if window is None and not ev.exhausted:
            window = self._default_window
        job = _Job(job_id=ev.job_id, seq=next(self._job_seq), spec=spec, sizer=sizer,
                   window=window)
        self._jobs[job.job_id] = job
        if spec.task_timeout is not None:
            self._timed = True  # for good: its tasks may outlive the job (abandoned)
        more = "" if ev.exhausted else ", more to come"
        self._log("job", job.job_id, "submitted {} of {} items{}", spec.kind, len(ev.items),
                  more)
        if ev.items:
            self._add_input(job, ev.items)
        if ev.exhausted:
            self._end_input(job)
        else:
            self._lazy[job.job_id] = job
        self._resolve_if_complete(job)

    def _submit_apply(self, ev: SubmitJob) -> None:
        """The one-item job, on the short path: to an idle worker at once, if there is one.

        Idle workers and dispatchable work never coexist once an event is settled, so a
        new job may take an idle worker without passing older work.
        """
        spec = ev.spec
        job = _Job(job_id=ev.job_id, seq=next(self._job_seq), spec=spec, sizer=_ONE_ITEM,
                   window=None)
        job.exhausted = True
        self._jobs[ev.job_id] = job
        if spec.task_timeout is not None:
            self._timed = True
        story = self._story
        if story is not None:
            story.append((self._now, self._stimulus, "job", ev.job_id,
                          "submitted {} of {} items{}", (JobKind.APPLY, 1, "")))
        if self._idle and (self._state is PoolState.RUNNING):
            task_id = next(self._task_ids)
            task = _Task(task_id, job, 0, 1, ev.items)
            job.fed = job.cut = 1
            job.unreleased = 1
            job.live[task_id] = task
            self._tasks[task_id] = task
            if story is not None:
                story.append((self._now, self._stimulus, "task", task_id,
                              "cut from job {}: {} items from {}", (ev.job_id, 1, 0)))
            self._assign(next(iter(self._idle.values())), task)
        else:
            self._add_input(job, ev.items)

    def _on_feed(self, ev: FeedInput) -> None:
        job = self._jobs.get(ev.job_id)
        if job is None or job.resolved:
            self._log("job", ev.job_id, "input of {} items ignored: job is over", len(ev.items))
            return
        if job.exhausted:
            raise PoolCoreError(f"FeedInput: job {ev.job_id}'s input had already ended; the "
                                "driver fed it again")
        job.requested = 0  # a shortfall is asked for again, so the input never stalls
        self._add_input(job, ev.items)
        if ev.exhausted:
            self._end_input(job)
            self._log("job", job.job_id, "input ended after {} items", job.fed)
        self._resolve_if_complete(job)

    def _on_input_failed(self, ev: InputFailed) -> None:
        job = self._jobs.get(ev.job_id)
        if job is None or job.resolved:
            self._log("job", ev.job_id, "input failure ignored: job is over")
            return
        if job.exhausted:
            raise PoolCoreError(f"InputFailed: job {ev.job_id}'s input had already ended")
        position = job.fed
        self._end_input(job)
        self._log("job", job.job_id, "input failed at item {}: {!r}", position, ev.error)
        if job.spec.kind in _STREAMING:
            chunk = _Chunk(position, position + 1, (), ev.error, holds_slot=False)
            if job.spec.kind is JobKind.IMAP_UNORDERED:
                self._deliver(job, chunk)
            else:
                job.held[position] = chunk
                self._flush(job)
            self._resolve_if_complete(job)
        else:
            self._fail_whole_job(job, ev.error)

    def _on_consumed(self, ev: Consumed) -> None:
        job = self._jobs.get(ev.job_id)
        if job is None or not job.spec.ack_consumption or job.acks_off:
            return
        for _ in range(min(ev.count, len(job.unacked))):
            if job.unacked.popleft():
                self._release(job, 1)

    def _on_release_window(self, ev: ReleaseWindow) -> None:
        job = self._jobs.get(ev.job_id)
        if job is None or job.resolved:
            return
        self._log("job", job.job_id, "window released")
        self._stop_acks(job)

    def _stop_acks(self, job: _Job) -> None:
        if job.acks_off or not job.spec.ack_consumption:
            return
        job.acks_off = True
        unacked = job.unacked
        while unacked:
            if unacked.popleft():
                self._release(job, 1)

    def _on_cancel_job(self, ev: CancelJob) -> None:
        job = self._jobs.get(ev.job_id)
        if job is None:
            self._log("job", ev.job_id, "cancel ignored: job is over")
            return
        if ev.mode is CancelMode.PENDING_ONLY and job.dispatched:
            self._log("job", job.job_id, "cancel refused: already started")
            return
        self._log("job", job.job_id, "cancelled ({})", ev.mode)
        self._cancel_rest(job, kill=ev.mode is CancelMode.KILL)
        if not job.resolved:
            self._resolve(job, Outcome.CANCELLED)
        self._forget_job_if_idle(job)

    def _on_cancel_all(self, ev: CancelAll) -> None:
        self._log("pool", 0, "cancel all")
        error = ev.error
        self._shut_everything(Reason.CANCEL_ALL,
                              Outcome.CANCELLED if error is None else Outcome.ERROR,
                              lambda: error)

    def _on_close(self, ev: Close) -> None:
        if self._state is PoolState.RUNNING:
            self._set_state(PoolState.CLOSED)
        for job in self._jobs.values():  # nobody may be left to consume in step: run freely
            if not job.resolved:
                self._stop_acks(job)
        if ev.cancel_pending and self._state is PoolState.CLOSED:
            for job in list(self._jobs.values()):
                if not job.dispatched:
                    self._cancel_rest(job, kill=False)
                    if not job.resolved:
                        self._resolve(job, Outcome.CANCELLED)
                    self._forget_job_if_idle(job)

    def _on_terminate(self, ev: Terminate) -> None:
        if self._state in (PoolState.RUNNING, PoolState.CLOSED):
            self._set_state(PoolState.TERMINATED)
        error = ev.error
        self._shut_everything(Reason.TERMINATE,
                              Outcome.CANCELLED if error is None else Outcome.ERROR,
                              lambda: error)

    def _on_worker_started(self, ev: WorkerStarted) -> None:
        w = self._worker_for(ev.worker_id, "WorkerStarted")
        w.pid = ev.pid
        if w.state is WorkerState.SPAWNING:
            self._move_worker(w, WorkerState.STARTING)

    def _on_worker_ready(self, ev: WorkerReady) -> None:
        w = self._worker_for(ev.worker_id, "WorkerReady")
        if w.ready:
            raise PoolCoreError(f"WorkerReady: worker {w.worker_id} was already ready")
        w.ready = True
        self._start_failures = 0
        if w.state in (WorkerState.SPAWNING, WorkerState.STARTING):
            self._move_worker(w, WorkerState.READY)
            self._idle[w.worker_id] = w

    def _on_init_failed(self, ev: WorkerInitFailed) -> None:
        w = self._worker_for(ev.worker_id, "WorkerInitFailed")
        if w.ready:
            raise PoolCoreError(f"WorkerInitFailed: worker {w.worker_id} was already ready")
        w.init_error = ev.error
        self._last_init_error = ev.error
        self._log("worker", w.worker_id, "initializer raised {!r}", ev.error)
        if w.state in (WorkerState.SPAWNING, WorkerState.STARTING):
            # the worker exits by itself: no StopWorker, which would only race with its exit
            self._stop(w, None, replace_as="restart")

    def _on_retire(self, ev: RetireWorker) -> None:
        w = self._worker_for(ev.worker_id, "RetireWorker")
        if w.state is not WorkerState.READY or w.retiring:
            return
        self._log("worker", w.worker_id, "retiring")
        w.retiring = True
        self._idle.pop(w.worker_id, None)
        if not w.line:
            self._next_in_line(w)

    def _on_worker_exited(self, ev: WorkerExited) -> None:
        w = self._worker_for(ev.worker_id, "WorkerExited")
        del self._workers[w.worker_id]
        self._exited_now.add(w.worker_id)
        self._idle.pop(w.worker_id, None)
        expected = w.state in (WorkerState.STOPPING, WorkerState.KILLING)
        self._move_worker(w, WorkerState.EXITED)
        how = describe_exitcode(ev.exitcode) if ev.error is None else f"failed: {ev.error!r}"
        self._log("worker", w.worker_id, "exited: {}", how)
        if not expected:
            self._vacate(w, "restart")
        w.crash_report = ev.crash_report
        self._empty_line(w, died=True, exitcode=ev.exitcode)
        if not w.ready and (not expected or w.init_error is not None or w.start_timed_out):
            self._start_failures += 1
            self._counters.start_failures += 1
            self._last_start_failure = (ev.exitcode, ev.error)
            if (self._start_failures >= self.config.max_start_failures
                    and self._state in (PoolState.RUNNING, PoolState.CLOSED)):
                self._break()
        elif not expected:
            self._counters.workers_lost += 1

    def _on_task_started(self, ev: TaskStarted) -> None:
        w = self._worker_for(ev.worker_id, "TaskStarted")
        if w.state is WorkerState.KILLING:
            return
        task = self._head(w, ev.task_id, "TaskStarted")
        self._begin(task)

    def _on_task_progress(self, ev: TaskProgress) -> None:
        w = self._worker_for(ev.worker_id, "TaskProgress")
        if w.state is WorkerState.KILLING:
            return
        task = self._head(w, ev.task_id, "TaskProgress")
        if not 0 <= ev.items_done <= task.count:
            raise PoolCoreError(f"TaskProgress: task {task.task_id} has {task.count} items, "
                                f"the worker says {ev.items_done} are done")
        timeout = task.job.spec.task_timeout
        if timeout is not None:
            task.deadline = self._now + timeout * max(1, task.count - ev.items_done)

    def _on_task_done(self, ev: TaskDone) -> None:
        w = self._workers.get(ev.worker_id)
        if w is None:
            w = self._worker_for(ev.worker_id, "TaskDone")  # raises
        if w.state is WorkerState.KILLING:
            self._log("task", ev.task_id, "result ignored: its worker is being killed")
            return
        line = w.line
        if not line or line[0].task_id != ev.task_id:
            self._head(w, ev.task_id, "TaskDone")  # raises
        task = line[0]
        got = len(ev.results)
        count = task.count
        if got != count and task.state is not _ABANDONED and (
                got > count or ev.error is None or got == count):
            what = "a result" if ev.error is None else "an error after results"
            raise PoolCoreError(f"TaskDone: task {task.task_id} has {task.count} items but "
                                f"the worker sent {what} for {got} of them")
        if got == count and ev.error is not None and task.state is not _ABANDONED:
            raise PoolCoreError(f"TaskDone: task {task.task_id} has {task.count} items but "
                                f"the worker sent an error after results for {got} of them")
        line.popleft()
        slot = w.slot
        started = task.started_at
        elapsed = 0.0
        if started is not None:
            elapsed = self._now - started
            if elapsed < 0.0:
                elapsed = 0.0
            slot.busy_time += elapsed
        slot.tasks_done += 1
        slot.items_done += count
        if task.state is _ABANDONED:
            self._drop(task)
        else:
            ran = task.count if ev.error is None else got + 1
            seconds = ev.duration if ev.duration is not None else elapsed
            job = task.job
            job.sizer.observe(ran, seconds)
            if job.spec.kind is JobKind.APPLY:
                last = self._apply_seconds
                self._apply_seconds = seconds if last is None else 0.5 * (last + seconds)
            else:
                last = job.task_seconds
                job.task_seconds = seconds if last is None else 0.5 * (last + seconds)
            self._finish(task, _DONE, ev.results, ev.error)
        self._next_in_line(w)

    def _on_task_skipped(self, ev: TaskSkipped) -> None:
        w = self._worker_for(ev.worker_id, "TaskSkipped")
        if w.state is WorkerState.KILLING:
            return
        task = self._head(w, ev.task_id, "TaskSkipped")
        if task.state is not _ABANDONED:
            raise PoolCoreError(f"TaskSkipped: worker {w.worker_id} skipped task "
                                f"{task.task_id}, which was not revoked ({task.state.value})")
        w.line.popleft()
        self._drop(task)
        self._next_in_line(w)

    def _on_send_failed(self, ev: SendFailed) -> None:
        w = self._worker_for(ev.worker_id, "SendFailed")
        if w.state is WorkerState.KILLING:
            return  # the task was already handed back when the kill was decided
        task = next((t for t in w.line if t.task_id == ev.task_id), None)
        if task is None:
            raise PoolCoreError(f"SendFailed: task {ev.task_id} is not in worker "
                                f"{w.worker_id}'s line")
        was_head = w.line[0] is task
        w.line.remove(task)
        w.assigned -= 1  # it never reached the worker
        self._log("task", task.task_id, "could not be sent: {!r}", ev.error)
        if task.state is _ABANDONED:
            self._drop(task)
        else:
            self._finish(task, _FAILED, (), ev.error)
        if was_head:
            self._next_in_line(w)

    # --- what follows from the state --------------------------------------------------------

    def _settle(self) -> None:
        if self._timed or self._stopping or self.config.start_timeout is not None:
            self._check_deadlines()
        self._dispatch()
        if self._lazy:
            self._request_input()
        if self._vacant:
            self._fill_slots()
        if self._state is not PoolState.RUNNING:
            self._finish_if_done()

    def _check_deadlines(self) -> None:
        now = self._now
        start_timeout = self.config.start_timeout
        ready, stopping, killing = WorkerState.READY, WorkerState.STOPPING, WorkerState.KILLING
        due: list[tuple[_Worker, Reason]] = []
        for w in self._workers.values():
            state = w.state
            if state is ready:
                if w.line:
                    deadline = w.line[0].deadline
                    if deadline is not None and deadline <= now:
                        due.append((w, Reason.TIMEOUT))
            elif state is stopping:
                if w.stop_deadline is not None and w.stop_deadline <= now:
                    due.append((w, Reason.STOP_TIMEOUT))
            elif (start_timeout is not None and state is not killing
                  and w.spawned_at + start_timeout <= now):
                due.append((w, Reason.START_TIMEOUT))
        for w, reason in due:
            if reason is Reason.TIMEOUT:
                self._time_out(w, w.line[0])
            else:
                if reason is Reason.START_TIMEOUT:
                    w.start_timed_out = True
                self._kill(w, reason)

    def _dispatch(self) -> None:
        if self._state not in (PoolState.RUNNING, PoolState.CLOSED):
            return
        while True:
            job = self._next_job()
            if job is None:
                return
            w = self._pick_worker(self._line_limit(job))
            if w is None:
                return
            self._assign(w, self._take_task(job))

    def _request_input(self) -> None:
        for job in list(self._lazy.values()):
            window = job.window if job.window is not None else self._default_window
            size = job.sizer.next_size()
            have = job.buffered + job.requested
            want = max(0, window - job.unreleased) * size - have
            if want <= 0 or (want < size and have > 0):
                continue
            job.requested += want
            self._emit(RequestInput(job_id=job.job_id, count=want, stimulus_id=self._stimulus))

    def _fill_slots(self) -> None:
        if not self._vacant or not self._started or self._state not in (PoolState.RUNNING,
                                                                         PoolState.CLOSED):
            return
        vacant = [slot for slot in self._slots if slot.worker is None]
        if self._state is PoolState.RUNNING and self.config.eager_spawn:
            count = len(vacant)
        else:
            if not self._jobs:
                return
            waiting = len(self._idle) + sum(
                1 for w in self._workers.values()
                if w.state in (WorkerState.SPAWNING, WorkerState.STARTING))
            count = min(len(vacant), self._queued_estimate(len(vacant) + waiting) - waiting)
        for slot in vacant[:max(0, count)]:
            self._spawn(slot)

    def _finish_if_done(self) -> None:
        if self._state is PoolState.RUNNING or self._stopped:
            return
        if self._state is PoolState.CLOSED:
            if self._jobs:
                return
            for w in list(self._workers.values()):
                if w.state in _LIVE_WORKER and not w.line:
                    self._stop(w, Reason.CLOSE)
        if not self._workers:
            self._stopped = True
            self._log("pool", 0, "stopped")
            self._emit(PoolStopped(stimulus_id=self._stimulus))

    # --- input and tasks ----------------------------------------------------------------------

    def _add_input(self, job: _Job, items: Sequence[object]) -> None:
        count = len(items)
        if not count:
            return
        job.segments.append((items, 0))
        job.buffered += count
        job.fed += count
        self._mark_ready(job)

    def _end_input(self, job: _Job) -> None:
        job.exhausted = True
        job.requested = 0
        self._lazy.pop(job.job_id, None)

    def _take_items(self, job: _Job, count: int) -> Sequence[object]:
        job.buffered -= count
        parts: list[object] = []
        while count:
            seq, offset = job.segments[0]
            left = len(seq) - offset
            if left <= count:
                job.segments.popleft()
                if offset == 0 and not parts and left == count and isinstance(seq, tuple):
                    return seq
                parts.extend(seq[offset:])
                count -= left
            else:
                if not parts:
                    piece = seq[offset:offset + count]
                    job.segments[0] = (seq, offset + count)
                    return piece if isinstance(piece, tuple) else tuple(piece)
                parts.extend(seq[offset:offset + count])
                job.segments[0] = (seq, offset + count)
                count = 0
        return tuple(parts)

    def _dispatchable(self, job: _Job) -> bool:
        return bool(job.retry) or (job.buffered > 0 and (
            job.window is None or job.unreleased < job.window))

    def _mark_ready(self, job: _Job) -> None:
        if job.seq not in self._ready_seqs:
            self._ready_seqs.add(job.seq)
            heapq.heappush(self._ready_heap, (job.seq, job.job_id))

    def _next_job(self) -> _Job | None:
        """The oldest job that has a task to give out (without taking it)."""
        heap = self._ready_heap
        while heap:
            seq, job_id = heap[0]
            job = self._jobs.get(job_id)
            if job is not None and job.seq == seq and self._dispatchable(job):
                return job
            heapq.heappop(heap)
            self._ready_seqs.discard(seq)
        return None

    def _line_limit(self, job: _Job) -> int:
        """How many tasks a worker may hold when the next task is one of ``job``'s.

        Tasks measured to be short get a deep line (``deep_prefetch``), so the driver
        can batch messages and a worker never waits for the round trip; others keep
        ``prefetch``, so a long task never holds work another worker could take.
        """
        config = self.config
        deep = config.deep_prefetch
        if deep > config.prefetch and (job.sizer.fixed is not None
                                       or job.spec.batch_limit is not None):
            # (chunks that grow by themselves need no deep line: while they grow, a deep
            # line would only fill with small ones)
            seconds = (self._apply_seconds if job.spec.kind is JobKind.APPLY
                       else job.task_seconds)
            if seconds is not None and seconds <= config.short_task_seconds:
                return 1 + deep
        return 1 + config.prefetch

    def _take_task(self, job: _Job) -> _Task:
        if job.retry:
            return heapq.heappop(job.retry)[2]
        size = min(job.sizer.next_size(), job.buffered)
        task_id = next(self._task_ids)
        task = _Task(task_id, job, job.cut, size, self._take_items(job, size))
        job.cut += size
        job.unreleased += 1
        job.live[task_id] = task
        self._tasks[task_id] = task
        story = self._story
        if story is not None:
            story.append((self._now, self._stimulus, "task", task_id,
                          "cut from job {}: {} items from {}", (job.job_id, size, task.start)))
        return task

    def _pick_worker(self, limit: int) -> _Worker | None:
        if self._idle:
            return next(iter(self._idle.values()))
        if limit <= 1:
            return None
        best: _Worker | None = None
        for w in self._workers.values():
            if (w.state is WorkerState.READY and 0 < len(w.line) < limit
                    and self._quota_left(w) and (best is None or len(w.line) < len(best.line))):
                best = w
        return best

    def _quota_left(self, w: _Worker) -> bool:
        most = self.config.maxtasksperchild
        return not w.retiring and (most is None or w.assigned < most)

    def _assign(self, w: _Worker, task: _Task) -> None:
        # (QUEUED -> RUNNING or SENT: always legal, so the move is made here directly)
        line = w.line
        first = not line
        line.append(task)
        w.assigned += 1
        task.worker = w
        if first:
            self._idle.pop(w.worker_id, None)
        job = task.job
        job.dispatched = True
        now = self._now
        if first:
            task.state = _RUNNING
            task.started_at = now
            timeout = job.spec.task_timeout
            task.deadline = None if timeout is None else self._deadline(task, now, timeout)
        else:
            task.state = _SENT
        story = self._story
        if story is not None:
            story.append((now, self._stimulus, "task", task.task_id, "{}", (task.state,)))
        self._out.append(SendTask(worker_id=w.worker_id, task_id=task.task_id,
                                  job_id=job.job_id, start=task.start, items=task.items,
                                  stimulus_id=self._stimulus))

    def _begin(self, task: _Task) -> None:
        task.started_at = self._now
        timeout = task.job.spec.task_timeout
        task.deadline = None if timeout is None else self._deadline(task, self._now, timeout)

    def _deadline(self, task: _Task, now: float, timeout: float) -> float:
        """When a task that starts ``now`` is overdue: ``timeout`` per item; for a batch
        of tiny items, one item's timeout (it is split and retried item by item if it
        runs over, so only an item that is slow on its own fails)."""
        if task.count > 1 and task.job.spec.batch_limit is not None:
            return now + timeout + task.count * self.config.batch_target_seconds
        return now + timeout * task.count

    def _next_in_line(self, w: _Worker) -> None:
        """The head of ``w``'s line just left it: start the next task or free the worker."""
        if w.line:
            head = w.line[0]
            now = self._now
            if head.state is _SENT:  # SENT -> RUNNING is always legal
                head.state = _RUNNING
                story = self._story
                if story is not None:
                    story.append((now, self._stimulus, "task", head.task_id, "{}", (_RUNNING,)))
            head.started_at = now
            timeout = head.job.spec.task_timeout
            head.deadline = None if timeout is None else self._deadline(head, now, timeout)
        elif w.state is WorkerState.READY:
            if self._quota_left(w):
                self._idle[w.worker_id] = w
            else:
                self._counters.workers_recycled += 1
                self._stop(w, Reason.RECYCLE, replace_as="recycle")

    def _requeue(self, task: _Task) -> None:
        self._move(task, _QUEUED)
        task.worker = None
        task.started_at = task.deadline = None
        heapq.heappush(task.job.retry, (task.start, task.task_id, task))
        self._mark_ready(task.job)

    def _drop(self, task: _Task) -> None:
        self._move(task, _DROPPED)
        self._forget_task(task)

    def _forget_task(self, task: _Task) -> None:
        self._tasks.pop(task.task_id, None)
        task.job.live.pop(task.task_id, None)
        task.worker = None
        task.items = ()

    def _split(self, task: _Task) -> None:
        """Hand a batch back as one task per item: a batch never fails as a whole."""
        job = task.job
        self._move(task, _CANCELLED)
        self._tasks.pop(task.task_id, None)
        job.live.pop(task.task_id, None)
        task.worker = None
        items, task.items = task.items, ()
        self._log("task", task.task_id, "split into {} tasks of one item", task.count)
        for i in range(task.count):
            one = _Task(next(self._task_ids), job, task.start + i, 1, (items[i],))
            job.live[one.task_id] = one
            self._tasks[one.task_id] = one
            self._log("task", one.task_id, "cut from job {}: {} items from {}", job.job_id, 1,
                      one.start)
            heapq.heappush(job.retry, (one.start, one.task_id, one))
        job.unreleased += task.count - 1
        self._mark_ready(job)

    def _lose(self, task: _Task, w: _Worker, exitcode: int | None) -> None:
        if task.count > 1 and task.job.spec.batch_limit is not None:
            self._split(task)  # only the item at fault will fail, when it runs alone
            return
        w.slot.tasks_lost += 1
        self._counters.tasks_lost += 1
        if task.attempts < self.config.lost_task_retries:
            task.attempts += 1
            self._requeue(task)
            return
        error = WorkerLostError(exitcode=exitcode, pid=w.pid, task=self._describe(task),
                                crash_report=w.crash_report)
        self._finish(task, _FAILED, (), error)

    def _time_out(self, w: _Worker, head: _Task) -> None:
        w.line.popleft()
        self._add_busy(w, head)
        if head.state is _RUNNING and head.count > 1 and head.job.spec.batch_limit is not None:
            self._split(head)  # the stuck item will time out again, alone
        elif head.state is _RUNNING:
            w.slot.tasks_timed_out += 1
            self._counters.tasks_timed_out += 1
            error = TaskTimeoutError(timeout=head.job.spec.task_timeout,
                                     task=self._describe(head), pid=w.pid)
            self._finish(head, _FAILED, (), error)
            self._kill(w, Reason.TIMEOUT, timed_out=error)
            return
        else:
            self._drop(head)
        self._kill(w, Reason.TIMEOUT)

    def _add_busy(self, w: _Worker, task: _Task) -> float:
        if task.started_at is None:  # only a task that reached the head of a line has begun
            return 0.0
        elapsed = max(0.0, self._now - task.started_at)
        w.slot.busy_time += elapsed
        return elapsed

    # --- outcomes -------------------------------------------------------------------------------

    def _finish(self, task: _Task, state: TaskState, values: Sequence[object],
                error: BaseException | None) -> None:
        """A task reached DONE or FAILED: give its outcome to its job."""
        if state is _DONE and task.state is _RUNNING:  # the usual move, always legal
            task.state = _DONE
            story = self._story
            if story is not None:
                story.append((self._now, self._stimulus, "task", task.task_id, "{}", (_DONE,)))
        else:
            self._move(task, state)
        task_id = task.task_id
        self._tasks.pop(task_id, None)
        job = task.job
        job.live.pop(task_id, None)
        task.worker = None
        task.items = ()
        job.done_items += task.count
        if state is _DONE:
            self._counters.tasks_done += 1
        else:
            self._counters.tasks_failed += 1
        if job.resolved:  # the job already failed or was cancelled: nobody wants this
            self._release(job, 1)
            self._forget_job_if_idle(job)
            return
        if job.spec.progress:
            self._emit(JobProgress(job_id=job.job_id, done=job.done_items,
                                   total=self._total(job), stimulus_id=self._stimulus))
        kind = job.spec.kind
        start = task.start
        if kind is JobKind.IMAP_UNORDERED or (kind is JobKind.IMAP and start == job.next_start):
            # delivered at once (for IMAP: it is the next in order)
            self._emit(DeliverResults(job_id=job.job_id, start=start, stop=start + task.count,
                                      values=values, error=error, stimulus_id=self._stimulus))
            if job.spec.ack_consumption and not job.acks_off:
                job.unacked.append(True)
            else:
                self._release(job, 1)
            if kind is JobKind.IMAP:
                job.next_start = start + task.count
                if job.held:
                    self._flush(job)
        elif kind is JobKind.IMAP:
            job.held[start] = _Chunk(start, start + task.count, values, error, holds_slot=True)
        elif kind is JobKind.APPLY and error is None:
            job.unreleased -= 1
            self._resolve(job, Outcome.OK, value=values[0])
            if not job.live and not job.retry and self._jobs.get(job.job_id) is job:
                del self._jobs[job.job_id]
            return
        else:
            self._release(job, 1)
            if error is not None:
                self._fail_whole_job(job, error)
                return
            job.results[start] = values
        self._resolve_if_complete(job)

    def _fail_whole_job(self, job: _Job, error: BaseException) -> None:
        self._resolve(job, Outcome.ERROR, error=error)
        if job.spec.cancel_on_error:
            self._cancel_rest(job, kill=False)
        self._forget_job_if_idle(job)

    def _deliver(self, job: _Job, chunk: _Chunk) -> None:
        self._emit(DeliverResults(job_id=job.job_id, start=chunk.start, stop=chunk.stop,
                                  values=chunk.values, error=chunk.error,
                                  stimulus_id=self._stimulus))
        if job.spec.ack_consumption and not job.acks_off:
            job.unacked.append(chunk.holds_slot)
        elif chunk.holds_slot:
            self._release(job, 1)

    def _flush(self, job: _Job) -> None:
        held = job.held
        while job.next_start in held:
            chunk = held.pop(job.next_start)
            self._deliver(job, chunk)
            job.next_start = chunk.stop

    def _release(self, job: _Job, count: int) -> None:
        job.unreleased -= count
        if job.window is not None and self._dispatchable(job):
            self._mark_ready(job)

    def _resolve_if_complete(self, job: _Job) -> None:
        if job.resolved or not job.exhausted or job.buffered or job.retry or job.live or job.held:
            return
        value: object = None
        if job.spec.kind is JobKind.APPLY:
            value = job.results[0][0]
        elif job.spec.kind is JobKind.MAP:
            results = job.results
            value = [v for start in sorted(results) for v in results[start]]
        self._resolve(job, Outcome.OK, value=value)
        self._forget_job_if_idle(job)

    def _resolve(self, job: _Job, outcome: Outcome, value: object = None,
                 error: BaseException | None = None) -> None:
        if job.resolved:
            raise PoolCoreError(f"pool core bug: job {job.job_id} resolved twice")
        job.resolved = True
        job.results = {}
        job.held.clear()
        job.requested = 0
        self._lazy.pop(job.job_id, None)
        self._log("job", job.job_id, "resolved: {}", outcome)
        self._emit(ResolveJob(job_id=job.job_id, outcome=outcome, value=value, error=error,
                              stimulus_id=self._stimulus))

    def _forget_job_if_idle(self, job: _Job) -> None:
        if (job.resolved and not job.live and not job.retry and not job.buffered
                and self._jobs.get(job.job_id) is job):
            del self._jobs[job.job_id]

    def _total(self, job: _Job) -> int | None:
        return job.fed if job.exhausted else job.spec.length_hint

    # --- cancelling and shutting down ---------------------------------------------------------

    def _cancel_rest(self, job: _Job, *, kill: bool) -> None:
        """Cancel all the job's work not yet running; running tasks are killed (``kill``) or
        abandoned to finish unobserved."""
        job.segments.clear()
        job.buffered = 0
        self._end_input(job)
        job.held.clear()
        while job.retry:
            task = heapq.heappop(job.retry)[2]
            self._move(task, _CANCELLED)
            self._forget_task(task)
            self._counters.tasks_cancelled += 1
        running: list[_Task] = []
        for task in list(job.live.values()):
            if task.state is _SENT:
                worker = task.worker
                assert worker is not None
                self._move(task, _ABANDONED)
                job.live.pop(task.task_id)
                self._counters.tasks_cancelled += 1
                self._emit(RevokeTask(worker_id=worker.worker_id, task_id=task.task_id,
                                      stimulus_id=self._stimulus))
            elif task.state is _RUNNING:
                running.append(task)
        for task in running:
            worker = task.worker
            assert worker is not None and worker.line[0] is task
            self._counters.tasks_cancelled += 1
            if kill:
                worker.line.popleft()
                self._add_busy(worker, task)
                self._move(task, _CANCELLED)
                self._forget_task(task)
                self._kill(worker, Reason.CANCELLED)
            else:
                self._move(task, _ABANDONED)
                job.live.pop(task.task_id)
        job.unreleased = 0

    def _shut_everything(self, reason: Reason, outcome: Outcome,
                         make_error: Callable[[], BaseException | None]) -> None:
        """Kill every worker, then end every job with ``outcome``."""
        for w in list(self._workers.values()):
            if w.state is not WorkerState.KILLING:
                self._kill(w, reason)
        for job in list(self._jobs.values()):
            self._cancel_rest(job, kill=False)  # nothing runs any more: all was handed back
            if not job.resolved:
                self._resolve(job, outcome, error=make_error())
            self._forget_job_if_idle(job)

    def _break(self) -> None:
        self._log("pool", 0, "broken after {} start failures in a row", self._start_failures)
        self._set_state(PoolState.BROKEN)
        self._shut_everything(Reason.BROKEN, Outcome.ERROR, self._new_broken_error)

    def _new_broken_error(self) -> BrokenPoolError:
        exitcode, spawn_error = self._last_start_failure
        init_error = self._last_init_error
        if init_error is not None:
            detail = f"the initializer raised {type(init_error).__name__}: {init_error}"
        elif spawn_error is not None:
            detail = f"the last one could not be started: {spawn_error!r}"
        else:
            detail = ""
        error = BrokenPoolError(failures=self._counters.start_failures, exitcode=exitcode,
                                detail=detail)
        error.__cause__ = init_error if init_error is not None else spawn_error
        return error

    def _refusal(self) -> BaseException:
        if self._state is PoolState.BROKEN:
            return self._new_broken_error()
        return PoolClosedError(f"cannot run new work: the pool is {self._state.value}. "
                               "Submit work before close()/terminate()/shutdown(), or create "
                               "a new pool.")

    # --- workers ----------------------------------------------------------------------------

    def _spawn(self, slot: _Slot) -> None:
        w = _Worker(next(self._worker_ids), slot, spawned_at=self._now)
        self._workers[w.worker_id] = w
        slot.worker = w
        self._vacant -= 1
        if slot.replace_as == "restart":
            slot.restarts += 1
        elif slot.replace_as == "recycle":
            slot.recycles += 1
        slot.replace_as = ""
        self._counters.workers_spawned += 1
        self._log("worker", w.worker_id, "spawning in slot {}", slot.index)
        self._emit(SpawnWorker(worker_id=w.worker_id, slot=slot.index,
                               stimulus_id=self._stimulus))

    def _vacate(self, w: _Worker, replace_as: str) -> None:
        if w.slot.worker is w:
            w.slot.worker = None
            w.slot.replace_as = replace_as
            self._vacant += 1

    def _stop(self, w: _Worker, reason: Reason | None, *, replace_as: str = "") -> None:
        """``w`` takes no more tasks and should exit; ``reason=None`` sends no StopWorker."""
        if reason is not None:
            self._emit(StopWorker(worker_id=w.worker_id, reason=reason,
                                  stimulus_id=self._stimulus))
        self._move_worker(w, WorkerState.STOPPING)
        timeout = self.config.stop_timeout
        w.stop_deadline = None if timeout is None else self._now + timeout
        self._idle.pop(w.worker_id, None)
        self._vacate(w, replace_as)

    def _kill(self, w: _Worker, reason: Reason, timed_out: BaseException | None = None) -> None:
        """Kill ``w``; what is left in its line is handed back (or dropped if abandoned)."""
        self._emit(KillWorker(worker_id=w.worker_id, reason=reason, timed_out=timed_out,
                              stimulus_id=self._stimulus))
        self._move_worker(w, WorkerState.KILLING)
        self._idle.pop(w.worker_id, None)
        self._vacate(w, "restart")
        self._empty_line(w)

    def _empty_line(self, w: _Worker, died: bool = False, exitcode: int | None = None) -> None:
        """Settle every task in ``w``'s line now that ``w`` is gone (or going).

        Abandoned tasks are dropped; if ``w`` died (with ``exitcode``) the task it was
        running is lost; everything else never began and goes back to the queue.
        """
        line = list(w.line)
        w.line.clear()
        for task in line:
            self._add_busy(w, task)
            if task.state is _ABANDONED:
                self._drop(task)
            elif died and task.state is _RUNNING:
                self._lose(task, w, exitcode)
            else:
                self._requeue(task)

    def _queued_estimate(self, enough: int) -> int:
        total = 0
        for job in self._jobs.values():
            total += len(job.retry)
            if job.buffered:
                tasks = -(-job.buffered // job.sizer.next_size())
                if job.window is not None:
                    tasks = min(tasks, max(0, job.window - job.unreleased))
                total += tasks
            if total >= enough:
                break
        return total

    def _worker_for(self, worker_id: int, what: str) -> _Worker:
        w = self._workers.get(worker_id)
        if w is None:
            raise PoolCoreError(f"{what} for worker {worker_id}, which the core does not know "
                                "(never spawned, or its exit was already reported); a driver "
                                "reports a worker's messages before its WorkerExited")
        return w

    def _head(self, w: _Worker, task_id: int, what: str) -> _Task:
        if not w.line or w.line[0].task_id != task_id:
            head = w.line[0].task_id if w.line else None
            raise PoolCoreError(f"{what}: worker {w.worker_id} reported task {task_id}, but "
                                f"the task it should be running is {head}; a worker runs "
                                "its tasks one at a time in the order they were sent")
        return w.line[0]

    # --- bookkeeping ----------------------------------------------------------------------------

    def _move(self, task: _Task, new: TaskState) -> None:
        if new not in TASK_MOVES[task.state]:
            raise InvalidTransition(task.task_id, task.state.name, new.name,
                                    self._task_history(task.task_id))
        task.state = new
        story = self._story
        if story is not None:
            story.append((self._now, self._stimulus, "task", task.task_id, "{}", (new,)))

    def _task_history(self, task_id: int) -> list[tuple[float, str, str]]:
        """A task's moves, ``(now, stimulus_id, state name)``, as far as the story recalls."""
        history = []
        for now, stim, kind, ident, template, args in self._story or ():
            if kind != "task" or ident != task_id:
                continue
            if template == "{}" and args and isinstance(args[0], TaskState):
                history.append((now, stim, args[0].name))
            elif template.startswith("cut from job"):
                history.append((now, stim, _QUEUED.name))
        return history

    def _move_worker(self, w: _Worker, new: WorkerState) -> None:
        if new not in WORKER_MOVES[w.state]:
            raise PoolCoreError(f"pool core bug: worker {w.worker_id} cannot go from "
                                f"{w.state.name} to {new.name}")
        if w.state is WorkerState.STOPPING:
            self._stopping -= 1
        elif new is WorkerState.STOPPING:
            self._stopping += 1
        w.state = new
        self._log("worker", w.worker_id, "{}", new)

    def _set_state(self, new: PoolState) -> None:
        if new not in POOL_MOVES[self._state]:
            raise PoolCoreError(f"pool core bug: the pool cannot go from {self._state.name} "
                                f"to {new.name}")
        self._state = new
        self._log("pool", 0, "{}", new)

    def _describe(self, task: _Task) -> str:
        job = task.job
        label = job.spec.label or "task"
        if job.spec.kind is JobKind.APPLY:
            return f"{label} (job {job.job_id})"
        if task.count == 1:
            return f"{label} on item {task.start} (job {job.job_id})"
        return f"{label} on items {task.start}..{task.start + task.count - 1} (job {job.job_id})"

    def _emit(self, instruction: Instruction) -> None:
        self._out.append(instruction)

    def _log(self, kind: str, ident: int, template: str, *args: object) -> None:
        """Remember what happened; formatting waits until someone reads the story."""
        if self._story is not None:
            self._story.append((self._now, self._stimulus, kind, ident, template, args))
