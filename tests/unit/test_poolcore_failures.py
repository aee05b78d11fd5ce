"""Pool core: worker death, timeouts, cancel, recycling, start failures, close/terminate."""

from __future__ import annotations

import signal

import pytest

from manyproc import TaskTimeoutError, WorkerLostError
from manyproc._poolcore import (
    BrokenPoolError,
    CancelAll,
    CancelJob,
    CancelMode,
    Close,
    DeliverResults,
    InvalidTransition,
    JobKind,
    KillWorker,
    Outcome,
    PoolClosedError,
    PoolCoreError,
    PoolState,
    PoolStopped,
    Reason,
    ResolveJob,
    RetireWorker,
    RevokeTask,
    SendFailed,
    SendTask,
    SpawnWorker,
    StopWorker,
    TaskDone,
    TaskProgress,
    TaskSkipped,
    TaskStarted,
    TaskState,
    Terminate,
    WorkerExited,
    WorkerInitFailed,
    WorkerReady,
    WorkerStarted,
)

from .test_poolcore_harness import Harness, of, only

APPLY, MAP, IMAP = JobKind.APPLY, JobKind.MAP, JobKind.IMAP


# --- worker death --------------------------------------------------------------------------


def test_worker_death_fails_exactly_its_task_and_the_slot_is_refilled() -> None:
    h = Harness(processes=2)
    w1, w2 = h.boot()
    a, out_a = h.submit(APPLY, ["a"], label="f")
    b, out_b = h.submit(APPLY, ["b"])
    sa, sb = only(out_a, SendTask), only(out_b, SendTask)
    out = h.exit(sa.worker_id, exitcode=-signal.SIGKILL)
    resolve = only(out, ResolveJob)
    assert resolve.job_id == a and resolve.outcome is Outcome.ERROR
    err = resolve.error
    assert isinstance(err, WorkerLostError)
    assert (err.exitcode, err.pid, err.signal_name) == (-9, 1000 + sa.worker_id, "SIGKILL")
    assert "f (job 1)" in str(err)
    spawn = only(out, SpawnWorker)
    assert spawn.slot == 0 and spawn.worker_id not in (w1, w2)
    # the other job is untouched and the pool goes on
    assert only(h.finish(sb), ResolveJob).job_id == b
    stats = h.core.statistics()
    assert (stats.tasks_lost, stats.workers_lost) == (1, 1)
    assert stats.workers[0].restarts == 1 and stats.workers[0].tasks_lost == 1


def test_death_of_an_idle_worker_only_replaces_it() -> None:
    h = Harness(processes=1)
    (wid,) = h.boot()
    out = h.exit(wid, exitcode=0)
    assert of(out, ResolveJob) == [] and len(of(out, SpawnWorker)) == 1


def test_death_in_a_map_fails_the_map_with_worker_lost() -> None:
    h = Harness(processes=2)
    h.boot()
    _, out = h.submit(MAP, list(range(4)), chunksize=2, label="g")
    s0, _ = of(out, SendTask)
    out = h.exit(s0.worker_id, exitcode=-11)
    err = only(out, ResolveJob).error
    assert isinstance(err, WorkerLostError) and "g on items 0..1 (job 1)" in str(err)
    assert "SIGSEGV" in str(err)


def test_death_in_an_imap_fails_that_chunk_at_its_position_only() -> None:
    h = Harness(processes=2)
    h.boot()
    _, out = h.submit(IMAP, list(range(4)), chunksize=2)
    s0, s1 = of(out, SendTask)
    h.exit(s1.worker_id)
    out = h.finish(s0)
    starts = [(d.start, type(d.error)) for d in of(out, DeliverResults)]
    assert starts == [(0, type(None)), (2, WorkerLostError)]
    assert only(out, ResolveJob).outcome is Outcome.OK


