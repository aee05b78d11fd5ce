"""Pool with real worker processes, under every start method: the standard surface and
manyproc's additions (tracebacks, bad input, progress, statistics, recycling)."""

from __future__ import annotations

import os
import pickle
import threading
import time

import pytest

import manyproc
from manyproc.pool import (
    BrokenPoolError,
    MaybeEncodingError,
    Pool,
    PoolClosedError,
    RemoteTaskError,
    RemoteTraceback,
)

pytestmark = pytest.mark.timeout(90)


def sqr(x):
    return x * x


def mul(x, y):
    return x * y


def pid_of(_):
    return os.getpid()


def kwargs_echo(a, b=0, *, c=0):
    return (a, b, c)


def fail_on(x, bad):
    if x == bad:
        raise ValueError(f"item {x} is bad")
    return x


def raise_runtime():
    raise RuntimeError(123)  # the line the traceback must show


class NeedsTwoArgs(Exception):
    def __init__(self, a, b):
        super().__init__(a)  # b is lost: pickling rebuilds with one argument and fails
        self.b = b


def raise_unrebuildable():
    raise NeedsTwoArgs("first", "second")


class HoldsLock(Exception):
    def __init__(self):
        super().__init__("with a lock")
        self.lock = threading.Lock()


def raise_unpicklable():
    raise HoldsLock()


def return_lock():
    return threading.Lock()


def nested_pool_sum(n):
    with Pool(2) as inner:
        return sum(inner.map(sqr, range(n)))


_init_state = {}


def set_state(value):
    _init_state["value"] = value


def read_state(_):
    return _init_state.get("value")


def init_fails():
    raise OSError("no database here")


@pytest.fixture
def pool(ctx):
    with Pool(2, context=ctx) as p:
        yield p
    p.join()


def test_apply_map_starmap_imap(pool):
    assert pool.apply(sqr, (4,)) == 16
    assert pool.apply(kwargs_echo, (1,), {"b": 2, "c": 3}) == (1, 2, 3)
    assert pool.map(sqr, range(20)) == [x * x for x in range(20)]
    assert pool.map(sqr, range(20), chunksize=7) == [x * x for x in range(20)]
    assert pool.starmap(mul, [(1, 2), (3, 4)]) == [2, 12]
    assert list(pool.imap(sqr, range(30), chunksize=4)) == [x * x for x in range(30)]
    assert sorted(pool.imap_unordered(sqr, iter(range(30)))) == [x * x for x in range(30)]
    assert pool.map(sqr, []) == []
    assert list(pool.imap(sqr, iter([]))) == []


def test_async_results_and_callbacks(pool):
    seen = []
    result = pool.apply_async(sqr, (3,), callback=seen.append)
    assert result.get(timeout=30) == 9
    assert result.ready() and result.successful()
    assert seen == [9]
    errors = []
    failing = pool.starmap_async(fail_on, [(1, 2), (2, 2)], error_callback=errors.append)
    failing.wait(30)
    assert not failing.successful()
    assert isinstance(errors[0], ValueError)
    with pytest.raises(ValueError, match="item 2 is bad"):
        failing.get()


def test_get_timeout_only_waits(pool):
    result = pool.apply_async(time.sleep, (0.5,))
    with pytest.raises(manyproc.TimeoutError):
        result.get(timeout=0.05)
    with pytest.raises(ValueError, match="not ready"):
        result.successful()
    assert result.get(timeout=30) is None


def test_worker_exception_keeps_its_type_traceback_and_note(pool):
    with pytest.raises(RuntimeError) as info:
        pool.apply(raise_runtime)
    error = info.value
    assert error.args == (123,)
    assert isinstance(error.__cause__, RemoteTraceback)
    assert "the line the traceback must show" in error.__cause__.tb
    notes = "\n".join(getattr(error, "__notes__", []))
    assert "worker pid" in notes and "raise_runtime" in notes


def test_map_error_names_the_item(pool):
    with pytest.raises(ValueError) as info:
        pool.starmap(fail_on, [(i, 7) for i in range(10)], chunksize=3)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "item 7" in notes


def test_exceptions_that_cannot_travel_come_back_as_text(pool):
    with pytest.raises(RemoteTaskError) as info:
        pool.apply(raise_unrebuildable)
    assert "NeedsTwoArgs" in str(info.value)
    assert "first" in str(info.value)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    with pytest.raises(RemoteTaskError, match="HoldsLock"):
        pool.apply(raise_unpicklable)
    assert pool.apply(sqr, (5,)) == 25  # and the pool goes on


