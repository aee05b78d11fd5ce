"""Events: what happened, as the driver tells it to the pool core.

Every event is a slotted, keyword-only dataclass carrying ``now`` (the driver's
monotonic clock when the event happened, in seconds: the core never reads a clock) and
``stimulus_id`` (a name for this cause, repeated on every instruction it leads to and in
the core's story). The driver may pass its own ids; by default one is made up.

Who sends what:

* the face (on behalf of user calls): ``Start``, ``SubmitJob``, ``FeedInput``,
  ``InputFailed``, ``Consumed``, ``ReleaseWindow``, ``CancelJob``, ``CancelAll``,
  ``Close``, ``Terminate``;
* the driver, about its workers: ``WorkerStarted``, ``WorkerReady``, ``WorkerInitFailed``,
  ``RetireWorker``, ``TaskStarted``, ``TaskProgress``, ``TaskDone``, ``TaskSkipped``,
  ``SendFailed``, ``WorkerExited``;
* the driver's clock: ``Tick`` (when ``PoolCore.next_deadline()`` has come).

Values (task items, results, exceptions) are opaque: the core never pickles, copies or
looks inside them.

Events and instructions are not frozen: building a frozen dataclass costs a
``object.__setattr__`` call per field, which the pool pays several times per task.
Treat them as immutable all the same.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = [
    "JobKind", "JobSpec", "CancelMode",
    "Event", "Start", "SubmitJob", "FeedInput", "InputFailed", "Consumed",
    "ReleaseWindow",
    "CancelJob", "CancelAll", "Close", "Terminate", "Tick",
    "WorkerStarted", "WorkerReady", "WorkerInitFailed", "WorkerExited", "RetireWorker",
    "TaskStarted", "TaskProgress", "TaskDone", "TaskSkipped", "SendFailed",
]

_stimulus_numbers = itertools.count(1)


def _new_stimulus_id() -> str:
    return f"stim-{next(_stimulus_numbers)}"


class JobKind(enum.Enum):
    """How a job's results go back to its caller."""

    __hash__ = object.__hash__  # members are singletons: hash them at C speed

    APPLY = "apply"
    """One item; one ``ResolveJob`` whose value is that item's result
    (``apply_async``, ``submit``)."""
    MAP = "map"
    """Many items; one ``ResolveJob`` with the list of results in input order, or the first
    error to arrive (``map``, ``map_async``, ``starmap``)."""
    IMAP = "imap"
    """Many items; ``DeliverResults`` in input order as they become available, then
    ``ResolveJob`` (``imap``, ``Executor.map``)."""
    IMAP_UNORDERED = "imap_unordered"
    """Many items; ``DeliverResults`` as chunks complete, then ``ResolveJob``."""

    @property
    def streams(self) -> bool:
        """Whether results are delivered piece by piece (``DeliverResults``)."""
        return self is JobKind.IMAP or self is JobKind.IMAP_UNORDERED