def test_prefetched_tasks_of_a_dead_worker_go_back_to_the_queue() -> None:
    h = Harness(processes=1, prefetch=2)
    (wid,) = h.boot()
    _, out = h.submit(MAP, list(range(3)), chunksize=1)
    sends = of(out, SendTask)
    assert [s.start for s in sends] == [0, 1, 2] and {s.worker_id for s in sends} == {wid}
    out = h.exit(wid)
    assert isinstance(only(out, ResolveJob).error, WorkerLostError)
    new = only(out, SpawnWorker).worker_id
    out = h.ready(new)
    assert [s.start for s in of(out, SendTask)] == [1, 2]  # never began: sent again


def test_lost_task_retries_give_the_task_another_worker() -> None:
    h = Harness(processes=1, lost_task_retries=1)
    (wid,) = h.boot()
    job, out = h.submit(APPLY, ["x"])
    out = h.exit(wid)
    assert of(out, ResolveJob) == []
    out = h.ready(only(out, SpawnWorker).worker_id)
    send = only(out, SendTask)
    out = h.exit(send.worker_id)
    assert isinstance(only(out, ResolveJob).error, WorkerLostError)


def test_results_arriving_before_the_death_count() -> None:
    h = Harness(processes=1)
    (wid,) = h.boot()
    _, out = h.submit(APPLY, ["x"])
    send = only(out, SendTask)
    out = h.do(TaskDone(now=0, worker_id=wid, task_id=send.task_id, results=["ok"]),
               WorkerExited(now=0, worker_id=wid, exitcode=1))
    assert only(out, ResolveJob).value == "ok"


def test_no_instruction_targets_a_worker_that_exited_in_the_same_batch() -> None:
    h = Harness(processes=1, prefetch=1)
    (wid,) = h.boot()
    a, out = h.submit(APPLY, ["a"])
    b, out = h.submit(APPLY, ["b"])
    out = h.do(CancelJob(now=0, job_id=a), WorkerExited(now=0, worker_id=wid, exitcode=-9))
    assert [i for i in out if getattr(i, "worker_id", None) == wid] == []


# --- timeouts ------------------------------------------------------------------------------


def test_a_task_past_its_timeout_fails_and_its_worker_is_killed_and_replaced() -> None:
    h = Harness(processes=1)
    (wid,) = h.boot()
    job, out = h.submit(APPLY, ["x"], task_timeout=5.0, label="slow")
    assert h.core.next_deadline() == 5.0
    assert h.tick(4.9) == []
    out = h.tick(0.1)
    kill = only(out, KillWorker)
    assert (kill.worker_id, kill.reason) == (wid, Reason.TIMEOUT)
    err = only(out, ResolveJob).error
    assert isinstance(err, TaskTimeoutError) and isinstance(err, TimeoutError)
    assert (err.timeout, err.pid) == (5.0, 1000 + wid) and "slow" in str(err)
    assert len(of(out, SpawnWorker)) == 1
    # a result that raced with the kill is ignored, then the worker's exit is expected
    send = of(h.log, SendTask)[0]
    assert h.do(TaskDone(now=h.now, worker_id=wid, task_id=send.task_id, results=[1])) == []
    out = h.exit(wid)
    assert of(out, SpawnWorker) == [] and of(out, ResolveJob) == []
    assert h.core.statistics().tasks_timed_out == 1


def test_a_result_in_time_beats_the_timeout() -> None:
    h = Harness(processes=1)
    h.boot()
    _, out = h.submit(APPLY, ["x"], task_timeout=1.0)
    h.now = 0.5
    out = h.finish(only(out, SendTask))
    assert only(out, ResolveJob).outcome is Outcome.OK
    assert h.core.next_deadline() is None
    assert h.tick(10) == []


