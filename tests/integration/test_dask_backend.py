"""The Pool / executor API on a Dask cluster (backend="dask"), with manyproc's semantics."""

from __future__ import annotations

import copyreg
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
import types
from concurrent.futures import CancelledError, as_completed
from pathlib import Path

import psutil
import pytest

import manyproc
import manyproc.futures
import manyproc.pool
from manyproc.pool import Pool, RemoteTraceback

# The shared cluster outlives single tests (its worker processes are children of this
# process), so the leak check is done here, at module teardown (see ``client``).
pytestmark = [pytest.mark.timeout(60), pytest.mark.leaks_allowed]

SRC = str(Path(__file__).resolve().parents[2] / "src")



def needs_dask():
    """Import distributed (only when a test runs: see ``_keep_pickling_as_it_was``)."""
    return pytest.importorskip("distributed")


@pytest.fixture(scope="module", autouse=True)
def _keep_pickling_as_it_was():
    """Importing distributed installs tblib's pickling for every exception class that
    exists (``copyreg``), which changes how exceptions defined by other test modules
    travel; undo it when this module is done so that they run as they would alone."""
    saved = dict(copyreg.dispatch_table)
    yield
    table = copyreg.dispatch_table
    for cls in list(table):
        if cls is types.TracebackType or (isinstance(cls, type)
                                          and issubclass(cls, BaseException)):
            if cls in saved:
                table[cls] = saved[cls]
            else:
                del table[cls]


def _children() -> set[int]:
    found = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(
                    child.cmdline()):
                found.add(child.pid)
        except psutil.Error:
            pass
    return found


def _wait_gone(pids: set[int], timeout: float = 10.0) -> set[int]:
    deadline = time.monotonic() + timeout
    left = pids & _children()
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = pids & _children()
    return left


@pytest.fixture(scope="module")
def client():
    """Two single-threaded worker processes with nannies, shared by the module's tests.

    ``allowed-failures`` keeps Dask's default (3): the pool itself must stop Dask from
    re-running a task whose worker died.
    """
    distributed = needs_dask()
    before = _children()
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=":0", silence_logs=50)
    client = distributed.Client(cluster, set_as_default=False)
    try:
        yield client
    finally:
        client.close()
        cluster.close()
        left = _wait_gone(_children() - before)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        assert not left, f"the Dask cluster left processes behind: {sorted(left)}"


@pytest.fixture
def pool(client):
    p = Pool(backend="dask", backend_options={"client": client})
    try:
        yield p
    finally:
        p.terminate()


def sqr(x):
    return x * x


def stuck_then_mark(path, seconds):
    time.sleep(seconds)
    with open(path, "w") as f:
        f.write("still ran")
    return "finished"


class Boom(Exception):
    pass


def raise_boom(x):
    if x == 3:
        raise Boom(f"item {x} exploded")
    return x


def wait_for_workers(client, n, timeout=20.0):
    client.wait_for_workers(n, timeout=timeout)


# --- choosing the backend -------------------------------------------------------------------


def test_unknown_backend_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown pool backend 'dusk'.*'processes'.*'dask'"):
        Pool(2, backend="dusk")
    with pytest.raises(ValueError, match="unknown pool backend"):
        manyproc.futures.ProcessPoolExecutor(2, backend="ray")


def _run_python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env=env)


def test_dask_is_imported_only_when_chosen():
    done = _run_python(
        "import sys, manyproc, manyproc.pool, manyproc.futures\n"
        "with manyproc.pool.ThreadPool(1) as p: p.map(abs, [1])\n"
        "assert 'distributed' not in sys.modules and 'dask' not in sys.modules\n"
        "print('ok')")
    assert done.stdout.strip() == "ok", done.stderr


def test_missing_dask_says_what_to_install():
    done = _run_python(
        "import sys\n"
        "sys.modules['dask'] = sys.modules['distributed'] = None\n"
        "from manyproc.pool import Pool\n"
        "try:\n"
        "    Pool(backend='dask')\n"
        "except ImportError as exc:\n"
        "    print(exc)\n")
    assert "pip install 'manyproc[dask]'" in done.stdout, done.stdout + done.stderr