@dataclass(frozen=True, slots=True, kw_only=True)
class JobSpec:
    """What a job is and how the core should schedule it.

    Attributes:
        kind: how results go back (see ``JobKind``).
        chunksize: items per task; ``None`` lets the core adapt it to measured task time.
        task_timeout: seconds one item may run; a task of *n* items gets *n* times that
            (less once ``TaskProgress`` reports items done). ``None``: no limit.
        max_in_flight: most tasks of this job cut from the input and not yet released
            (released = delivered, or consumed when ``ack_consumption``). Bounds memory
            for lazy input and the reordering buffer of ``IMAP``. ``None``: no bound for
            input given whole; a default bound (``PoolConfig.default_window``) for lazy input.
        ack_consumption: release a task's slot only when the caller has consumed its
            delivery (``Consumed``), as ``Executor.map(buffersize=)`` wants.
        progress: emit ``JobProgress`` each time a chunk finishes.
        cancel_on_error: when a ``MAP`` job fails, cancel its tasks that have not started
            (the standard library keeps running them and drops their results).
        length_hint: number of items, when known but fed lazily (caps adaptive chunks with
            the standard library's formula).
        label: names the work in error messages, e.g. the function's name.
        batch_limit: with ``chunksize=1``, let the core put up to this many items in one
            task once the job's items are measured to be short (about
            ``PoolConfig.batch_target_seconds`` of work per task). The driver must then
            answer every item of a task separately (an item's error is its result, not
            the task's), and the core keeps single-item semantics for failures: when a
            batched task's worker dies or times out, its items are handed back as tasks
            of one item each, so only the item at fault fails (the others run again).
            ``None``: never batch.
    """

    kind: JobKind
    chunksize: int | None = 1
    task_timeout: float | None = None
    max_in_flight: int | None = None
    ack_consumption: bool = False
    progress: bool = False
    cancel_on_error: bool = False
    length_hint: int | None = None
    label: str = ""
    batch_limit: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.kind, JobKind):
            raise TypeError(f"JobSpec.kind must be a JobKind, not {self.kind!r}")
        _check_positive_int("chunksize", self.chunksize, "or None to adapt it")
        _check_positive_int("max_in_flight", self.max_in_flight, "or None for no bound")
        _check_positive_int("length_hint", self.length_hint, "or None", allow_zero=True)
        _check_positive_int("batch_limit", self.batch_limit, "or None to never batch")
        if self.batch_limit is not None and (self.chunksize != 1
                                             or self.kind is JobKind.APPLY):
            raise ValueError(f"batch_limit only applies to jobs of chunksize=1 with many "
                             f"items, not a {self.kind.name} job of chunksize="
                             f"{self.chunksize!r}")
        if self.task_timeout is not None and not self.task_timeout > 0:
            raise ValueError(f"task_timeout must be a positive number of seconds or None, "
                             f"not {self.task_timeout!r}")
        if self.kind is JobKind.APPLY and self.chunksize not in (1, None):
            raise ValueError(f"an APPLY job has exactly one item; chunksize={self.chunksize!r} "
                             "makes no sense for it (use 1)")
        if self.ack_consumption and not self.kind.streams:
            raise ValueError(f"ack_consumption only applies to streaming jobs (IMAP, "
                             f"IMAP_UNORDERED), not {self.kind.name}")


