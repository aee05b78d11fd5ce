"""Queue, SimpleQueue and JoinableQueue between real processes, for every start method."""

from __future__ import annotations

import os
import pickle
import queue
import threading

import pytest

import manyproc as mp
from manyproc import queues, reduction

pytestmark = pytest.mark.timeout(90)

@pytest.fixture
def ctx(start_method):
    return mp.get_context(start_method)


# --------------------------------------------------------------------------- child targets


def produce(q, count, big):
    for i in range(count):
        q.put(i)
    q.put(b"\x01" * big)


def square_worker(tasks, results):
    for item in iter(tasks.get, None):
        results.put((item, item * item, os.getpid()))


def put_and_report(q, report):
    """Put more than a pipe holds and exit without anyone reading: the exit is reported."""
    reduction.set_shm_threshold(None)  # big data must fill the pipe, not shared memory
    queues.FLUSH_REPORT_DELAY = 0.1
    queues._report = report.send
    q.put(b"\x02" * (4 << 20))


def put_cancel_and_exit(q, report):
    reduction.set_shm_threshold(None)  # big data must fill the pipe, not shared memory
    queues._report = report.send
    q.put(b"\x03" * (4 << 20))
    q.cancel_join_thread()


def joinable_consumer(q, done_marker):
    while True:
        item = q.get()
        if item is None:
            q.task_done()
            break
        done_marker.put(item)
        q.task_done()


def simple_echo(inq, outq):
    outq.put(("echo", inq.get()))


def run(ctx, target, *args):
    p = ctx.Process(target=target, args=args)
    p.start()
    return p


def finish(*processes):
    for p in processes:
        p.join(30)
        if p.exitcode is None:
            p.kill()
            p.join(5)
    assert [p.exitcode for p in processes] == [0] * len(processes)


# --------------------------------------------------------------------------- Queue


def test_items_from_a_child_arrive_in_order(ctx):
    q = ctx.Queue()
    p = run(ctx, produce, q, 2000, 2 << 20)
    try:
        assert [q.get(timeout=30) for _ in range(2000)] == list(range(2000))
        assert q.get(timeout=30) == b"\x01" * (2 << 20)
    finally:
        finish(p)
    assert q.empty()
    q.close()
    q.join_thread()


def test_workers_fed_through_a_queue_stop_on_sentinels(ctx):
    tasks, results = ctx.Queue(), ctx.Queue()
    workers = [run(ctx, square_worker, tasks, results) for _ in range(3)]
    try:
        for i in range(300):
            tasks.put(i)
        for _ in workers:
            tasks.put(None)
        got = [results.get(timeout=30) for _ in range(300)]
    finally:
        finish(*workers)
    assert sorted(g[:2] for g in got) == [(i, i * i) for i in range(300)]
    for q in (tasks, results):
        q.close()
        q.join_thread()


def test_bounded_queue_full_empty_and_qsize(ctx):
    q = ctx.Queue(maxsize=2)
    assert q.empty() and not q.full() and q.qsize() == 0
    q.put("a")
    q.put_nowait("b")
    assert q.full() and q.qsize() == 2
    with pytest.raises(queue.Full):
        q.put("c", timeout=0.05)
    with pytest.raises(queue.Full):
        q.put_nowait("c")
    assert q.get(timeout=5) == "a"
    assert q.get(timeout=5) == "b"
    with pytest.raises(queue.Empty):
        q.get(timeout=0.05)
    with pytest.raises(queue.Empty):
        q.get_nowait()
    with pytest.raises(queue.Empty):
        q.get(False)
    assert q.qsize() == 0
    q.close()
    q.join_thread()


def test_unpicklable_object_fails_in_put_and_the_queue_goes_on(ctx):
    q = ctx.Queue(maxsize=1)
    with pytest.raises(TypeError, match="cannot pickle.*lock"):
        q.put({"lock": threading.Lock()})
    assert q.qsize() == 0  # nothing was counted for the failed put
    q.put(lambda x: x * 3)  # defined by value: pickled by cloudpickle
    assert q.get(timeout=10)(2) == 6
    q.close()
    q.join_thread()


