"""manyproc.futures.ProcessPoolExecutor as a drop-in for concurrent.futures' one."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from concurrent.futures import (
    FIRST_COMPLETED,
    BrokenExecutor,
    CancelledError,
    Future,
    as_completed,
    wait,
)

import pytest

import manyproc
from manyproc.futures import ProcessPoolExecutor, ThreadPoolExecutor
from manyproc.pool import RemoteTraceback

pytestmark = pytest.mark.timeout(90)


def sqr(x):
    return x * x


def add(x, y):
    return x + y


def sleep_then(x):
    time.sleep(x)
    return x


def fail(message):
    raise KeyError(message)


def die():
    os._exit(5)


def init_fails():
    raise RuntimeError("initializer exploded")


def pid_of(_=None):
    return os.getpid()


@pytest.fixture
def executor(ctx):
    with ProcessPoolExecutor(2, mp_context=ctx) as ex:
        yield ex


def test_submit_returns_real_futures(executor):
    futures = [executor.submit(sqr, i) for i in range(10)]
    assert all(isinstance(f, Future) for f in futures)
    assert sorted(f.result(timeout=30) for f in as_completed(futures, timeout=30)) == \
        [i * i for i in range(10)]
    done, _ = wait([executor.submit(add, 1, y=2)], timeout=30)
    assert done.pop().result() == 3


def test_map_with_chunks_timeout_and_buffersize(executor):
    assert list(executor.map(sqr, range(20), chunksize=3)) == [i * i for i in range(20)]
    assert list(executor.map(add, range(5), range(5), buffersize=2)) == [0, 2, 4, 6, 8]
    results = executor.map(sleep_then, [5], timeout=0.2)
    with pytest.raises(TimeoutError):
        list(results)
    with pytest.raises(ValueError, match="chunksize"):
        executor.map(sqr, [1], chunksize=0)
    with pytest.raises(ValueError, match="buffersize"):
        executor.map(sqr, [1], buffersize=0)


def test_errors_keep_their_type_and_traceback(executor):
    future = executor.submit(fail, "missing")
    with pytest.raises(KeyError, match="missing"):
        future.result(timeout=30)
    assert isinstance(future.exception().__cause__, RemoteTraceback)
    with pytest.raises(KeyError):
        list(executor.map(fail, ["a"]))


def test_asyncio_integration(executor):
    async def main():
        loop = asyncio.get_running_loop()
        direct = await asyncio.gather(*(loop.run_in_executor(executor, sqr, i) for i in range(5)))
        wrapped = await asyncio.wrap_future(executor.submit(sqr, 7))
        return direct, wrapped

    assert asyncio.run(main()) == ([0, 1, 4, 9, 16], 49)


def test_a_dead_worker_fails_only_its_future(executor):
    slow = executor.submit(sleep_then, 0.3)
    doomed = executor.submit(die)
    with pytest.raises(manyproc.WorkerLostError) as info:
        doomed.result(timeout=30)
    assert isinstance(info.value, BrokenExecutor)  # old except clauses still catch it
    assert slow.result(timeout=30) == 0.3
    assert executor.submit(sqr, 4).result(timeout=30) == 16  # not broken for good


def test_cancel_keeps_the_standard_meaning_by_default(executor):
    running = [executor.submit(sleep_then, 1.0) for _ in range(2)]
    deadline = time.monotonic() + 30
    while not all(f.running() for f in running):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    pending = executor.submit(sqr, 3)
    queued = [executor.submit(sqr, i) for i in range(30)]
    assert not running[0].cancel()
    assert [f.result(timeout=30) for f in running] == [1.0, 1.0]
    assert pending.result(timeout=30) == 9
    cancelled = [f for f in queued if f.cancel()]
    for f in cancelled:
        assert f.cancelled()
        with pytest.raises(CancelledError):
            f.result()


def test_kill_on_cancel(ctx):
    with ProcessPoolExecutor(1, mp_context=ctx, kill_on_cancel=True) as ex:
        future = ex.submit(sleep_then, 60)
        deadline = time.monotonic() + 30
        while not future.running():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        callbacks = []
        future.add_done_callback(callbacks.append)
        assert future.cancel()
        assert future.cancelled() and callbacks == [future]
        assert ex.submit(sqr, 5).result(timeout=30) == 25


def test_task_timeout(ctx):
    with ProcessPoolExecutor(1, mp_context=ctx, task_timeout=0.5) as ex:
        with pytest.raises(manyproc.TaskTimeoutError):
            ex.submit(sleep_then, 60).result(timeout=30)
        assert ex.submit(sqr, 2).result(timeout=30) == 4


def test_shutdown(ctx):
    ex = ProcessPoolExecutor(1, mp_context=ctx)
    first = ex.submit(sleep_then, 0.5)
    rest = [ex.submit(sqr, i) for i in range(5)]
    deadline = time.monotonic() + 30
    while not first.running():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    ex.shutdown(wait=True, cancel_futures=True)
    assert first.result() == 0.5
    assert all(f.cancelled() or f.done() for f in rest)
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(sqr, 1)


def test_shutdown_without_wait_still_finishes(ctx):
    ex = ProcessPoolExecutor(2, mp_context=ctx)
    futures = [ex.submit(sleep_then, 0.2) for _ in range(4)]
    ex.shutdown(wait=False)
    done, not_done = wait(futures, timeout=30)
    assert not not_done
    ex.shutdown(wait=True)


def test_initializer_failure_breaks_the_executor(ctx):
    with ProcessPoolExecutor(2, mp_context=ctx, initializer=init_fails) as ex:
        future = ex.submit(sqr, 1)
        with pytest.raises(BrokenExecutor) as info:
            future.result(timeout=60)
        assert isinstance(info.value.__cause__, RuntimeError)
        with pytest.raises(BrokenExecutor):
            ex.submit(sqr, 1)


def test_max_tasks_per_child(ctx):
    with ProcessPoolExecutor(1, mp_context=ctx, max_tasks_per_child=2) as ex:
        pids = [ex.submit(pid_of).result(timeout=30) for _ in range(6)]
    assert len(set(pids)) == 3


def test_bad_arguments(ctx):
    with pytest.raises(ValueError, match="max_workers"):
        ProcessPoolExecutor(0, mp_context=ctx)
    with pytest.raises(ValueError, match="max_tasks_per_child"):
        ProcessPoolExecutor(1, mp_context=ctx, max_tasks_per_child=0)
    with pytest.raises(TypeError, match="initializer"):
        ProcessPoolExecutor(1, mp_context=ctx, initializer=5)
    with ProcessPoolExecutor(1, mp_context=ctx) as ex:
        with pytest.raises(TypeError, match="submit"):
            ex.submit(3)
        future = ex.submit(sqr, threading.Lock())
        with pytest.raises(TypeError, match="lock"):
            future.result(timeout=30)


def test_lambdas(executor):
    offset = 3
    assert executor.submit(lambda x: x + offset, 1).result(timeout=30) == 4
    assert list(executor.map(lambda x: -x, range(3))) == [0, -1, -2]


def test_progress(executor, capsys):
    assert list(executor.map(sqr, range(12), progress=True)) == [i * i for i in range(12)]
    assert "12/12" in capsys.readouterr().err


def test_thread_pool_executor():
    with ThreadPoolExecutor(2, task_timeout=5) as ex:
        assert list(ex.map(sqr, range(5))) == [0, 1, 4, 9, 16]
        future = ex.submit(fail, "x")
        with pytest.raises(KeyError):
            future.result(timeout=30)
        first = ex.submit(sleep_then, 0.2)
        wait([first], return_when=FIRST_COMPLETED, timeout=30)
        assert first.result() == 0.2


def test_map_task_timeout_fails_only_the_slow_item(ctx):
    with ProcessPoolExecutor(2, mp_context=ctx) as ex:
        results = ex.map(sleep_then, [0.0, 30.0, 0.0], task_timeout=0.5)
        assert next(results) == 0.0
        with pytest.raises(manyproc.TaskTimeoutError):
            next(results)