def test_unsupported_backend_options_are_named(client):
    with pytest.raises(TypeError, match=r"unsupported backend_options.*'wat', 'workers'"):
        Pool(backend="dask", backend_options={"client": client, "wat": 1, "workers": 2})
    with pytest.raises(TypeError, match=r"unsupported submit_options.*'retries'"):
        Pool(backend="dask", backend_options={"client": client,
                                              "submit_options": {"retries": 3}})
    with pytest.raises(TypeError, match="takes no backend_options"):
        Pool(1, backend="processes", backend_options={"client": client})
    with pytest.raises(TypeError, match="must be a distributed.Client"):
        Pool(backend="dask", backend_options={"client": "tcp://nowhere:1"})
    with pytest.raises(ValueError, match="maxtasksperchild"):
        Pool(2, maxtasksperchild=3, backend="dask", backend_options={"client": client})


# --- the API, with functions defined by value --------------------------------------------------


def test_pool_api_with_lambdas(pool, client):
    offset = 10
    add_offset = lambda x: x + offset  # a closure: travels by value
    assert pool._processes == 2  # the cluster's threads
    assert pool.apply(lambda a, b=0: a * b, (6,), {"b": 7}) == 42
    assert pool.apply_async(add_offset, (1,)).get(timeout=20) == 11
    assert pool.map(add_offset, range(50)) == [x + 10 for x in range(50)]
    assert pool.map_async(sqr, range(7), chunksize=3).get(timeout=20) == [x * x for x in range(7)]
    assert pool.starmap(lambda a, b: a - b, [(5, 1), (9, 3)]) == [4, 6]
    assert list(pool.imap(add_offset, iter(range(30)))) == [x + 10 for x in range(30)]
    assert sorted(pool.imap_unordered(lambda x: -x, range(30), chunksize=4)) == \
        sorted(-x for x in range(30))
    workers = pool._pool
    assert len(workers) == 2 and all(w.is_alive() for w in workers)
    stats = pool.statistics()
    assert stats.processes == 2 and len(stats.workers) == 2
    assert stats.tasks_done > 0 and stats.state == "running"
    pids = set(client.run(os.getpid).values())
    assert {w.pid for w in stats.workers} <= pids


def test_executor_api_with_lambdas(client):
    with manyproc.futures.ProcessPoolExecutor(backend="dask",
                                               backend_options={"client": client}) as ex:
        futures = [ex.submit(lambda x, k=1: x * k, i, k=3) for i in range(8)]
        assert isinstance(futures[0], manyproc.futures.PoolFuture)
        assert sorted(f.result(timeout=20) for f in as_completed(futures, timeout=20)) == \
            [3 * i for i in range(8)]
        assert list(ex.map(lambda a, b: a + b, range(5), range(5))) == [0, 2, 4, 6, 8]
        assert list(ex.map(sqr, range(20), buffersize=4)) == [x * x for x in range(20)]
        assert ex.statistics().tasks_done >= 8


def test_exception_comes_back_as_itself_with_the_remote_traceback(pool):
    with pytest.raises(Boom, match="item 3 exploded") as info:
        pool.map(raise_boom, range(6), chunksize=2)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "raise_boom" in str(cause) and "Boom" in str(cause)
    assert any("Dask worker tcp://" in note for note in info.value.__notes__)
    # a streaming job delivers the error at its place and goes on
    it = pool.imap(raise_boom, range(6))
    got = []
    for _ in range(6):
        try:
            got.append(next(it))
        except Boom:
            got.append("boom")
    assert got == [0, 1, 2, "boom", 4, 5]
    # what cannot travel fails clearly, and the pool is fine
    with pytest.raises(TypeError, match="lock"):
        pool.apply(sqr, (threading.Lock(),))
    with pytest.raises(manyproc.pool.MaybeEncodingError):
        pool.apply(lambda: threading.Lock())
    assert pool.apply(sqr, (4,)) == 16


# --- what Dask lacks: timeouts and kills that stop the work, worker loss -----------------------


def test_task_timeout_kills_the_stuck_task_and_the_pool_goes_on(pool, client, tmp_path):
    marker = tmp_path / "marker"
    started = time.monotonic()
    with pytest.raises(manyproc.TaskTimeoutError, match="task_timeout of 0.5 s"):
        pool.apply(stuck_then_mark, (str(marker), 3.0), task_timeout=0.5)
    assert time.monotonic() - started < 3.0
    assert pool.map(sqr, range(10)) == [x * x for x in range(10)]  # the pool goes on
    assert pool.statistics().tasks_timed_out == 1
    time.sleep(max(0.0, started + 3.8 - time.monotonic()))
    assert not marker.exists(), "the timed-out task kept running on its Dask worker"
    wait_for_workers(client, 2)