def _check_positive_int(name: str, value: int | None, alternative: str,
                        allow_zero: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int {alternative}, not {value!r}")
    if value < (0 if allow_zero else 1):
        floor = "0 or more" if allow_zero else "1 or more"
        raise ValueError(f"{name} must be {floor} ({alternative}), not {value!r}")


class CancelMode(enum.Enum):
    """How far ``CancelJob`` goes."""

    __hash__ = object.__hash__  # members are singletons: hash them at C speed

    PENDING_ONLY = "pending_only"
    """Cancel the job only if none of its tasks was ever sent to a worker; otherwise do
    nothing (``Future.cancel()`` as the standard library means it;
    ``shutdown(cancel_futures=True)``)."""
    ABANDON = "abandon"
    """Cancel every task not yet running; tasks already running finish unobserved (their
    results are dropped). The job resolves as cancelled at once (an ``imap`` or
    ``Executor.map`` iterator closed early)."""
    KILL = "kill"
    """Like ABANDON, but workers running the job's tasks are killed and replaced
    (``Future.cancel()`` on a running task, as manyproc extends it)."""


@dataclass(slots=True, kw_only=True)
class Event:
    """Base of all events: when it happened and what caused it."""

    now: float
    stimulus_id: str = field(default_factory=_new_stimulus_id)


# --- from the face ----------------------------------------------------------------------


@dataclass(slots=True, kw_only=True)
class Start(Event):
    """The pool starts: the core may now ask for workers."""


@dataclass(slots=True, kw_only=True)
class SubmitJob(Event):
    """A new job. ``job_id`` is chosen by the driver and must not be in use.

    ``items`` is the input known now; ``exhausted`` says whether that is all of it. An
    ``APPLY`` job gives its single item here with ``exhausted=True``.
    """

    job_id: int
    spec: JobSpec
    items: Sequence[object] = ()
    exhausted: bool = True


@dataclass(slots=True, kw_only=True)
class FeedInput(Event):
    """More input for a lazy job, normally in answer to ``RequestInput``.

    Each FeedInput settles every request made so far: if it holds fewer items than asked
    (and does not end the input with ``exhausted=True``), the core asks again for what it
    still wants. Input for a job that no longer exists is ignored.
    """

    job_id: int
    items: Sequence[object] = ()
    exhausted: bool = False


@dataclass(slots=True, kw_only=True)
class InputFailed(Event):
    """Reading a lazy job's input raised ``error``: the input ends there.

    A streaming job delivers the error at the position where the next item would have
    been; a ``MAP`` job fails with it.
    """

    job_id: int
    error: BaseException


@dataclass(slots=True, kw_only=True)
class Consumed(Event):
    """The caller used up ``count`` more ``DeliverResults`` of this job (``ack_consumption``)."""

    job_id: int
    count: int = 1


@dataclass(slots=True, kw_only=True)
class ReleaseWindow(Event):
    """Nobody will consume this job's deliveries in step any more (its iterator was
    dropped, or the pool was closed): stop waiting for ``Consumed`` and release each
    task once delivered, so the job runs to its end. Ignored for a job that is over."""

    job_id: int


@dataclass(slots=True, kw_only=True)
class CancelJob(Event):
    """Cancel a job (see ``CancelMode``). A job that no longer exists is ignored."""

    job_id: int
    mode: CancelMode = CancelMode.KILL


@dataclass(slots=True, kw_only=True)
class CancelAll(Event):
    """Ctrl-C: every pending job fails with ``error`` (or is cancelled if ``None``), every
    worker is killed; the pool itself goes on and starts new workers."""

    error: BaseException | None = None


@dataclass(slots=True, kw_only=True)
class Close(Event):
    """No new jobs; finish the pending ones, then stop the workers.

    With ``cancel_pending`` every job none of whose tasks was sent yet is cancelled first.
    """

    cancel_pending: bool = False


@dataclass(slots=True, kw_only=True)
class Terminate(Event):
    """Kill every worker; every pending job fails with ``error`` (cancelled if ``None``)."""

    error: BaseException | None = None


@dataclass(slots=True, kw_only=True)
class Tick(Event):
    """Time passed: deadlines up to ``now`` are due."""


# --- from the driver, about its workers ---------------------------------------------------


@dataclass(slots=True, kw_only=True)
class WorkerStarted(Event):
    """The worker asked for by ``SpawnWorker`` exists; it now runs its initializer."""

    worker_id: int
    pid: int | None = None


@dataclass(slots=True, kw_only=True)
class WorkerReady(Event):
    """The worker finished its initializer and takes tasks."""

    worker_id: int


@dataclass(slots=True, kw_only=True)
class WorkerInitFailed(Event):
    """The worker's initializer raised ``error``; the worker is exiting."""

    worker_id: int
    error: BaseException


@dataclass(slots=True, kw_only=True)
class WorkerExited(Event):
    """The worker is gone, for whatever reason; sent exactly once per ``SpawnWorker``.

    The driver reports every message the worker sent before it died first.
    ``exitcode`` is negative for a signal, ``None`` if unknown; ``error`` says why a
    worker could not be started at all (fork failed...); ``crash_report`` is what the
    worker could tell of its death (a fault handler's stack dump), if anything.
    """

    worker_id: int
    exitcode: int | None = None
    error: BaseException | None = None
    crash_report: str | None = None


@dataclass(slots=True, kw_only=True)
class RetireWorker(Event):
    """Replace this worker once the tasks it holds are done (e.g. its memory grew past a
    limit the driver watches). It gets no new task; it is then stopped like a worker that
    reached maxtasksperchild. Ignored unless the worker is ready."""

    worker_id: int


@dataclass(slots=True, kw_only=True)
class TaskStarted(Event):
    """Optional: the worker began the task at the head of its line (sharpens deadlines
    when tasks are prefetched)."""

    worker_id: int
    task_id: int


@dataclass(slots=True, kw_only=True)
class TaskProgress(Event):
    """Optional: ``items_done`` items of the running task are finished (sharpens the
    timeout of a chunk to the items it has left)."""

    worker_id: int
    task_id: int
    items_done: int


@dataclass(slots=True, kw_only=True)
class TaskDone(Event):
    """The worker finished the task at the head of its line.

    On success ``results`` holds one result per item, in order, and ``error`` is ``None``.
    If an item raised, ``error`` is that exception and ``results`` holds the results of
    the items before it (possibly none). ``duration`` is the time the worker measured,
    if it did (better for adaptive chunking than the core's own estimate).
    """

    worker_id: int
    task_id: int
    results: Sequence[object] = ()
    error: BaseException | None = None
    duration: float | None = None


@dataclass(slots=True, kw_only=True)
class TaskSkipped(Event):
    """The worker skipped a task the core revoked (``RevokeTask``) before it began it."""

    worker_id: int
    task_id: int


@dataclass(slots=True, kw_only=True)
class SendFailed(Event):
    """The driver could not send this task (e.g. an item does not pickle); nothing of it
    reached the worker, which is fine. The task fails with ``error``."""

    worker_id: int
    task_id: int
    error: BaseException
