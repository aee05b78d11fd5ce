"""The resource tracker: owners killed with SIGKILL leave nothing behind; attachers never remove."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

import manyproc
from manyproc import resource_tracker
from manyproc._os import shm
from manyproc.shared_memory import SharedMemory

from .scripts import SRC, run_script

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not sys.platform.startswith("linux"),
                       reason="checks names in /dev/shm"),
]


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def present(entry):
    return os.path.exists(os.path.join(shm.SHM_DIR, entry))


def tracked_names():
    return {row["name"] for row in resource_tracker._tracked()}


# --------------------------------------------------------------------------- children


def create_and_hang(box, ready):
    """Create a segment and a named semaphore, report their /dev/shm entries, then hang."""
    sm = SharedMemory(create=True, size=4096)
    lock = manyproc.get_context("spawn").Lock()
    box.value = f"{sm.name},sem.{lock._semlock.name[1:]}".encode()
    ready.set()
    time.sleep(120)


def register_and_hang(name, ready):
    resource_tracker.register(name, "shared_memory")
    ready.set()
    time.sleep(120)


# --------------------------------------------------------------------------- tests


def test_owner_killed_with_sigkill_leaves_nothing_behind(ctx):
    box, ready = ctx.Array("c", 200), ctx.Event()
    p = ctx.Process(target=create_and_hang, args=(box, ready))
    p.start()
    try:
        assert ready.wait(60)
        entries = box.value.decode().split(",")
        assert all(present(e) for e in entries)
    finally:
        p.kill()
        p.join(30)
    assert p.exitcode == -signal.SIGKILL
    assert wait_until(lambda: not any(present(e) for e in entries)), entries


def test_a_name_owned_by_a_live_process_survives_another_owners_death(ctx):
    sm = SharedMemory(create=True, size=16)   # we own it
    ready = ctx.Event()
    p = ctx.Process(target=register_and_hang, args=(sm._name, ready))
    p.start()   # ...and so does the child, on its own connection
    try:
        assert ready.wait(60)
        assert wait_until(lambda: sum(r["name"] == sm._name
                                      for r in resource_tracker._tracked()) == 2)
    finally:
        p.kill()
        p.join(30)
    assert wait_until(lambda: sum(r["name"] == sm._name
                                  for r in resource_tracker._tracked()) == 1)
    assert present(sm.name)
    sm.close()
    sm.unlink()
    assert wait_until(lambda: sm._name not in tracked_names())


def test_os_fork_child_gets_its_own_connection():
    mine = SharedMemory(create=True, size=16)
    pid = os.fork()
    if pid == 0:   # a child that exits without any Python clean-up
        try:
            theirs = SharedMemory(create=True, size=16)
            os._exit(0 if theirs.name else 1)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The child's segment went with its connection; ours is untouched.
    assert wait_until(lambda: {r["pid"] for r in resource_tracker._tracked()} <= {os.getpid()})
    assert present(mine.name)
    assert mine._name in tracked_names()
    mine.close()
    mine.unlink()


def test_unregistered_names_are_not_touched():
    sm = SharedMemory(create=True, size=16, track=False)
    try:
        resource_tracker.unregister(sm._name, "shared_memory")   # harmless
        assert sm._name not in tracked_names()
    finally:
        sm.close()
        sm.unlink()


def test_tracked_lists_names_with_their_owner_pid():
    sm = SharedMemory(create=True, size=16)
    try:
        rows = [r for r in resource_tracker._tracked() if r["name"] == sm._name]
        assert rows == [{"rtype": "shared_memory", "name": sm._name, "pid": os.getpid()}]
    finally:
        sm.close()
        sm.unlink()
    assert sm._name not in tracked_names()


# --------------------------------------------------------------------------- fresh interpreters

PROGRAM_HEAD = """
import os, sys, time
import manyproc
from manyproc import resource_tracker
from manyproc.shared_memory import SharedMemory
"""


def tracker_gone(pid):
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_program_exit_removes_names_and_stops_its_tracker(tmp_path):
    result = run_script(tmp_path, PROGRAM_HEAD + """