def test_cancel_with_kill_stops_the_running_task(client, tmp_path):
    marker = tmp_path / "marker"
    with manyproc.futures.ProcessPoolExecutor(
            1, kill_on_cancel=True, backend="dask", backend_options={"client": client}) as ex:
        future = ex.submit(stuck_then_mark, str(marker), 3.0)
        deadline = time.monotonic() + 20
        while not future.running() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # it is executing on its worker now
        started = time.monotonic()
        assert future.cancel() and future.cancelled()
        assert ex.submit(sqr, 5).result(timeout=30) == 25
        time.sleep(max(0.0, started + 3.3 - time.monotonic()))
        assert not marker.exists(), "the cancelled task kept running on its Dask worker"
    wait_for_workers(client, 2)


def test_terminate_stops_running_tasks(client, tmp_path):
    marker = tmp_path / "marker"
    p = Pool(1, backend="dask", backend_options={"client": client})
    result = p.apply_async(stuck_then_mark, (str(marker), 3.0))
    deadline = time.monotonic() + 20
    while not p.statistics().tasks_running and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    started = time.monotonic()
    p.terminate()
    with pytest.raises(CancelledError):
        result.get(timeout=5)
    time.sleep(max(0.0, started + 3.3 - time.monotonic()))
    assert not marker.exists(), "terminate() left the task running on its Dask worker"
    wait_for_workers(client, 2)


def test_worker_killed_mid_task_fails_only_that_task(pool, client):
    before = set(client.run(os.getpid).values())
    with pytest.raises(manyproc.WorkerLostError, match=r"Dask worker tcp://.* was lost") as info:
        pool.apply(lambda: os.kill(os.getpid(), signal.SIGKILL))
    assert info.value.pid in before
    assert info.value.address.startswith("tcp://")
    # Dask did not run it again elsewhere: the other worker is the same process
    assert pool.map(sqr, range(20)) == [x * x for x in range(20)]
    wait_for_workers(client, 2)
    assert len(before & set(client.run(os.getpid).values())) == 1
    stats = pool.statistics()
    assert stats.workers_lost >= 1


# --- input is pulled, not submitted eagerly ------------------------------------------------------


def test_imap_pulls_its_input_lazily(pool):
    pulled = itertools.count()

    def source():
        for i in itertools.count():
            next(pulled)
            yield i

    it = pool.imap(sqr, source())
    assert [next(it) for _ in range(40)] == [x * x for x in range(40)]
    it.close()
    # bounded read-ahead on an endless input: a window of 16 tasks of up to 256 items
    assert next(pulled) <= 40 + 16 * 256


# --- initializer, own cluster -------------------------------------------------------------------


_initialized = []


def remember_init(value):
    _initialized.append(value)


def initialized(_=None):
    return list(_initialized)


def fail_init():
    raise RuntimeError("initializer exploded")


def test_initializer_runs_in_each_dask_worker(client):
    with Pool(backend="dask", initializer=remember_init, initargs=("ready",),
              backend_options={"client": client}) as p:
        seen = p.map(initialized, range(4))
        # every task ran where the initializer had run (a Dask worker restarted by an
        # earlier test may host two slots, and so have run it twice)
        assert len(seen) == 4 and all(marks and set(marks) == {"ready"} for marks in seen)
    with Pool(backend="dask", initializer=fail_init, backend_options={"client": client}) as p:
        with pytest.raises(manyproc.pool.BrokenPoolError) as info:
            p.apply(sqr, (2,))
    assert "initializer exploded" in repr(info.value.__cause__)


def test_pool_starts_and_closes_its_own_cluster():
    needs_dask()
    before = _children()
    with Pool(1, backend="dask") as p:
        assert p.map(lambda x: x + 1, range(5)) == [1, 2, 3, 4, 5]
        started = _children() - before
        assert started  # the pool's own LocalCluster worker
        # its scheduler reports the death itself (allowed-failures=0): same outcome
        with pytest.raises(manyproc.WorkerLostError, match="was lost"):
            p.apply(lambda: os.kill(os.getpid(), signal.SIGKILL))
        assert p.apply(sqr, (3,)) == 9
        started |= _children() - before
    assert not _wait_gone(started), "the pool's LocalCluster was not closed with it"
