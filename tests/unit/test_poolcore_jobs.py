"""Pool core: jobs, ordering, input, windows, progress (event -> instruction assertions)."""

from __future__ import annotations

import pytest

from manyproc._poolcore import (
    CancelJob,
    CancelMode,
    Consumed,
    DeliverResults,
    FeedInput,
    InputFailed,
    JobKind,
    JobProgress,
    JobSpec,
    Outcome,
    PoolCoreError,
    RequestInput,
    ResolveJob,
    SendTask,
    SpawnWorker,
    Start,
    SubmitJob,
    TaskDone,
)

from .test_poolcore_harness import Harness, of, only

APPLY, MAP, IMAP, UNORDERED = JobKind.APPLY, JobKind.MAP, JobKind.IMAP, JobKind.IMAP_UNORDERED


# --- workers and dispatch --------------------------------------------------------------


def test_start_spawns_one_worker_per_slot() -> None:
    h = Harness(processes=3)
    out = h.do(Start(now=0.0))
    spawns = of(out, SpawnWorker)
    assert [s.slot for s in spawns] == [0, 1, 2]
    assert len({s.worker_id for s in spawns}) == 3


def test_nothing_spawns_before_start() -> None:
    h = Harness(processes=2)
    _, out = h.submit(APPLY, ["x"])
    assert of(out, SpawnWorker) == []


def test_on_demand_spawns_only_for_queued_work() -> None:
    h = Harness(processes=4, eager_spawn=False)
    assert h.start() == []
    _, out = h.submit(APPLY, ["x"])
    assert len(of(out, SpawnWorker)) == 1
    _, out = h.submit(APPLY, ["y"])
    assert len(of(out, SpawnWorker)) == 1  # the first worker is still starting
    _, out = h.submit(MAP, list(range(100)), chunksize=10)
    assert len(of(out, SpawnWorker)) == 2  # the last two slots


def test_tasks_go_only_to_ready_workers() -> None:
    h = Harness(processes=1)
    (wid,) = h.start()
    _, out = h.submit(APPLY, ["x"])
    assert of(out, SendTask) == []
    out = h.ready(wid)
    send = only(out, SendTask)
    assert (send.worker_id, send.items, send.start) == (wid, ("x",), 0)


def test_apply_resolves_with_the_single_result() -> None:
    h = Harness(processes=1)
    h.boot()
    job, out = h.submit(APPLY, [("args", "kwds")])
    out = h.finish(only(out, SendTask), ["value"])
    assert only(out, ResolveJob) == ResolveJob(job_id=job, outcome=Outcome.OK, value="value",
                                               stimulus_id=out[0].stimulus_id)
    assert not h.core.has_job(job)


def test_apply_error_resolves_with_the_exception() -> None:
    h = Harness(processes=1)
    h.boot()
    job, out = h.submit(APPLY, ["x"])
    boom = ValueError("boom")
    resolve = only(h.finish(only(out, SendTask), error=boom), ResolveJob)
    assert resolve.outcome is Outcome.ERROR and resolve.error is boom


def test_jobs_are_served_first_come_first_served() -> None:
    h = Harness(processes=1)
    h.boot()
    a, out_a = h.submit(APPLY, ["a"])
    b, _ = h.submit(APPLY, ["b"])
    c, _ = h.submit(APPLY, ["c"])
    order = [only(out_a, SendTask).job_id]
    out = out_a
    for _ in range(2):
        out = h.finish(only(out, SendTask))
        order.append(only(out, SendTask).job_id)
    assert order == [a, b, c]


def test_a_free_worker_takes_the_next_task_at_once() -> None:
    h = Harness(processes=2)
    h.boot()
    _, out = h.submit(MAP, list(range(6)), chunksize=1)
    first = of(out, SendTask)
    assert len(first) == 2
    out = h.finish(first[1])
    nxt = only(out, SendTask)
    assert nxt.worker_id == first[1].worker_id and nxt.start == 2