def test_chunk_timeout_scales_with_items_and_progress_tightens_it() -> None:
    h = Harness(processes=1)
    h.boot()
    _, out = h.submit(MAP, list(range(4)), chunksize=4, task_timeout=2.0)
    send = only(out, SendTask)
    assert h.core.next_deadline() == 8.0
    h.now = 1.0
    h.do(TaskProgress(now=1.0, worker_id=send.worker_id, task_id=send.task_id, items_done=3))
    assert h.core.next_deadline() == 3.0
    with pytest.raises(PoolCoreError, match="4 items"):
        h.core.handle(TaskProgress(now=1.0, worker_id=send.worker_id, task_id=send.task_id,
                                   items_done=5))


def test_prefetched_task_deadline_starts_when_it_reaches_the_head() -> None:
    h = Harness(processes=1, prefetch=1)
    h.boot()
    _, out = h.submit(MAP, ["a", "b"], chunksize=1, task_timeout=1.0)
    s0, s1 = of(out, SendTask)
    h.now = 0.9
    h.finish(s0)
    assert h.core.next_deadline() == pytest.approx(1.9)
    h.now = 1.2
    h.do(TaskStarted(now=1.2, worker_id=s1.worker_id, task_id=s1.task_id))
    assert h.core.next_deadline() == pytest.approx(2.2)


def test_timeout_kill_hands_back_the_prefetched_tasks() -> None:
    h = Harness(processes=1, prefetch=1)
    (wid,) = h.boot()
    _, out_a = h.submit(APPLY, ["a"], task_timeout=1.0)
    b, out_b = h.submit(APPLY, ["b"])
    out = h.tick(1.0)
    assert only(out, KillWorker).worker_id == wid
    assert [r.job_id for r in of(out, ResolveJob)] == [1]
    new = only(out, SpawnWorker).worker_id
    out = h.ready(new)
    assert only(out, SendTask).job_id == b


# --- cancel ----------------------------------------------------------------------------------


def test_cancel_of_a_queued_job_never_sends_it() -> None:
    h = Harness(processes=1)
    h.boot()
    _, out = h.submit(APPLY, ["a"])
    b, _ = h.submit(APPLY, ["b"])
    out = h.do(CancelJob(now=0, job_id=b))
    assert only(out, ResolveJob).outcome is Outcome.CANCELLED
    assert of(out, KillWorker) == []
    out = h.finish(of(h.log, SendTask)[0])
    assert of(out, SendTask) == []


def test_cancel_kill_of_a_running_job_kills_and_replaces_its_worker() -> None:
    h = Harness(processes=2)
    h.boot()
    job, out = h.submit(APPLY, ["a"])
    send = only(out, SendTask)
    out = h.do(CancelJob(now=0, job_id=job, mode=CancelMode.KILL))
    assert only(out, KillWorker) == KillWorker(worker_id=send.worker_id,
                                               reason=Reason.CANCELLED,
                                               stimulus_id=out[0].stimulus_id)
    assert only(out, ResolveJob).outcome is Outcome.CANCELLED
    assert len(of(out, SpawnWorker)) == 1
    assert h.exit(send.worker_id) == []
    assert h.core.statistics().tasks_cancelled == 1


def test_cancel_abandon_lets_running_tasks_finish_unobserved() -> None:
    h = Harness(processes=2)
    h.boot()
    job, out = h.submit(IMAP, list(range(6)), chunksize=1)
    s0, s1 = of(out, SendTask)
    out = h.do(CancelJob(now=0, job_id=job, mode=CancelMode.ABANDON))
    assert of(out, KillWorker) == [] and only(out, ResolveJob).outcome is Outcome.CANCELLED
    out = h.finish(s0)
    assert of(out, DeliverResults) == [] and of(out, SendTask) == []
    assert not h.core.has_job(job)


