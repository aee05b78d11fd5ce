"""ThreadPool and manyproc.dummy.Pool: the pool API on threads (no processes)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError

import pytest

import manyproc
from manyproc import dummy
from manyproc.pool import BrokenPoolError, PoolClosedError, ThreadPool

pytestmark = pytest.mark.timeout(30)


def sqr(x):
    return x * x


def test_the_standard_surface():
    with ThreadPool(3) as pool:
        assert len(pool._pool) == 3
        assert pool.apply(sqr, (3,)) == 9
        assert pool.map(sqr, range(10)) == [x * x for x in range(10)]
        assert pool.starmap(pow, [(2, 3), (3, 2)]) == [8, 9]
        assert list(pool.imap(sqr, iter(range(5)))) == [0, 1, 4, 9, 16]
        assert sorted(pool.imap_unordered(sqr, range(5), chunksize=2)) == [0, 1, 4, 9, 16]
        seen = []
        pool.map_async(sqr, [1, 2], callback=seen.append).wait(10)
        assert seen == [[1, 4]]
    pool.join()


def test_dummy_pool_is_a_thread_pool():
    pool = dummy.Pool(2)
    try:
        assert isinstance(pool, ThreadPool)
        assert pool.map(sqr, [4]) == [16]
    finally:
        pool.close()
        pool.join()


def test_errors_are_the_original_objects():
    error = KeyError("boom")

    def fail():
        raise error

    with ThreadPool(1) as pool:
        with pytest.raises(KeyError) as info:
            pool.apply(fail)
        assert info.value is error
    pool.join()


def test_a_task_timeout_abandons_the_thread_and_replaces_it():
    release = threading.Event()
    with ThreadPool(1) as pool:
        started = time.monotonic()
        with pytest.raises(manyproc.TaskTimeoutError) as info:
            pool.apply(release.wait, (10,), task_timeout=0.2)
        assert time.monotonic() - started < 5
        assert "in wait" in info.value.worker_stack  # where the thread was stuck
        assert "cannot be killed" in str(info.value)
        assert pool.apply(sqr, (5,)) == 25  # a new thread took the place
        assert pool.statistics().tasks_timed_out == 1
        release.set()
    pool.join()


def test_terminate_with_a_stuck_thread_does_not_hang():
    release = threading.Event()
    pool = ThreadPool(2)
    result = pool.apply_async(release.wait, (10,))
    time.sleep(0.05)
    started = time.monotonic()
    pool.terminate()
    pool.join()
    assert time.monotonic() - started < 5
    with pytest.raises(CancelledError, match="terminated"):
        result.get(1)
    release.set()


def test_initializer_errors_break_the_pool():
    def init():
        raise OSError("cannot init")

    with ThreadPool(2, initializer=init) as pool:
        with pytest.raises(BrokenPoolError) as info:
            pool.apply(sqr, (1,))
        assert isinstance(info.value.__cause__, OSError)
    pool.join()


def test_closed_pool_refuses_work_and_join_needs_close():
    pool = ThreadPool(1)
    with pytest.raises(ValueError, match="still running"):
        pool.join()
    pool.close()
    with pytest.raises(PoolClosedError, match="Pool not running"):
        pool.apply(sqr, (1,))
    with pytest.raises(ValueError):
        pool.map(sqr, [1])
    pool.join()


def test_validation():
    with pytest.raises(ValueError, match="at least 1"):
        ThreadPool(0)
    with pytest.raises(TypeError, match="initializer"):
        ThreadPool(1, initializer="nope")  # type: ignore[arg-type]
    with ThreadPool(1) as pool:
        with pytest.raises(TypeError, match="needs a function"):
            pool.apply_async(None)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="Chunksize"):
            list(pool.imap(sqr, [1], chunksize=0))
        with pytest.raises(ValueError, match="task_timeout"):
            pool.map(sqr, [1], task_timeout=-1)
    pool.join()


def test_imap_close_drops_the_rest():
    ran = []

    def record(x):
        ran.append(x)
        time.sleep(0.01)
        return x

    with ThreadPool(1) as pool:
        it = pool.imap(record, range(1000))
        assert next(it) == 0
        it.close()
        with pytest.raises(StopIteration):
            next(it)
        time.sleep(0.1)
        assert len(ran) < 100
    pool.join()


def test_imap_next_timeout():
    release = threading.Event()
    with ThreadPool(1) as pool:
        it = pool.imap(release.wait, [10])
        with pytest.raises(manyproc.TimeoutError):
            it.next(timeout=0.05)
        release.set()
        assert next(it) is True
    pool.join()


def test_callbacks_run_before_the_result_is_ready():
    order = []
    with ThreadPool(2) as pool:
        result = pool.apply_async(sqr, (2,), callback=lambda v: order.append(("callback", v)))
        result.wait(10)
        order.append(("ready", result.ready()))
    pool.join()
    assert order == [("callback", 4), ("ready", True)]


def test_statistics_count_work():
    with ThreadPool(2) as pool:
        pool.map(sqr, range(20), chunksize=1)
        stats = pool.statistics()
        assert stats.tasks_done == 20 and stats.processes == 2
        assert sum(w.tasks_done for w in stats.workers) == 20
    pool.join()