def test_duplicate_job_id_is_a_driver_bug() -> None:
    h = Harness()
    spec = JobSpec(kind=APPLY)
    h.do(SubmitJob(now=0, job_id=7, spec=spec, items=["x"]))
    with pytest.raises(PoolCoreError, match="already in use"):
        h.core.handle(SubmitJob(now=0, job_id=7, spec=spec, items=["y"]))


def test_apply_needs_exactly_one_item() -> None:
    h = Harness()
    with pytest.raises(PoolCoreError, match="exactly one item"):
        h.core.handle(SubmitJob(now=0, job_id=1, spec=JobSpec(kind=APPLY), items=[1, 2]))


@pytest.mark.parametrize("kwargs, error", [
    (dict(kind=MAP, chunksize=0), ValueError),
    (dict(kind=MAP, chunksize=1.5), TypeError),
    (dict(kind=MAP, chunksize=True), TypeError),
    (dict(kind=MAP, max_in_flight=0), ValueError),
    (dict(kind=MAP, task_timeout=0), ValueError),
    (dict(kind=APPLY, chunksize=4), ValueError),
    (dict(kind=MAP, ack_consumption=True), ValueError),
    (dict(kind="map"), TypeError),
])
def test_bad_job_specs_are_refused_with_a_message(kwargs, error) -> None:
    with pytest.raises(error, match=r"\w"):
        JobSpec(**kwargs)


# --- map ---------------------------------------------------------------------------------


def test_map_cuts_fixed_chunks_and_returns_results_in_input_order() -> None:
    h = Harness(processes=2)
    h.boot()
    job, out = h.submit(MAP, list(range(7)), chunksize=3)
    sends = of(out, SendTask)
    assert [(s.start, s.items) for s in sends] == [(0, (0, 1, 2)), (3, (3, 4, 5))]
    out = h.finish(sends[1], [30, 40, 50])  # the second chunk finishes first
    last = only(out, SendTask)
    assert (last.start, last.items) == (6, (6,))
    out = h.finish(last, [60])
    assert of(out, ResolveJob) == []
    out = h.finish(sends[0], [0, 10, 20])
    assert only(out, ResolveJob).value == [0, 10, 20, 30, 40, 50, 60]


def test_map_of_nothing_resolves_at_once() -> None:
    h = Harness()
    job, out = h.submit(MAP, [])
    assert only(out, ResolveJob).value == []
    assert not h.core.has_job(job)


def test_map_fails_with_the_first_error_and_keeps_running_the_rest() -> None:
    # the standard library's map: the first failing chunk fails the call, other chunks
    # still run (their side effects happen) and their results are dropped
    h = Harness(processes=1)
    h.boot()
    job, out = h.submit(MAP, list(range(3)), chunksize=1)
    err = KeyError("bad item")
    out = h.finish(only(out, SendTask), error=err)
    resolve = only(out, ResolveJob)
    assert resolve.outcome is Outcome.ERROR and resolve.error is err
    rest = h.run_to_end(out)
    assert len(of(rest, SendTask)) == 2
    assert len(of(h.log, ResolveJob)) == 1
    assert not h.core.has_job(job)


def test_map_cancel_on_error_drops_the_work_not_started() -> None:
    h = Harness(processes=1)
    h.boot()
    job, out = h.submit(MAP, list(range(5)), chunksize=1, cancel_on_error=True)
    out = h.finish(only(out, SendTask), error=KeyError("x"))
    assert only(out, ResolveJob).outcome is Outcome.ERROR
    assert of(out, SendTask) == []
    assert not h.core.has_job(job)
    assert h.core.statistics().tasks_cancelled == 0  # never cut: the input was dropped


def test_partial_results_before_an_error_are_accepted() -> None:
    h = Harness(processes=1)
    h.boot()
    _, out = h.submit(IMAP, list(range(4)), chunksize=4)
    err = ValueError("item 2")
    out = h.finish(only(out, SendTask), [0, 1], error=err)
    d = only(out, DeliverResults)
    assert (d.start, d.stop, tuple(d.values), d.error) == (0, 4, (0, 1), err)


@pytest.mark.parametrize("results, error", [([1, 2], None), ([1, 2, 3, 4], None),
                                            ([1, 2, 3], ValueError())])