def test_a_queue_cannot_travel_through_a_queue(ctx):
    q = ctx.Queue()
    with pytest.raises(RuntimeError, match="only be shared between processes through "
                                           "inheritance"):
        q.put(q)
    with pytest.raises(RuntimeError, match="inheritance"):
        pickle.dumps(q)
    q.close()


def test_closed_queue_refuses_use(ctx):
    q = ctx.Queue()
    with pytest.raises(AssertionError, match="not closed"):
        q.join_thread()
    q.put(1)
    q.close()
    with pytest.raises(ValueError, match="is closed"):
        q.put(2)
    with pytest.raises(ValueError, match="is closed"):
        q.get()
    q.join_thread()
    q.close()  # twice is fine
    assert "closed" in repr(q)


def test_child_that_cannot_flush_is_reported_not_silent(ctx):
    q = ctx.Queue()
    report_r, report_w = ctx.Pipe(duplex=False)
    p = run(ctx, put_and_report, q, report_w)
    report_w.close()
    try:
        assert report_r.poll(30), "the stuck child did not report"
        message = report_r.recv()
        assert "cannot exit yet" in message and "1 message(s)" in message
        assert "Get the items in another process before joining" in message
        assert p.is_alive()
        assert q.get(timeout=30) == b"\x02" * (4 << 20)
    finally:
        finish(p)
        report_r.close()
    q.close()


def test_cancel_join_thread_exits_and_reports_the_discarded_items(ctx):
    q = ctx.Queue()
    report_r, report_w = ctx.Pipe(duplex=False)
    p = run(ctx, put_cancel_and_exit, q, report_w)
    report_w.close()
    try:
        p.join(30)
        assert p.exitcode == 0
        assert report_r.poll(5)
        assert "were discarded because cancel_join_thread() was called" in report_r.recv()
    finally:
        finish(p)
        report_r.close()
    q.close()


def test_queue_keeps_working_in_a_forked_child_with_a_running_feeder():
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    q.put("before fork")  # the parent's feeder thread is running now
    assert q.get(timeout=10) == "before fork"
    p = run(ctx, produce, q, 10, 10)
    try:
        assert [q.get(timeout=30) for _ in range(10)] == list(range(10))
        assert q.get(timeout=30) == b"\x01" * 10
    finally:
        finish(p)
    q.close()
    q.join_thread()


def test_qsize_message_on_platforms_without_sem_getvalue():
    class NoGetValue:
        class _semlock:  # noqa: N801 - mimics the attribute name
            @staticmethod
            def _get_value():
                raise NotImplementedError

    q = queues.Queue.__new__(queues.Queue)
    q._sem = NoGetValue()
    q._maxsize = 3
    with pytest.raises(NotImplementedError, match="macOS"):
        q.qsize()


def test_maxsize_validation():
    with pytest.raises(TypeError, match="maxsize must be an int"):
        queues.Queue("10", ctx=None)
    with pytest.raises(ValueError, match="larger than"):
        queues.Queue(2**40, ctx=None)


def test_feeder_error_hook_of_a_subclass_still_receives_pickling_errors(ctx):
    seen = []

    class HookedQueue(queues.Queue):
        @staticmethod
        def _on_queue_feeder_error(e, obj):
            seen.append((type(e), obj))

    q = HookedQueue(ctx=ctx)
    lock = threading.Lock()
    q.put(lock)
    q.put("after")
    assert seen == [(TypeError, lock)]
    assert q.get(timeout=10) == "after"
    q.close()
    q.join_thread()


# --------------------------------------------------------------------------- others


def test_simple_queue_between_processes(ctx):
    inq, outq = ctx.SimpleQueue(), ctx.SimpleQueue()
    assert inq.empty()
    p = run(ctx, simple_echo, inq, outq)
    try:
        inq.put({"x": [1, 2]})
        assert outq.get() == ("echo", {"x": [1, 2]})
    finally:
        finish(p)
    assert outq.empty()
    with pytest.raises(TypeError, match="cannot pickle"):
        inq.put(threading.Lock())
    inq.close()
    outq.close()
    with pytest.raises(OSError, match="handle is closed"):
        outq.get()


