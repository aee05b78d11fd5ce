"""Workers die in every way a worker can die; the pool fails exactly their tasks and goes on.

Also: task timeouts kill and replace the stuck worker, cancel kills a running task,
and Ctrl-C during ``map`` raises KeyboardInterrupt at once and leaves no worker behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

import manyproc
from manyproc.pool import Pool

from .scripts import SRC

pytestmark = pytest.mark.timeout(120)


def sqr(x):
    return x * x


def pid_of(_=None):
    return os.getpid()


def sleep_then(x):
    time.sleep(x)
    return x


def exit_abruptly(code):
    os._exit(code)


def segfault():
    import ctypes

    ctypes.string_at(0)


def kill_myself():
    os.kill(os.getpid(), signal.SIGKILL)


def blow_memory():
    import resource

    limit = 256 * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    hog = bytearray(4 * limit)
    return len(hog)


def wait_for_file_then_sleep(path):
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(60)


def slow_or_fast(x):
    if x == 3:
        time.sleep(60)
    return x


@pytest.fixture
def pool(ctx):
    with Pool(2, context=ctx) as p:
        yield p
    p.join()


def assert_pool_serves(pool):
    assert pool.map(sqr, range(10), chunksize=2) == [x * x for x in range(10)]
    assert pool.apply(sqr, (9,)) == 81


@pytest.mark.parametrize("how, args, signame", [
    (exit_abruptly, (7,), None),
    (segfault, (), "SIGSEGV"),
    (kill_myself, (), "SIGKILL"),
])
def test_worker_death_fails_exactly_its_task(pool, how, args, signame):
    other = pool.apply_async(sleep_then, (0.3,))
    with pytest.raises(manyproc.WorkerLostError) as info:
        pool.apply(how, args)
    error = info.value
    assert error.pid is not None
    assert how.__name__ in str(error)
    if signame is None:
        assert error.exitcode == 7 and "exited with code 7" in str(error)
    else:
        assert error.signal_name == signame and signame in str(error)
    if signame == "SIGSEGV":  # the worker's fault handler says where it crashed
        assert "Segmentation fault" in error.crash_report
        assert "in segfault" in error.crash_report and "in segfault" in str(error)
        assert "worker.py" not in error.crash_report  # the pool's own frames are cut
    else:
        assert error.crash_report is None
    assert other.get(timeout=30) == 0.3  # the other worker's task was not touched
    assert_pool_serves(pool)
    assert pool.statistics().tasks_lost == 1


def test_out_of_memory_is_an_error_not_a_hang(pool):
    with pytest.raises((MemoryError, manyproc.WorkerLostError)):
        pool.apply(blow_memory)
    assert_pool_serves(pool)


def test_kill_from_outside_mid_map(pool, tmp_path):
    marker = tmp_path / "running"
    result = pool.map_async(wait_for_file_then_sleep, [str(marker)], chunksize=1)
    deadline = time.monotonic() + 30
    while not marker.exists() or not marker.read_text():
        assert time.monotonic() < deadline, "the task never started"
        time.sleep(0.01)
    os.kill(int(marker.read_text()), signal.SIGKILL)
    with pytest.raises(manyproc.WorkerLostError, match="SIGKILL"):
        result.get(timeout=30)
    assert_pool_serves(pool)


def test_imap_goes_on_after_a_death(pool):
    def items():
        yield from range(3)
        yield "die"
        yield from range(3, 6)

    def run(x):
        if x == "die":
            os._exit(3)
        return x

    got = []
    it = pool.imap(run, items())
    for _ in range(7):
        try:
            got.append(next(it))
        except manyproc.WorkerLostError:
            got.append("lost")
    assert got == [0, 1, 2, "lost", 3, 4, 5]


def test_task_timeout_kills_and_replaces_the_worker(ctx):
    with Pool(2, context=ctx, task_timeout=30) as p:
        before = set(p.map(pid_of, range(4)))
        started = time.monotonic()
        with pytest.raises(manyproc.TaskTimeoutError) as info:
            p.apply(sleep_then, (60,), task_timeout=0.5)
        assert time.monotonic() - started < 10
        assert isinstance(info.value, TimeoutError)
        assert info.value.timeout == 0.5
        # where the task was stuck, from the worker's own stack just before the kill
        assert "in sleep_then" in info.value.worker_stack
        assert "Where the worker was stuck" in str(info.value)
        it = p.imap(slow_or_fast, range(6), task_timeout=1)
        got = []
        for _ in range(6):
            try:
                got.append(next(it))
            except manyproc.TaskTimeoutError:
                got.append("timeout")
        assert got == [0, 1, 2, "timeout", 4, 5]
        assert p.statistics().tasks_timed_out == 2
        after = set(p.map(pid_of, range(4)))
        assert before - after  # a killed worker was replaced by a new process
    p.join()


def test_timeouts_do_not_touch_fast_tasks(ctx):
    with Pool(2, context=ctx) as p:
        assert p.map(sqr, range(100), task_timeout=5) == [x * x for x in range(100)]
    p.join()


def test_cancel_of_a_running_job_kills_its_worker(pool):
    result = pool.apply_async(sleep_then, (60,))
    time.sleep(0.3)
    started = time.monotonic()
    assert result.cancel()
    assert time.monotonic() - started < 5
    assert result.ready()
    assert_pool_serves(pool)


def test_terminate_with_a_stuck_worker(ctx):
    p = Pool(2, context=ctx)
    p.apply_async(sleep_then, (60,))
    time.sleep(0.2)
    started = time.monotonic()
    p.terminate()
    p.join()
    assert time.monotonic() - started < 10


CTRL_C_SCRIPT = r"""
import sys, time
import manyproc
from manyproc.pool import Pool