def test_wrong_number_of_results_is_a_driver_bug(results, error) -> None:
    h = Harness(processes=1)
    h.boot()
    _, out = h.submit(MAP, [1, 2, 3], chunksize=3)
    send = only(out, SendTask)
    with pytest.raises(PoolCoreError, match="3 items"):
        h.core.handle(TaskDone(now=0, worker_id=send.worker_id, task_id=send.task_id,
                               results=results, error=error))


# --- imap / imap_unordered ---------------------------------------------------------------


def test_imap_delivers_in_input_order_without_gaps() -> None:
    h = Harness(processes=3)
    h.boot()
    job, out = h.submit(IMAP, list(range(6)), chunksize=2)
    s0, s1, s2 = of(out, SendTask)
    assert of(h.finish(s2), DeliverResults) == []
    assert of(h.finish(s1), DeliverResults) == []
    out = h.finish(s0)
    delivered = [(d.start, d.stop) for d in of(out, DeliverResults)]
    assert delivered == [(0, 2), (2, 4), (4, 6)]
    assert only(out, ResolveJob).outcome is Outcome.OK
    assert out.index(only(out, ResolveJob)) > out.index(of(out, DeliverResults)[-1])


def test_imap_error_surfaces_at_its_position_and_the_stream_goes_on() -> None:
    h = Harness(processes=1)
    h.boot()
    job, out = h.submit(IMAP, list(range(3)), chunksize=1)
    err = ValueError("one")
    out = h.finish(only(out, SendTask), [0])
    out = h.finish(only(out, SendTask), error=err)
    d = only(out, DeliverResults)
    assert (d.start, d.error) == (1, err)
    out = h.finish(only(out, SendTask), [2])
    assert only(out, DeliverResults).start == 2
    assert only(out, ResolveJob).outcome is Outcome.OK


def test_imap_unordered_delivers_as_completed() -> None:
    h = Harness(processes=2)
    h.boot()
    _, out = h.submit(UNORDERED, list(range(4)), chunksize=2)
    s0, s1 = of(out, SendTask)
    out = h.finish(s1)
    assert [d.start for d in of(out, DeliverResults)] == [2]
    out = h.finish(s0)
    assert [d.start for d in of(out, DeliverResults)] == [0]
    assert only(out, ResolveJob).outcome is Outcome.OK


# --- lazy input and backpressure -----------------------------------------------------------


def test_lazy_input_is_requested_within_the_window() -> None:
    h = Harness(processes=2)
    h.boot()
    job, out = h.submit(IMAP, [], exhausted=False, chunksize=2, max_in_flight=3)
    assert only(out, RequestInput) == RequestInput(job_id=job, count=6,
                                                   stimulus_id=out[0].stimulus_id)
    out = h.do(FeedInput(now=0, job_id=job, items=list(range(6))))
    assert [s.items for s in of(out, SendTask)] == [(0, 1), (2, 3)]
    assert of(out, RequestInput) == []  # 3 tasks' worth is buffered or running


def test_window_bounds_tasks_in_flight_and_waiting_for_order() -> None:
    h = Harness(processes=3)
    h.boot()
    job, out = h.submit(IMAP, list(range(10)), chunksize=1, max_in_flight=3)
    s0, s1, s2 = of(out, SendTask)
    # later tasks finish while the first one runs: results wait, and hold the window
    out = h.finish(s1) + h.finish(s2)
    assert of(out, SendTask) == []
    assert h.core.statistics().tasks_running == 1
    out = h.finish(s0)
    assert [d.start for d in of(out, DeliverResults)] == [0, 1, 2]
    assert len(of(out, SendTask)) == 3