def test_sys_exit_in_a_task_fails_the_task_only(pool):
    import sys

    with pytest.raises(RemoteTaskError, match="SystemExit: 3.*cannot end its worker"):
        pool.apply(sys.exit, (3,))
    assert pool.apply(sqr, (6,)) == 36
    assert pool.statistics().workers_lost == 0


def test_unpicklable_result_and_argument_fail_alone(pool):
    with pytest.raises(MaybeEncodingError) as info:
        pool.apply(return_lock)
    assert "lock" in str(info.value).lower()
    with pytest.raises(TypeError, match="lock"):
        pool.apply(sqr, (threading.Lock(),))
    with pytest.raises(TypeError):
        pool.map(sqr, [1, threading.Lock(), 3], chunksize=1)
    assert pool.map(sqr, [1, 2]) == [1, 4]


def test_lambdas_and_closures_run(pool):
    k = 10
    assert pool.map(lambda x: x + k, range(3)) == [10, 11, 12]
    assert pool.apply(lambda: k * 2) == 20


def test_bad_input_gets_clear_errors(ctx):
    with pytest.raises(ValueError, match="at least 1"):
        Pool(0, context=ctx)
    with pytest.raises(ValueError, match="at least 1"):
        Pool(-3, context=ctx)
    with pytest.raises(TypeError, match="processes"):
        Pool("2", context=ctx)  # type: ignore[arg-type]
    for value in (0, -1, 0.5, "12"):
        with pytest.raises(ValueError, match="maxtasksperchild"):
            Pool(1, maxtasksperchild=value, context=ctx)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="initializer"):
        Pool(1, initializer=3, context=ctx)  # type: ignore[arg-type]
    with Pool(1, context=ctx) as p:
        with pytest.raises(TypeError, match="needs a function.*got 5"):
            p.map(5, [1])  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="Chunksize must be 1"):
            p.map(sqr, [1], chunksize=0)
        with pytest.raises(ValueError, match="Chunksize must be 1"):
            p.imap(sqr, [1], chunksize=-1)
        with pytest.raises(TypeError, match="chunksize"):
            p.map(sqr, [1], chunksize=1.5)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="task_timeout"):
            p.apply(sqr, (1,), task_timeout=0)
    p.join()


def test_use_after_close_or_terminate(ctx):
    p = Pool(1, context=ctx)
    p.close()
    with pytest.raises(ValueError, match="Pool not running"):
        p.apply_async(sqr, (1,))
    with pytest.raises(PoolClosedError):
        p.map(sqr, [1])
    with pytest.raises(ValueError):
        with p:
            pass
    p.join()
    q = Pool(1, context=ctx)
    with pytest.raises(ValueError, match="still running"):
        q.join()
    q.terminate()
    with pytest.raises(ValueError, match="Pool not running"):
        q.imap(sqr, [1])
    q.join()
    assert "state=TERMINATE" in repr(q)
    with pytest.raises(NotImplementedError):
        pickle.dumps(q)


def test_terminate_cancels_pending_work_without_hanging(ctx):
    p = Pool(2, context=ctx)
    result = p.map_async(time.sleep, [30] * 50, chunksize=1)
    time.sleep(0.2)
    started = time.monotonic()
    p.terminate()
    p.join()
    assert time.monotonic() - started < 10
    with pytest.raises(Exception, match="terminated"):
        result.get(timeout=5)


def test_close_join_finishes_everything(ctx):
    p = Pool(2, context=ctx)
    results = [p.apply_async(sqr, (i,)) for i in range(20)]
    it = p.imap(sqr, range(50))  # not consumed before join: still runs to the end
    p.close()
    p.join()
    assert [r.get(0) for r in results] == [i * i for i in range(20)]
    assert list(it) == [i * i for i in range(50)]


def test_maxtasksperchild_recycles_workers_without_losing_work(ctx):
    with Pool(2, maxtasksperchild=2, context=ctx) as p:
        pids = p.map(pid_of, range(20), chunksize=1)
        assert len(set(pids)) > 2
        stats = p.statistics()
        assert stats.workers_recycled >= 2
        assert stats.tasks_done >= 20
    p.join()


