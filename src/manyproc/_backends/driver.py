"""The driver: carries out the pool core's instructions with a backend's workers.

One ``Driver`` per pool. It owns the ``PoolCore``, one lock that guards it, the
callers' job records, and a backend (worker processes or threads). The driver
decides nothing itself; it moves events in and carries instructions out::

    caller threads               Driver (lock)                          backend
    --------------               -------------                          -------
    submit / cancel / close ---> core.handle(event) --> SendTask ------> send (no wait)
    get() / next() / join():         |                  Spawn/Stop/Kill  spawn / stop / kill
      leader/follower wait           v                  Deliver/Resolve  job records
        the leader, lock released:  poll() <---------- worker messages, deaths
        then core.handle(events) -> instructions -> actions (callbacks) run unlocked
    background thread: leads when no caller waits (callbacks, deaths, timeouts)
    feeder thread: reads lazy input (RequestInput) so no user iterator ever runs
                   under the lock or in the leader

Leader/follower: a thread that must wait (``wait_until``) reads the workers' channels
itself when nobody else does, so a result reaches the thread that wants it without a
hand-off between threads. Others wait on a condition and are woken after each round.
The background thread takes the lead only when no caller has led for a short grace
period, and a caller that starts to wait while it leads wakes it up to take over.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from manyproc import util
from manyproc._poolcore import (
    CancelAll,
    CancelJob,
    CancelMode,
    Close,
    Consumed,
    DeliverResults,
    Event,
    FeedInput,
    InputFailed,
    Instruction,
    JobProgress,
    JobSpec,
    KillWorker,
    Outcome,
    PoolConfig,
    PoolCore,
    PoolCoreError,
    PoolStatistics,
    PoolStopped,
    ReleaseWindow,
    RequestInput,
    ResolveJob,
    RevokeTask,
    SendFailed,
    SendTask,
    SpawnWorker,
    Start,
    StopWorker,
    SubmitJob,
    Terminate,
    Tick,
    WorkerExited,
    WorkerStarted,
)

from .base import JobRecord, WorkerBackend

__all__ = ["Driver"]

#: Seconds the background thread leaves the lead to callers after one of them led.
GRACE = 0.005
#: Seconds the feeder gathers lazy input before it hands over what it has.
FEED_LATENCY = 0.01

_monotonic = time.monotonic
_get_ident = threading.get_ident


def _run_actions(actions: list[Callable[[], Any]]) -> None:
    """Run callbacks collected under the lock; one failing must not stop the others."""
    for action in actions:
        try:
            action()
        except Exception:  # noqa: BLE001 - a user callback's error is reported, not raised
            import traceback

            traceback.print_exc()


class Driver:
    """Runs one pool: the core, the lock, the job records, the leader and helper threads."""

    def __init__(self, backend: WorkerBackend, config: PoolConfig, *, name: str) -> None:
        self.backend = backend
        self.name = name
        self._core = PoolCore(config)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._jobs: dict[int, JobRecord] = {}
        self._lingering: dict[int, JobRecord] = {}  # resolved jobs whose tasks still run
        self._job_ids = itertools.count(1)
        self._actions: list[Callable[[], Any]] = []
        self._followups: list[Event] = []
        self._leader = 0  # thread id of the thread reading the channels, or 0
        self._leader_is_background = False
        self._preempted = False
        self._waiting = 0  # caller threads inside wait_until
        self._last_caller_lead = 0.0
        self._stopped = False  # PoolStopped was seen (or the pool died)
        self._closed = False  # resources released
        self._fatal: BaseException | None = None
        self._starting = False
        self._doomed = ""  # "terminate" or "close", asked for without the lock
        self._released: deque[int] = deque()  # release_window_later()
        self.cancel_reason = "the pool was terminated before this job finished"
        self._background: threading.Thread | None = None
        # lazy input
        self._sources: dict[int, Iterator[Any]] = {}
        self._wanted: dict[int, int] = {}
        self._fed: dict[int, tuple[int, int]] = {}  # job -> (items fed, fixed chunksize)
        self._feed_queue: deque[int] = deque()
        self._feeder: threading.Thread | None = None
        self._feeder_cond = threading.Condition(self._lock)
        self._background_cond = threading.Condition(self._lock)
        self._dispatch: dict[type, Callable[[Any], None]] = {
            SendTask: self._do_send,
            DeliverResults: self._do_deliver,
            ResolveJob: self._do_resolve,
            JobProgress: self._do_progress,
            RequestInput: self._do_request_input,
            SpawnWorker: self._do_spawn,
            StopWorker: self._do_stop,
            KillWorker: self._do_kill,
            RevokeTask: self._do_revoke,
            PoolStopped: self._do_pool_stopped,
        }

    # --- the face's calls ----------------------------------------------------------------

    def start(self) -> None:
        """Start the workers (in this thread, so that a failure to start one raises here)."""
        failure: BaseException | None = None
        with self._lock:
            self._starting = True
            try:
                self._handle([Start(now=_monotonic())])
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after cleanup
                failure = exc
                self._stopped = True
            self._starting = False
        if failure is not None:
            try:
                self.backend.kill_all_now()
                self._release_resources()
            finally:
                raise failure
        thread = threading.Thread(target=self._background_loop, name=f"{self.name}-driver",
                                  daemon=True)
        self._background = thread
        thread.start()

    @property
    def core(self) -> PoolCore:
        """The pool core (read it with the lock held: see ``locked``)."""
        return self._core

    @property
    def lock(self) -> threading.Lock:
        return self._lock

    @property
    def stopped(self) -> bool:
        """Whether every worker is gone for good."""
        return self._stopped

    def submit(self, record: JobRecord, spec: JobSpec, items: Sequence[Any] = (),
               exhausted: bool = True, source: Iterator[Any] | None = None) -> int:
        """Give the core a new job; ``source`` feeds lazy input (``exhausted=False``)."""
        with self._lock:
            job_id = next(self._job_ids)
            record.job_id = job_id
            self._jobs[job_id] = record
            if source is not None:
                self._sources[job_id] = source
                self._fed[job_id] = (0, spec.chunksize or 1)
            self._handle([SubmitJob(now=_monotonic(), job_id=job_id, spec=spec, items=items,
                                    exhausted=exhausted)])
            self._wake_leader_for_deadlines()
            actions = self._take_actions()
        if actions:
            self._after(actions)
        return job_id

    def _wake_leader_for_deadlines(self) -> None:
        """A leader polling without a timeout must learn of a deadline it did not know."""
        if self._leader and self._leader != _get_ident() and self._core.next_deadline():
            self.backend.wakeup()

    def cancel(self, job_id: int, mode: CancelMode) -> bool:
        """Cancel a job; returns whether the job is now over (False if it had started and
        ``mode`` only cancels pending jobs)."""
        with self._lock:
            if not self._core.has_job(job_id) or job_id not in self._jobs:
                return job_id not in self._jobs
            if mode is CancelMode.PENDING_ONLY and self._core.job_started(job_id):
                return False
            self._handle([CancelJob(now=_monotonic(), job_id=job_id, mode=mode)])
            actions = self._take_actions()
        self._after(actions)
        return True

    def job_started(self, job_id: int) -> bool:
        with self._lock:
            return self._core.job_started(job_id)

    def consumed(self, job_id: int, count: int) -> None:
        """The caller used ``count`` deliveries of a job that acknowledges consumption."""
        with self._lock:
            if job_id in self._jobs:
                self._handle([Consumed(now=_monotonic(), job_id=job_id, count=count)])
                self._wake_leader_for_deadlines()
            actions = self._take_actions()
        if actions:
            self._after(actions)

    def release_window(self, job_id: int) -> None:
        """Nobody will consume this job's results in step any more: let it run freely."""
        with self._lock:
            if not self._stopped and job_id in self._jobs:
                self._handle([ReleaseWindow(now=_monotonic(), job_id=job_id)])
            actions = self._take_actions()
        if actions:
            self._after(actions)

    def release_window_later(self, job_id: int) -> None:
        """Like ``release_window``, from any context (``__del__``): takes no lock."""
        self._released.append(job_id)
        self.backend.wakeup()

    def terminate_soon(self) -> None:
        """Terminate from any context (a garbage collector's callback): takes no lock;
        the background thread does the work."""
        self._doomed = "terminate"
        self.backend.wakeup()

    def close_soon(self) -> None:
        """Close from any context, like ``terminate_soon``."""
        if not self._doomed:
            self._doomed = "close"
        self.backend.wakeup()

    def close(self, cancel_pending: bool = False) -> None:
        """No new jobs; workers stop once the pending ones are done."""
        with self._lock:
            if not self._stopped:
                self._handle([Close(now=_monotonic(), cancel_pending=cancel_pending)])
            actions = self._take_actions()
        self._after(actions)

    def terminate(self, error: BaseException | None = None) -> None:
        """Kill every worker and end every pending job (with ``error``, else cancelled)."""
        with self._lock:
            self.cancel_reason = "the pool was terminated before this job finished"
            if not self._stopped:
                self._handle([Terminate(now=_monotonic(), error=error)])
            actions = self._take_actions()
        self._after(actions)

    def interrupt(self) -> None:
        """Ctrl-C in a blocking call: cancel every job and kill every worker at once."""
        try:
            with self._lock:
                self.cancel_reason = ("cancelled by KeyboardInterrupt (Ctrl-C) in a blocking "
                                      "call of the pool")
                if not self._stopped:
                    self._handle([CancelAll(now=_monotonic())])
                actions = self._take_actions()
        except BaseException:
            self.backend.kill_all_now()
            raise
        self._after(actions)

    def statistics(self) -> PoolStatistics:
        with self._lock:
            return self._core.statistics()

    def workers(self) -> list[Any]:
        with self._lock:
            return self.backend.workers()

    # --- waiting: leader / follower ------------------------------------------------------

    def wait_until(self, ready: Callable[[], bool], timeout: float | None = None) -> bool:
        """Wait until ``ready()`` (checked with the lock held) or the timeout; lead if free.

        Returns:
            Whether ``ready()`` became true.
        """
        deadline = None if timeout is None else _monotonic() + timeout
        lock = self._lock
        with lock:
            if ready():
                return True
            self._waiting += 1
            led = False
            try:
                while not ready():
                    if self._stopped and not self._leader:
                        # nothing will ever change again; ready() may still be false for
                        # an abandoned job, so do not wait for ever
                        return bool(ready())
                    remaining = None
                    if deadline is not None:
                        remaining = deadline - _monotonic()
                        if remaining <= 0:
                            return False
                    if not self._leader:
                        led = True
                        self._lead(remaining, background=False)
                    else:
                        if self._leader_is_background and not self._preempted:
                            self._preempted = True
                            self.backend.wakeup()
                        self._cond.wait(remaining)
                return True
            finally:
                self._waiting -= 1
                if led:
                    self._last_caller_lead = _monotonic()

    def _lead(self, timeout: float | None, *, background: bool) -> None:
        """One round as leader: poll the workers without the lock, then handle what came.

        Called and returns with the lock held.
        """
        core = self._core
        backend = self.backend
        self._leader = _get_ident()
        self._leader_is_background = background
        due = core.next_deadline()
        if due is not None:
            until_due = max(0.0, due - _monotonic())
            timeout = until_due if timeout is None else min(timeout, until_due)
        backend.prepare_poll()
        lock = self._lock
        lock.release()
        try:
            events = backend.poll(timeout)
        finally:
            lock.acquire()
            self._leader = 0
            self._preempted = False
        backend.flush()
        if self._released or self._doomed:
            self._pending_requests(events)
        due = core.next_deadline()
        if due is not None:
            now = _monotonic()
            if due <= now:
                events.append(Tick(now=now))
        if events and not self._stopped:
            self._handle(events)
        actions = self._take_actions()
        if actions:
            lock.release()
            try:
                _run_actions(actions)
            finally:
                lock.acquire()
            # While the actions ran, another thread may have taken the lead and be polling
            # for a result one of them has just made ready: wake it too.
            self._wake_waiters()
        elif self._cond._waiters:  # type: ignore[attr-defined]  # (notify_all is not free)
            self._cond.notify_all()

    def _pending_requests(self, events: list[Event]) -> None:
        """Requests made without the lock (from ``__del__`` or a finalizer)."""
        now = _monotonic()
        while self._released:
            job_id = self._released.popleft()
            if job_id in self._jobs:
                events.append(ReleaseWindow(now=now, job_id=job_id))
        doomed, self._doomed = self._doomed, ""
        if doomed == "terminate":
            self.cancel_reason = ("the pool was terminated because it was garbage-collected "
                                  "while running; keep a reference to it, or close() it")
            events.append(Terminate(now=now))
        elif doomed == "close":
            events.append(Close(now=now))

    def _background_loop(self) -> None:
        """Lead when no caller does: callbacks, deaths, timeouts, progress.

        While callers come and go it sleeps on its own condition, checking every
        ``GRACE`` seconds: waking it (and making it contend for the lock) after each of
        their rounds would cost more than the rounds themselves.
        """
        lock = self._lock
        with lock:
            try:
                while not self._stopped:
                    if not self._leader and not self._waiting:
                        quiet = _monotonic() - self._last_caller_lead
                        if quiet < GRACE:
                            self._background_cond.wait(GRACE - quiet)
                            continue
                        self._lead(None, background=True)
                    else:
                        self._background_cond.wait(GRACE)
            except BaseException as exc:  # pragma: no cover - a bug; never hang the callers
                self._die(exc)
            finally:
                self._cond.notify_all()
            while self._leader:  # let a caller's round end before closing what it polls
                self._cond.wait(0.1)
        self._release_resources()

    # --- handling events and instructions --------------------------------------------------

    def _handle(self, events: list[Event]) -> None:
        """Feed events to the core and carry out what it says (lock held)."""
        core = self._core
        dispatch = self._dispatch
        try:
            out: list[Instruction] = core.handle(*events)
            while out:
                followups = self._followups = []
                for instruction in out:
                    dispatch[type(instruction)](instruction)
                out = core.handle(*followups) if followups else []
            self._followups = []
        except PoolCoreError as exc:
            self._die(exc)
            raise
        self.backend.flush()
        if self._lingering:
            for job_id in [j for j in self._lingering if not core.has_job(j)]:
                del self._lingering[job_id]

    def _take_actions(self) -> list[Callable[[], Any]]:
        actions = self._actions
        if actions:
            self._actions = []
        return actions

    def _after(self, actions: list[Callable[[], Any]]) -> None:
        """Run actions outside the lock, then wake waiters who may have been satisfied."""
        if actions:
            _run_actions(actions)
        with self._lock:
            self._wake_waiters()

    def _wake_waiters(self) -> None:
        """Something changed outside a leader's round: wake followers, and the leader too
        (it may be waiting for what just happened). Lock held."""
        if self._cond._waiters:  # type: ignore[attr-defined]  # (notify_all is not free)
            self._cond.notify_all()
        if self._leader and self._leader != _get_ident():
            self.backend.wakeup()

    def _record(self, job_id: int) -> JobRecord | None:
        record = self._jobs.get(job_id)
        if record is None:
            record = self._lingering.get(job_id)
        return record

    def _do_send(self, ins: SendTask) -> None:
        record = self._record(ins.job_id)
        assert record is not None, f"SendTask for unknown job {ins.job_id}"
        if record.wants_start:
            record.wants_start = False
            record.on_start()
        error = self.backend.send(ins.worker_id, ins.task_id, record, ins.start, ins.items)
        if error is not None:
            self._followups.append(SendFailed(now=_monotonic(), worker_id=ins.worker_id,
                                              task_id=ins.task_id, error=error))

    def _do_deliver(self, ins: DeliverResults) -> None:
        record = self._jobs.get(ins.job_id)
        if record is not None:
            record.on_deliver(ins.start, ins.values, ins.error)

    def _do_resolve(self, ins: ResolveJob) -> None:
        job_id = ins.job_id
        record = self._jobs.pop(job_id, None)
        self._sources.pop(job_id, None)
        self._wanted.pop(job_id, None)
        self._fed.pop(job_id, None)
        if record is None:
            return
        if self._core.has_job(job_id):
            self._lingering[job_id] = record
        outcome = ins.outcome
        action = record.on_resolve(outcome is Outcome.OK, outcome is Outcome.CANCELLED,
                                   ins.value, ins.error)
        if action is not None:
            self._actions.append(action)

    def _do_progress(self, ins: JobProgress) -> None:
        record = self._jobs.get(ins.job_id)
        if record is not None:
            action = record.on_progress(ins.done, ins.total)
            if action is not None:
                self._actions.append(action)

    def _do_request_input(self, ins: RequestInput) -> None:
        job_id = ins.job_id
        if job_id not in self._sources:
            return
        if job_id not in self._wanted:
            self._wanted[job_id] = 0
            self._feed_queue.append(job_id)
        self._wanted[job_id] += ins.count
        if self._feeder is None:
            self._feeder = threading.Thread(target=self._feeder_loop, name=f"{self.name}-feeder",
                                            daemon=True)
            self._feeder.start()
        self._feeder_cond.notify()

    def _do_spawn(self, ins: SpawnWorker) -> None:
        try:
            pid = self.backend.spawn(ins.worker_id, ins.slot)
        except Exception as exc:
            if self._starting:
                raise
            util.debug("could not start a pool worker: %r", exc)
            self._followups.append(WorkerExited(now=_monotonic(), worker_id=ins.worker_id,
                                                error=exc))
            return
        self._followups.append(WorkerStarted(now=_monotonic(), worker_id=ins.worker_id,
                                             pid=pid))

    def _do_stop(self, ins: StopWorker) -> None:
        self.backend.stop(ins.worker_id)

    def _do_kill(self, ins: KillWorker) -> None:
        error = ins.timed_out
        if error is not None and hasattr(error, "add_worker_stack"):
            stack = self.backend.where_stuck(ins.worker_id)
            if stack:
                error.add_worker_stack(stack)  # before anyone can see the error
        self.backend.kill(ins.worker_id)

    def _do_revoke(self, ins: RevokeTask) -> None:
        self.backend.revoke(ins.worker_id, ins.task_id)

    def _do_pool_stopped(self, ins: PoolStopped) -> None:
        self._stopped = True
        self._feeder_cond.notify_all()
        self._background_cond.notify_all()
        self._cond.notify_all()

    # --- lazy input --------------------------------------------------------------------------

    def _feeder_loop(self) -> None:
        """Read lazy input for the core, never holding the lock while user code runs."""
        lock = self._lock
        with lock:
            while not self._stopped:
                if not self._feed_queue:
                    self._feeder_cond.wait()
                    continue
                job_id = self._feed_queue.popleft()
                count = self._wanted.pop(job_id, 0)
                source = self._sources.get(job_id)
                if source is None or count <= 0:
                    continue
                lock.release()
                items: list[Any] = []
                error: BaseException | None = None
                exhausted = False
                try:
                    first = 0.0
                    append = items.append
                    for _ in range(count):
                        append(next(source))
                        if first == 0.0:
                            first = _monotonic()
                        elif _monotonic() - first > FEED_LATENCY:
                            break
                except StopIteration:
                    exhausted = True
                except BaseException as exc:  # noqa: BLE001 - the input's error is the job's
                    error = exc
                finally:
                    lock.acquire()
                if job_id not in self._sources:
                    continue  # the job ended meanwhile
                fed, chunksize = self._fed.get(job_id, (0, 1))
                if error is not None and chunksize > 1:
                    # as the standard library does: the error stands for the whole chunk
                    # it interrupted, whose first items are dropped
                    partial = (fed + len(items)) % chunksize
                    if partial:
                        del items[max(0, len(items) - partial):]
                self._fed[job_id] = (fed + len(items), chunksize)
                now = _monotonic()
                events: list[Event] = []
                if items or exhausted:
                    events.append(FeedInput(now=now, job_id=job_id, items=items,
                                            exhausted=exhausted))
                if error is not None:
                    events.append(InputFailed(now=now, job_id=job_id, error=error))
                    self._sources.pop(job_id, None)
                elif exhausted:
                    self._sources.pop(job_id, None)
                elif len(items) < count:
                    # handed over early for latency: ask again for the rest
                    if job_id not in self._wanted:
                        self._wanted[job_id] = 0
                        self._feed_queue.append(job_id)
                del items
                try:
                    self._handle(events)
                except PoolCoreError:
                    return
                del events
                actions = self._take_actions()
                if actions:
                    lock.release()
                    try:
                        _run_actions(actions)
                    finally:
                        lock.acquire()
                self._wake_waiters()

    # --- the end -------------------------------------------------------------------------------

    def _die(self, error: BaseException) -> None:
        """The core failed (a bug): kill everything, fail every job, never hang (lock held)."""
        if self._fatal is not None:
            return
        self._fatal = error
        self._stopped = True
        try:
            self.backend.kill_all_now()
        except Exception:  # noqa: BLE001
            pass
        records = list(self._jobs.values())
        self._jobs.clear()
        for record in records:
            failure = RuntimeError(f"the pool failed and had to be stopped: {error}")
            failure.__cause__ = error
            action = record.on_resolve(False, False, None, failure)
            if action is not None:
                self._actions.append(action)
        self._feeder_cond.notify_all()
        self._background_cond.notify_all()
        self._cond.notify_all()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until every worker is gone, then release the pool's resources."""
        if not self.wait_until(lambda: self._stopped, timeout):
            return False
        self._release_resources()
        background = self._background
        if background is not None and background is not threading.current_thread():
            background.join(timeout=5.0)
        feeder = self._feeder
        if feeder is not None and feeder is not threading.current_thread():
            feeder.join(timeout=0.5)
        return True

    def _release_resources(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._feeder_cond.notify_all()
            self._cond.notify_all()
            while self._leader and self._leader != _get_ident():
                # a round is polling the fds close() is about to free: let it end first
                self.backend.wakeup()
                self._cond.wait(0.1)
        self.backend.close()