def test_cancel_of_a_prefetched_task_revokes_it() -> None:
    h = Harness(processes=1, prefetch=1)
    (wid,) = h.boot()
    a, out_a = h.submit(APPLY, ["a"])
    b, out_b = h.submit(APPLY, ["b"])
    sb = only(out_b, SendTask)
    out = h.do(CancelJob(now=0, job_id=b, mode=CancelMode.KILL))
    assert only(out, RevokeTask).task_id == sb.task_id
    assert of(out, KillWorker) == []  # the worker is busy with someone else's task
    assert only(out, ResolveJob).outcome is Outcome.CANCELLED
    out = h.finish(only(out_a, SendTask))
    assert only(out, ResolveJob).job_id == a
    out = h.do(TaskSkipped(now=0, worker_id=wid, task_id=sb.task_id))
    assert out == []
    assert h.core.statistics().workers[0].current_task is None


def test_a_revoked_task_that_ran_anyway_is_dropped() -> None:
    h = Harness(processes=1, prefetch=1)
    h.boot()
    _, out_a = h.submit(APPLY, ["a"])
    b, out_b = h.submit(APPLY, ["b"])
    h.do(CancelJob(now=0, job_id=b))
    h.finish(only(out_a, SendTask))
    out = h.finish(only(out_b, SendTask), ["late"])
    assert out == []


def test_skipping_a_task_that_was_not_revoked_is_a_driver_bug() -> None:
    h = Harness(processes=1)
    (wid,) = h.boot()
    _, out = h.submit(APPLY, ["a"])
    with pytest.raises(PoolCoreError, match="not revoked"):
        h.core.handle(TaskSkipped(now=0, worker_id=wid, task_id=only(out, SendTask).task_id))


# --- send failures (e.g. an argument that does not pickle) ---------------------------------


def test_a_task_that_cannot_be_sent_fails_alone() -> None:
    h = Harness(processes=1, prefetch=1)
    (wid,) = h.boot()
    a, out_a = h.submit(APPLY, ["unpicklable"])
    b, out_b = h.submit(APPLY, ["fine"])
    err = TypeError("cannot pickle 'generator' object")
    out = h.do(SendFailed(now=0, worker_id=wid, task_id=only(out_a, SendTask).task_id,
                          error=err))
    assert only(out, ResolveJob).error is err
    out = h.finish(only(out_b, SendTask))
    assert only(out, ResolveJob).job_id == b


# --- maxtasksperchild ------------------------------------------------------------------------


def test_maxtasksperchild_recycles_workers_without_stranding_work() -> None:
    h = Harness(processes=1, maxtasksperchild=2)
    (wid,) = h.boot()
    job, out = h.submit(MAP, list(range(5)), chunksize=1)
    out = h.finish(only(out, SendTask))
    out = h.finish(only(out, SendTask))
    assert only(out, StopWorker) == StopWorker(worker_id=wid, reason=Reason.RECYCLE,
                                               stimulus_id=out[0].stimulus_id)
    assert of(out, SendTask) == []
    new = only(out, SpawnWorker).worker_id
    everything = h.run_to_end(h.ready(new))
    assert only(everything, ResolveJob).value == [(i, "r") for i in range(5)]
    h.exit(wid, exitcode=0)
    stats = h.core.statistics()
    assert stats.workers_recycled == 2 and stats.workers[0].recycles == 2
    assert stats.workers[0].restarts == 0


def test_maxtasksperchild_limits_prefetch_too() -> None:
    h = Harness(processes=1, maxtasksperchild=2, prefetch=3)
    h.boot()
    _, out = h.submit(MAP, list(range(5)), chunksize=1)
    assert len(of(out, SendTask)) == 2


def test_retire_worker_replaces_it_once_its_task_is_done() -> None:
    h = Harness(processes=1)
    (wid,) = h.boot()
    _, out = h.submit(MAP, list(range(3)), chunksize=1)
    out = h.do(RetireWorker(now=0, worker_id=wid))
    assert of(out, StopWorker) == []  # it finishes what it runs
    out = h.finish(only(h.log, SendTask))
    assert only(out, StopWorker).reason is Reason.RECYCLE and of(out, SendTask) == []
    everything = h.run_to_end(h.ready(only(out, SpawnWorker).worker_id))
    assert only(everything, ResolveJob).value == [(i, "r") for i in range(3)]