sm = SharedMemory(create=True, size=100)
lock = manyproc.get_context("spawn").Lock()
print(sm.name, lock._semlock.name[1:], resource_tracker._state.tracker_pid)
""")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""   # no "leaked" warnings
    name, sem, tracker_pid = result.stdout.split()
    assert not present(name) and not present("sem." + sem)
    assert wait_until(lambda: tracker_gone(int(tracker_pid)))


@pytest.mark.parametrize("whole_group", [False, True], ids=["process", "process-group"])
def test_killed_program_is_cleaned_up_and_its_tracker_stops(tmp_path, whole_group):
    script = tmp_path / "prog.py"
    script.write_text(PROGRAM_HEAD + """
sm = SharedMemory(create=True, size=100)
lock = manyproc.get_context("spawn").Lock()
print(sm.name, lock._semlock.name[1:], resource_tracker._state.tracker_pid, flush=True)
time.sleep(120)
""")
    env = dict(os.environ, PYTHONPATH=SRC)
    with subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env,
                          start_new_session=True) as proc:
        try:
            name, sem, tracker_pid = proc.stdout.readline().split()
            assert present(name) and present("sem." + sem)
        finally:
            if whole_group:   # as a job-control kill or a runner's timeout would
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
            proc.wait(30)
        assert proc.stderr.read() == ""
    assert wait_until(lambda: not present(name) and not present("sem." + sem))
    assert wait_until(lambda: tracker_gone(int(tracker_pid)))


def test_tracker_death_is_survived(tmp_path):
    result = run_script(tmp_path, PROGRAM_HEAD + """
first = SharedMemory(create=True, size=100)
old = resource_tracker._state.tracker_pid
os.kill(old, 9)
while True:   # wait for it to be gone (it is our child: reap it)
    try:
        os.waitpid(old, 0)
        break
    except ChildProcessError:
        break
second = SharedMemory(create=True, size=100)   # notices, starts a new tracker
new = resource_tracker._state.tracker_pid
names = {r["name"] for r in resource_tracker._tracked()}
assert new != old and names == {first._name, second._name}, (old, new, names)
print(first.name, second.name)
os.kill(os.getpid(), 9)   # the new tracker must now remove both
""")
    assert result.returncode == -signal.SIGKILL, result.stderr
    names = result.stdout.split()
    assert len(names) == 2
    assert wait_until(lambda: not any(present(n) for n in names))


def test_service_stopper_stops_the_tracker(tmp_path):
    result = run_script(tmp_path, PROGRAM_HEAD + """
from manyproc import util
sm = SharedMemory(create=True, size=100)
pid = resource_tracker._state.tracker_pid
util._cleanup_tests()
import psutil
gone = not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
print(sm.name, gone)
""")
    assert result.returncode == 0, result.stderr
    name, gone = result.stdout.split()
    assert gone == "True"
    assert not present(name)


def test_spawned_children_share_their_parents_tracker(tmp_path):
    result = run_script(tmp_path, PROGRAM_HEAD + """
from manyproc import resource_tracker as rt

def child(q):
    sm = SharedMemory(create=True, size=10)
    q.value = rt._state.tracker_pid
    sm.close()
    sm.unlink()

if __name__ == "__main__":
    ctx = manyproc.get_context("spawn")
    rt.ensure_running()
    box = ctx.Value("i", 0)
    p = ctx.Process(target=child, args=(box,))
    p.start()
    p.join()
    print(p.exitcode, box.value == rt._state.tracker_pid)
""")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "True"]


def test_without_a_tracker_names_are_still_removed_at_normal_exit(tmp_path):
    result = run_script(tmp_path, PROGRAM_HEAD + """
import warnings
sys.executable = "/nonexistent/python"   # the tracker cannot start
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    sm = SharedMemory(create=True, size=100)
print(sm.name, len(caught), caught[0].category.__name__ if caught else "-")
""")
    assert result.returncode == 0, result.stderr
    name, count, category = result.stdout.split()
    assert (count, category) == ("1", "RuntimeWarning")
    assert not present(name)