_HOARD: list[bytes] = []


def hoard(nbytes):
    """A leaking task: keeps ``nbytes`` of touched memory in the worker for good."""
    _HOARD.append(b"x" * nbytes)
    return os.getpid()


def test_max_memory_per_child_replaces_a_worker_that_grew(ctx):
    from manyproc._backends.worker import resident_memory

    with Pool(1, context=ctx) as probe:
        limit = probe.apply(resident_memory) + 60 * 2**20  # a fresh worker, plus 60 MiB
    probe.join()
    with Pool(1, context=ctx, max_memory_per_child=limit) as p:
        pids = [p.apply(hoard, (25 * 2**20,)) for _ in range(8)]
        assert len(set(pids)) >= 2  # a worker past the limit was replaced
        assert pids.count(pids[0]) <= 4  # ... soon after it went past it
        stats = p.statistics()
        assert stats.workers_recycled >= 1 and stats.tasks_done == 8
        assert stats.tasks_lost == 0  # nothing was lost on the way
    p.join()
    from manyproc.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=ctx, max_memory_per_child=limit) as executor:
        pids = [executor.submit(hoard, 25 * 2**20).result() for _ in range(8)]
    assert len(set(pids)) >= 2


def test_max_memory_per_child_bad_values():
    with pytest.raises(TypeError, match="number of bytes"):
        Pool(1, max_memory_per_child="1GB")
    with pytest.raises(ValueError, match="positive"):
        Pool(1, max_memory_per_child=0)
    with pytest.raises(ValueError, match="no meaning with backend='threads'"):
        Pool(1, backend="threads", max_memory_per_child=2**30)


def test_initializer_runs_in_each_worker(ctx):
    with Pool(2, initializer=set_state, initargs=("ready",), context=ctx) as p:
        assert set(p.map(read_state, range(8))) == {"ready"}
    p.join()


def test_initializer_error_breaks_the_pool_instead_of_respawning(ctx):
    with Pool(2, initializer=init_fails, context=ctx) as p:
        result = p.apply_async(sqr, (1,))
        with pytest.raises(BrokenPoolError) as info:
            result.get(timeout=60)
        assert isinstance(info.value.__cause__, OSError)
        assert "no database here" in str(info.value)
    p.join()


def test_statistics(pool):
    pool.map(sqr, range(10), chunksize=1)
    stats = pool.statistics()
    assert stats.processes == 2
    assert stats.tasks_done >= 10
    assert len(stats.workers) == 2
    assert sum(w.items_done for w in stats.workers) >= 10
    assert stats.busy_time >= 0.0
    with pytest.raises(Exception):
        stats.tasks_done = 0  # frozen


def test_default_size_follows_the_cpu_budget(ctx):
    with Pool(context=ctx) as p:
        stats = p.statistics()
        assert stats.cpu_budget is not None
        assert stats.processes == stats.cpu_budget.count
        assert len(p._pool) == stats.processes
    p.join()


def test_progress_bar(pool, capsys):
    assert pool.map(sqr, range(40), chunksize=5, progress=True) == [x * x for x in range(40)]
    assert list(pool.imap(sqr, iter(range(10)), progress={"desc": "squares"})) == \
        [x * x for x in range(10)]
    err = capsys.readouterr().err
    assert "40/40" in err
    assert "squares" in err
    with pytest.raises(TypeError, match="progress"):
        pool.map(sqr, [1], progress="yes")


def test_a_worker_may_start_its_own_pool(ctx):
    with Pool(1, context=ctx) as p:
        assert p.apply(nested_pool_sum, (5,)) == sum(x * x for x in range(5))
    p.join()


def test_imap_reads_lazily(pool):
    pulled = []

    def source():
        for i in range(100_000):
            pulled.append(i)
            yield i

    it = pool.imap(sqr, source(), chunksize=1)
    assert next(it) == 0
    time.sleep(0.3)
    # bounded read-ahead (tasks in flight x items per batch), not the whole input
    assert len(pulled) < 10_000
    it.close()


def test_cancel_an_async_result(pool):
    result = pool.apply_async(time.sleep, (30,))
    time.sleep(0.2)
    assert result.cancel()
    with pytest.raises(Exception):
        result.get(timeout=5)
    assert pool.apply(sqr, (6,)) == 36