def test_retiring_an_idle_worker_stops_it_at_once() -> None:
    h = Harness(processes=1)
    (wid,) = h.boot()
    out = h.do(RetireWorker(now=0, worker_id=wid))
    assert only(out, StopWorker).worker_id == wid and len(of(out, SpawnWorker)) == 1
    assert h.do(RetireWorker(now=0, worker_id=wid)) == []  # already stopping: ignored


# --- start failures and the restart-storm guard ----------------------------------------------


def test_initializer_failing_every_time_breaks_the_pool() -> None:
    h = Harness(processes=2, max_start_failures=3)
    ids = h.start()
    job, _ = h.submit(MAP, [1, 2, 3])
    init_error = ImportError("no module named 'foo'")
    events = []
    out = []
    for _ in range(3):
        wid = ids.pop(0)
        out = h.do(WorkerStarted(now=0, worker_id=wid, pid=wid),
                   WorkerInitFailed(now=0, worker_id=wid, error=init_error),
                   WorkerExited(now=0, worker_id=wid, exitcode=1))
        ids += [s.worker_id for s in of(out, SpawnWorker)]
        events.append(out)
    assert h.core.state is PoolState.BROKEN
    err = only(out, ResolveJob).error
    assert isinstance(err, BrokenPoolError) and err.__cause__ is init_error
    assert "3 worker processes in a row" in str(err) and "initializer raised ImportError" in str(
        err)
    assert of(out, SpawnWorker) == []
    assert [k.reason for k in of(out, KillWorker)] == [Reason.BROKEN]
    # new work is refused with the same explanation; the pool stops once workers are gone
    _, out = h.submit(APPLY, ["x"])
    assert isinstance(only(out, ResolveJob).error, BrokenPoolError)
    assert not h.core.accepting and isinstance(h.core.broken_error(), BrokenPoolError)
    out = h.exit(ids[0])
    assert of(out, PoolStopped) and h.core.stopped


def test_a_flaky_start_does_not_break_the_pool() -> None:
    h = Harness(processes=1, max_start_failures=2)
    (wid,) = h.start()
    out = h.exit(wid, exitcode=1)
    wid = only(out, SpawnWorker).worker_id
    h.ready(wid)
    out = h.exit(wid, exitcode=1)  # died after being ready: not a start failure
    wid = only(out, SpawnWorker).worker_id
    out = h.exit(wid, exitcode=1)
    assert h.core.state is PoolState.RUNNING and of(out, SpawnWorker)


def test_a_worker_that_never_gets_ready_is_killed_after_start_timeout() -> None:
    h = Harness(processes=1, start_timeout=3.0, max_start_failures=1)
    (wid,) = h.start()
    job, _ = h.submit(APPLY, ["x"])
    assert h.core.next_deadline() == 3.0
    out = h.tick(3.0)
    assert only(out, KillWorker).reason is Reason.START_TIMEOUT
    out = h.exit(wid)
    assert h.core.state is PoolState.BROKEN
    assert isinstance(only(out, ResolveJob).error, BrokenPoolError)


def test_spawn_failure_is_a_start_failure() -> None:
    h = Harness(processes=1, max_start_failures=1)
    (wid,) = h.start()
    h.submit(APPLY, ["x"])
    boom = OSError(11, "fork: Resource temporarily unavailable")
    out = h.do(WorkerExited(now=0, worker_id=wid, error=boom))
    err = only(out, ResolveJob).error
    assert isinstance(err, BrokenPoolError) and err.__cause__ is boom


# --- close, terminate, cancel-all ------------------------------------------------------------