def test_input_is_requested_again_as_results_are_released() -> None:
    h = Harness(processes=1)
    h.boot()
    job, out = h.submit(IMAP, [], exhausted=False, chunksize=1, max_in_flight=2)
    assert only(out, RequestInput).count == 2
    out = h.do(FeedInput(now=0, job_id=job, items=["a", "b"]))
    out = h.finish(only(out, SendTask))
    assert only(out, RequestInput).count == 1
    out = h.do(FeedInput(now=0, job_id=job, items=["c"], exhausted=True))
    assert of(out, RequestInput) == []
    out = h.run_to_end(of(h.log, SendTask)[-1:])
    assert only(out, ResolveJob).outcome is Outcome.OK
    assert h.core.progress(job) is None


def test_ack_consumption_holds_the_window_until_consumed() -> None:
    h = Harness(processes=2)
    h.boot()
    job, out = h.submit(UNORDERED, list(range(5)), chunksize=1, max_in_flight=2,
                        ack_consumption=True)
    s0, s1 = of(out, SendTask)
    out = h.finish(s0) + h.finish(s1)
    assert len(of(out, DeliverResults)) == 2 and of(out, SendTask) == []
    out = h.do(Consumed(now=0, job_id=job, count=1))
    assert len(of(out, SendTask)) == 1


def test_default_window_applies_to_lazy_input() -> None:
    h = Harness(processes=2, prefetch=1)
    job, out = h.submit(IMAP, [], exhausted=False)
    assert only(out, RequestInput).count == 2 * 2 * 2  # window 8 tasks of one item


def test_input_failure_in_a_stream_is_delivered_at_its_position() -> None:
    h = Harness(processes=1)
    h.boot()
    job, out = h.submit(IMAP, [], exhausted=False, chunksize=1, max_in_flight=4)
    out = h.do(FeedInput(now=0, job_id=job, items=["a", "b"]))
    err = OSError("the generator raised")
    out = h.do(InputFailed(now=0, job_id=job, error=err))
    assert of(out, DeliverResults) == []  # waits for items 0 and 1
    out = h.run_to_end(of(h.log, SendTask)[-1:])
    deliveries = of(out, DeliverResults)
    assert [(d.start, d.error) for d in deliveries] == [(0, None), (1, None), (2, err)]
    assert only(out, ResolveJob).outcome is Outcome.OK


def test_input_failure_fails_a_map() -> None:
    h = Harness(processes=1)
    h.boot()
    job, out = h.submit(MAP, [], exhausted=False, chunksize=1)
    err = OSError("nope")
    out = h.do(InputFailed(now=0, job_id=job, error=err))
    assert only(out, ResolveJob).error is err


def test_a_short_answer_to_an_input_request_is_asked_again() -> None:
    h = Harness(processes=1)
    job, out = h.submit(IMAP, [], exhausted=False, chunksize=1, max_in_flight=4)
    assert only(out, RequestInput).count == 4
    out = h.do(FeedInput(now=0, job_id=job, items=["a"]))
    assert only(out, RequestInput).count == 3


def test_feeding_an_ended_input_is_a_driver_bug() -> None:
    h = Harness()
    job, _ = h.submit(IMAP, [], exhausted=False)
    h.do(FeedInput(now=0, job_id=job, items=[1], exhausted=True))
    with pytest.raises(PoolCoreError, match="already ended"):
        h.core.handle(FeedInput(now=0, job_id=job, items=[2]))


def test_input_for_a_cancelled_job_is_ignored() -> None:
    h = Harness()
    job, _ = h.submit(IMAP, [], exhausted=False)
    h.do(CancelJob(now=0, job_id=job))
    assert h.do(FeedInput(now=0, job_id=job, items=[1, 2])) == []


# --- progress, statistics, story ---------------------------------------------------------


def test_progress_counts_items_done_out_of_total() -> None:
    h = Harness(processes=1)
    h.boot()
    job, out = h.submit(MAP, list(range(5)), chunksize=2, progress=True)
    assert h.core.progress(job).done == 0
    out = h.finish(only(out, SendTask))
    assert only(out, JobProgress) == JobProgress(job_id=job, done=2, total=5,
                                                 stimulus_id=out[0].stimulus_id)
    assert (h.core.progress(job).done, h.core.progress(job).total) == (2, 5)