def slow(x):
    time.sleep(60)
    return x

if __name__ == "__main__":
    pool = Pool(2, context=manyproc.get_context(sys.argv[1]))
    print("ready", flush=True)
    pool.map(slow, range(8), chunksize=1)
"""


def _processes_in_group(pgid):
    found = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    return found


@pytest.mark.leaks_allowed
def test_ctrl_c_during_map(start_method, tmp_path):
    script = tmp_path / "ctrl_c.py"
    script.write_text(CTRL_C_SCRIPT)
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.Popen([sys.executable, str(script), start_method], cwd=tmp_path,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        time.sleep(0.5)  # let map() start and the workers pick up tasks
        sent = time.monotonic()
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=30)
        elapsed = time.monotonic() - sent
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    assert "KeyboardInterrupt" in err
    assert elapsed < 2.0, f"KeyboardInterrupt took {elapsed:.2f} s"
    deadline = time.monotonic() + 5
    while _processes_in_group(child.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    leftovers = _processes_in_group(child.pid)
    for pid in leftovers:
        os.kill(pid, signal.SIGKILL)
    assert not leftovers, f"workers left behind: {leftovers}"


def crash_at(x):
    if x == 150:
        os._exit(9)
    if x == 160:
        raise ValueError("item 160")
    if x == 170:
        time.sleep(60)
    return x


def test_tiny_items_batched_still_fail_one_by_one(ctx):
    # tiny items travel in batches once measured; a crash, an exception and a hang
    # must still fail only their own item
    with Pool(2, context=ctx) as p:
        got = []
        it = p.imap(crash_at, range(300), task_timeout=1)
        for _ in range(300):
            try:
                got.append(next(it))
            except manyproc.WorkerLostError:
                got.append("lost")
            except manyproc.TaskTimeoutError:
                got.append("timeout")
            except ValueError:
                got.append("error")
        expected = list(range(300))
        expected[150], expected[160], expected[170] = "lost", "error", "timeout"
        assert got == expected
        stats = p.statistics()
        assert stats.tasks_lost == 1 and stats.tasks_timed_out == 1
    p.join()


def test_timeouts_fire_with_nobody_waiting(pool):
    import threading

    done = threading.Event()
    errors = []

    def on_error(exc):
        errors.append(exc)
        done.set()

    pool.apply_async(sleep_then, (60,), task_timeout=0.5, error_callback=on_error)
    assert done.wait(20)
    assert isinstance(errors[0], manyproc.TaskTimeoutError)


def test_a_late_wakeup_never_writes_into_a_reused_fd(ctx):
    """Garbage-collector callbacks may wake a pool after it closed: the freed fd numbers,
    reused by another pipe of this process, must not receive the wake-up byte."""
    pool = Pool(1, context=ctx)
    pool.close()
    pool.join()
    r, w = os.pipe()  # likely takes the numbers the pool's wake-up pipe had
    try:
        pool._driver.release_window_later(0)
        pool._driver.terminate_soon()
        os.set_blocking(r, False)
        os.write(w, b"mine")
        assert os.read(r, 100) == b"mine"
    finally:
        os.close(r)
        os.close(w)


def test_workers_start_when_fd_numbers_pass_1024(ctx):
    """A process with many files open gets pipe fds above FD_SETSIZE, where select()
    fails; nothing on the way to a worker may use it."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1300:
        pytest.skip(f"the hard limit on open files is {hard}")
    if soft != resource.RLIM_INFINITY and soft < 1300:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1300, hard))
    fillers = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        with Pool(2, context=ctx) as p:
            assert p.map(sqr, range(10)) == [x * x for x in range(10)]
        p.join()
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