def test_close_finishes_work_then_stops_workers() -> None:
    h = Harness(processes=2)
    w1, w2 = h.boot()
    job, out = h.submit(APPLY, ["x"])
    send = only(out, SendTask)
    out = h.do(Close(now=0))
    idle = w2 if send.worker_id == w1 else w1
    assert [s.worker_id for s in of(out, StopWorker)] == []  # work is pending
    _, out = h.submit(APPLY, ["late"])
    assert isinstance(only(out, ResolveJob).error, PoolClosedError)
    assert isinstance(only(out, ResolveJob).error, ValueError)
    out = h.finish(send)
    assert {s.worker_id for s in of(out, StopWorker)} == {w1, w2}
    assert h.exit(idle, 0) == []
    assert of(h.exit(send.worker_id, 0), PoolStopped)


def test_a_stopped_worker_that_does_not_exit_is_killed() -> None:
    h = Harness(processes=1, stop_timeout=2.0)
    (wid,) = h.boot()
    h.do(Close(now=0))
    assert h.core.next_deadline() == 2.0
    out = h.tick(2.0)
    assert only(out, KillWorker).reason is Reason.STOP_TIMEOUT


def test_close_with_cancel_pending_cancels_jobs_not_started() -> None:
    h = Harness(processes=1)
    h.boot()
    a, out = h.submit(APPLY, ["a"])
    b, _ = h.submit(APPLY, ["b"])
    out = h.do(Close(now=0, cancel_pending=True))
    assert [(r.job_id, r.outcome) for r in of(out, ResolveJob)] == [(b, Outcome.CANCELLED)]
    out = h.finish(of(h.log, SendTask)[0])
    assert only(out, ResolveJob).job_id == a and len(of(out, StopWorker)) == 1


def test_terminate_kills_everything_and_ends_every_job() -> None:
    h = Harness(processes=2)
    ids = h.boot()
    a, _ = h.submit(MAP, list(range(10)), chunksize=1)
    b, _ = h.submit(APPLY, ["b"])
    out = h.do(Terminate(now=0))
    assert {k.worker_id for k in of(out, KillWorker)} == set(ids)
    assert {(r.job_id, r.outcome) for r in of(out, ResolveJob)} == {
        (a, Outcome.CANCELLED), (b, Outcome.CANCELLED)}
    assert of(out, SpawnWorker) == []
    assert h.core.state is PoolState.TERMINATED
    h.exit(ids[0])
    assert of(h.exit(ids[1]), PoolStopped)


def test_terminate_with_an_error_fails_jobs_with_it() -> None:
    h = Harness(processes=1)
    h.boot()
    job, _ = h.submit(APPLY, ["x"])
    err = KeyboardInterrupt()
    out = h.do(Terminate(now=0, error=err))
    assert only(out, ResolveJob).error is err


def test_cancel_all_ends_every_job_and_the_pool_goes_on() -> None:
    h = Harness(processes=2)
    ids = h.boot()
    a, _ = h.submit(MAP, list(range(10)), chunksize=1)
    b, _ = h.submit(APPLY, ["b"])
    err = KeyboardInterrupt()
    out = h.do(CancelAll(now=0, error=err))
    assert {(r.job_id, r.error) for r in of(out, ResolveJob)} == {(a, err), (b, err)}
    assert {k.worker_id for k in of(out, KillWorker)} == set(ids)
    assert len(of(out, SpawnWorker)) == 2
    assert h.core.accepting
    for wid in ids:
        h.exit(wid)
    new = [s.worker_id for s in of(out, SpawnWorker)]
    h.ready(*new)
    c, out = h.submit(APPLY, ["c"])
    assert only(h.finish(only(out, SendTask)), ResolveJob).job_id == c


def test_close_before_any_worker_stops_at_once() -> None:
    h = Harness(processes=2, eager_spawn=False)
    h.start()
    assert of(h.do(Close(now=0)), PoolStopped)


# --- protocol violations ---------------------------------------------------------------------


def test_a_result_for_a_task_the_worker_is_not_running_is_a_driver_bug() -> None:
    h = Harness(processes=2)
    w1, w2 = h.boot()
    _, out = h.submit(APPLY, ["x"])
    send = only(out, SendTask)
    other = w2 if send.worker_id == w1 else w1
    with pytest.raises(PoolCoreError, match="in the order they were sent"):
        h.core.handle(TaskDone(now=0, worker_id=other, task_id=send.task_id, results=[1]))