def test_joinable_queue_join_waits_for_task_done(ctx):
    q = ctx.JoinableQueue()
    done = ctx.Queue()
    consumers = [run(ctx, joinable_consumer, q, done) for _ in range(2)]
    try:
        for i in range(50):
            q.put(i)
        q.join()  # returns only once every item was marked done
        assert sorted(done.get(timeout=10) for _ in range(50)) == list(range(50))
        for _ in consumers:
            q.put(None)
        q.join()
    finally:
        finish(*consumers)
    with pytest.raises(ValueError, match="task_done\\(\\) called too many times"):
        q.task_done()
    for x in (q, done):
        x.close()
        x.join_thread()


def consume_count(q, results, expected):
    got = [q.get(timeout=30) for _ in range(expected)]
    results.put(sorted(got))


def use_connection_from_queue(q):
    conn = q.get(timeout=30)
    conn.send(("got the connection", os.getpid()))
    conn.close()


def test_many_threads_putting_at_once(ctx):
    q, results = ctx.Queue(), ctx.Queue()
    p = run(ctx, consume_count, q, results, 4 * 500)
    try:
        threads = [threading.Thread(target=lambda k=k: [q.put((k, i)) for i in range(500)])
                   for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        got = results.get(timeout=60)
    finally:
        finish(p)
    assert got == sorted((k, i) for k in range(4) for i in range(500))
    for x in (q, results):
        x.close()
        x.join_thread()


def test_a_connection_travels_through_a_queue(ctx):
    from manyproc import resource_sharer

    q = ctx.Queue()
    here, there = ctx.Pipe()
    p = run(ctx, use_connection_from_queue, q)
    try:
        q.put(there)  # pickled now: the fd is offered by this process's fd sharer
        there.close()
        assert here.recv() == ("got the connection", p.pid)
    finally:
        finish(p)
        here.close()
        q.close()
        q.join_thread()
        resource_sharer.stop()


def wait_for_an_item(q, started):
    started.set()
    q.get()


@pytest.mark.parametrize("kind", ["Queue", "SimpleQueue", "JoinableQueue"])
def test_a_reader_killed_while_it_waits_does_not_wedge_the_queue(ctx, kind):
    """The standard library's blocked get() holds the read lock; SIGKILL it and every
    other reader hangs for ever. manyproc's readers wait without the lock."""
    import signal
    import time

    q = getattr(ctx, kind)()
    started = ctx.Event()
    readers = [ctx.Process(target=wait_for_an_item, args=(q, started)) for _ in range(2)]
    for p in readers:
        p.start()
    assert started.wait(30)
    time.sleep(0.3)  # both readers are blocked in get()
    for p in readers:
        os.kill(p.pid, signal.SIGKILL)
        p.join(30)
    q.put("after the kill")
    if kind == "SimpleQueue":
        assert q.get() == "after the kill"
    else:
        assert q.get(timeout=10) == "after the kill"
        q.put("again")
        assert q.get(timeout=10) == "again"
    q.close()


def put_many(q, ident, count, size):
    for k in range(count):
        q.put((ident, k, b"x" * size))
    import time

    time.sleep(60)  # killed by the test


@pytest.mark.parametrize("kind", ["Queue", "SimpleQueue"])
def test_a_writer_killed_while_the_pipe_is_full_does_not_wedge_the_queue(ctx, kind):
    """Writers take the write lock only for a write the pipe takes whole, so one killed
    while the reader lags holds no lock and leaves no half message behind."""
    import signal
    import time

    q = getattr(ctx, kind)()
    writers = [ctx.Process(target=put_many, args=(q, i, 40, 30_000)) for i in range(3)]
    for p in writers:
        p.start()
    time.sleep(1.0)  # the pipe is full and every writer waits for room
    os.kill(writers[0].pid, signal.SIGKILL)
    writers[0].join(30)
    counts = {0: 0, 1: 0, 2: 0}
    try:
        while counts[1] < 40 or counts[2] < 40:
            ident, _, payload = q.get(timeout=10) if kind == "Queue" else q.get()
            assert len(payload) == 30_000
            counts[ident] += 1
    finally:
        for p in writers[1:]:
            p.kill()
            p.join(30)
    assert counts[1] == counts[2] == 40
    q.close()