def test_progress_total_unknown_until_lazy_input_ends() -> None:
    h = Harness(processes=1)
    h.boot()
    job, _ = h.submit(IMAP, [], exhausted=False, progress=True)
    assert h.core.progress(job).total is None
    job2, _ = h.submit(IMAP, [], exhausted=False, length_hint=40)
    assert h.core.progress(job2).total == 40


def test_statistics_count_tasks_items_and_busy_time_per_slot() -> None:
    h = Harness(processes=2)
    ids = h.boot()
    _, out = h.submit(MAP, list(range(4)), chunksize=2)
    s0, s1 = of(out, SendTask)
    h.now = 1.5
    h.finish(s0)
    stats = h.core.statistics()
    by_worker = {w.worker_id: w for w in stats.workers}
    assert by_worker[s0.worker_id].tasks_done == 1
    assert by_worker[s0.worker_id].items_done == 2
    assert by_worker[s0.worker_id].busy_time == pytest.approx(1.5)
    assert by_worker[s1.worker_id].busy_time == pytest.approx(1.5)  # still running
    assert by_worker[s1.worker_id].current_task == s1.task_id
    assert {w.pid for w in stats.workers} == {1000 + i for i in ids}
    assert (stats.tasks_done, stats.tasks_running, stats.jobs_pending) == (1, 1, 1)


def test_every_instruction_carries_its_stimulus_and_the_story_tells_it() -> None:
    h = Harness(processes=1)
    h.boot()
    job, out = h.submit(APPLY, ["x"])
    send = only(out, SendTask)
    out = h.do(TaskDone(now=0, worker_id=send.worker_id, task_id=send.task_id,
                        results=["y"], stimulus_id="done-42"))
    assert {i.stimulus_id for i in out} == {"done-42"}
    story = h.core.story("task", send.task_id)
    assert [e.action for e in story][-2:] == ["running", "done"]
    assert story[-1].stimulus_id == "done-42"
    assert h.core.story(stimulus_id="done-42")
    assert any("resolved" in e.action for e in h.core.story("job", job))


def test_story_can_be_switched_off() -> None:
    h = Harness(processes=1, story_length=0)
    h.boot()
    h.submit(APPLY, ["x"])
    assert h.core.story() == []


def test_pending_only_cancel_of_an_unstarted_job() -> None:
    h = Harness(processes=1)
    h.boot()
    first, out = h.submit(APPLY, ["first"])
    running = only(out, SendTask)
    job, _ = h.submit(APPLY, ["second"])
    assert h.core.job_started(first) and not h.core.job_started(job)
    assert h.do(CancelJob(now=0, job_id=first, mode=CancelMode.PENDING_ONLY)) == []
    out = h.do(CancelJob(now=0, job_id=job, mode=CancelMode.PENDING_ONLY))
    assert only(out, ResolveJob).outcome is Outcome.CANCELLED
    out = h.finish(running)
    assert only(out, ResolveJob).job_id == first
    assert of(out, SendTask) == []  # the cancelled job never runs


def test_chunks_are_cut_across_pieces_of_fed_input() -> None:
    h = Harness(processes=1)
    job, out = h.submit(IMAP, [], exhausted=False, chunksize=3, max_in_flight=2)
    h.do(FeedInput(now=0, job_id=job, items=["a"]),
         FeedInput(now=0, job_id=job, items=("b", "c", "d")),
         FeedInput(now=0, job_id=job, items=["e", "f"], exhausted=True))
    out = h.run_to_end(h.ready(*h.start()))
    assert [(s.start, s.items) for s in of(out, SendTask)] == [
        (0, ("a", "b", "c")), (3, ("d", "e", "f"))]
    assert only(out, ResolveJob).outcome is Outcome.OK


def test_a_whole_tuple_input_is_sent_without_a_copy() -> None:
    h = Harness(processes=1)
    h.boot()
    payload = (("args",), {"k": "w"})
    _, out = h.submit(APPLY, (payload,))
    send = only(out, SendTask)
    assert send.items[0] is payload
    h.finish(send)
    items = (1, 2, 3)
    _, out = h.submit(MAP, items, chunksize=3)
    assert only(out, SendTask).items is items