def test_events_about_unknown_workers_are_driver_bugs() -> None:
    h = Harness(processes=1)
    (wid,) = h.boot()
    h.exit(wid)
    with pytest.raises(PoolCoreError, match="does not know"):
        h.core.handle(WorkerExited(now=0, worker_id=wid))
    with pytest.raises(PoolCoreError, match="does not know"):
        h.core.handle(WorkerReady(now=0, worker_id=999))


def test_an_illegal_move_raises_with_the_task_story() -> None:
    h = Harness(processes=1)
    h.boot()
    _, out = h.submit(APPLY, ["x"])
    task = h.core._tasks[only(out, SendTask).task_id]
    with pytest.raises(InvalidTransition) as info:
        h.core._move(task, TaskState.SENT)
    assert info.value.start == "RUNNING" and info.value.finish == "SENT"
    assert [s for _, _, s in info.value.story] == ["QUEUED", "RUNNING"]
    assert "QUEUED" in str(info.value)


# --- abandoned tasks and workers being killed --------------------------------------------


def test_an_abandoned_task_that_hangs_still_gets_its_worker_killed() -> None:
    h = Harness(processes=1, prefetch=1)
    (wid,) = h.boot()
    _, out_a = h.submit(APPLY, ["a"])
    b, _ = h.submit(APPLY, ["b"], task_timeout=2.0)
    h.do(CancelJob(now=0, job_id=b))  # revoked, but the worker may run it anyway
    h.finish(only(out_a, SendTask))  # now "b" is at the head of the line
    out = h.tick(2.0)
    assert only(out, KillWorker).reason is Reason.TIMEOUT
    assert of(out, ResolveJob) == []  # b was resolved (cancelled) once, already
    assert len(of(out, SpawnWorker)) == 1


def test_a_worker_dying_with_an_abandoned_task_fails_only_the_running_one() -> None:
    h = Harness(processes=1, prefetch=1)
    (wid,) = h.boot()
    a, _ = h.submit(APPLY, ["a"])
    b, _ = h.submit(APPLY, ["b"])
    h.do(CancelJob(now=0, job_id=b))
    out = h.exit(wid)
    assert [(r.job_id, type(r.error)) for r in of(out, ResolveJob)] == [(a, WorkerLostError)]


def test_messages_from_a_worker_being_killed_are_ignored() -> None:
    h = Harness(processes=1, prefetch=1)
    (wid,) = h.boot()
    a, out = h.submit(APPLY, ["a"], task_timeout=1.0)
    b, out_b = h.submit(APPLY, ["b"])
    sa, sb = only(out, SendTask), only(out_b, SendTask)
    h.tick(1.0)
    for event in (TaskStarted(now=1, worker_id=wid, task_id=sa.task_id),
                  TaskProgress(now=1, worker_id=wid, task_id=sa.task_id, items_done=1),
                  SendFailed(now=1, worker_id=wid, task_id=sb.task_id, error=TypeError()),
                  TaskSkipped(now=1, worker_id=wid, task_id=sb.task_id)):
        assert h.do(event) == []
    assert h.core.has_job(b)  # handed back, waiting for the new worker


@pytest.mark.parametrize("kwargs", [
    dict(processes=0), dict(processes=1.0), dict(processes=True), dict(processes=1, prefetch=-1),
    dict(processes=1, maxtasksperchild=0), dict(processes=1, max_start_failures=0),
    dict(processes=1, stop_timeout=0), dict(processes=1, start_timeout=-1.0),
    dict(processes=1, chunk_target_seconds=0),
])
def test_bad_pool_configs_are_refused(kwargs) -> None:
    from manyproc._poolcore import PoolConfig
    with pytest.raises(ValueError, match="PoolConfig"):
        PoolConfig(**kwargs)
