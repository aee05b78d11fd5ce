"""Locks, semaphores, conditions, events and barriers shared by real processes."""

from __future__ import annotations

import functools
import gc
import os
import sys
import time

import pytest

import manyproc
from manyproc import synchronize
from manyproc._os import shm

pytestmark = pytest.mark.timeout(90)

LINUX = sys.platform.startswith("linux")


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def start(ctx, target, *args):
    p = ctx.Process(target=target, args=args)
    p.start()
    return p


def finish(*procs, timeout=30):
    for p in procs:
        p.join(timeout)
        assert p.exitcode == 0, f"{p} failed"


# --------------------------------------------------------------------------- children


def add_under_lock(counter, lock, times):
    for _ in range(times):
        with lock:
            counter.value += 1


def hold_rlock(lock, held, release):
    with lock:
        with lock:
            held.set()
            release.wait(20)


def hold_lock(lock, held, release):
    lock.acquire()
    held.set()
    release.wait(20)
    lock.release()


def take_permits(sem, n):
    for _ in range(n):
        assert sem.acquire(timeout=10)


def wait_on_condition(cond, sleeping, woken):
    with cond:
        sleeping.release()
        if cond.wait(20):
            woken.release()


def wait_for_event(event, result):
    result.value = 1 if event.wait(20) else -1


def meet_at_barrier(barrier, indices, slot):
    indices[slot] = barrier.wait(20)


def wait_expecting_broken(barrier, result):
    try:
        barrier.wait(20)
        result.value = 1
    except synchronize.BrokenBarrierError:
        result.value = 2


def count_action(counter):
    counter.value += 1


def use_lock_when_told(lock, go, result):
    go.wait(20)
    with lock:
        result.value = 7


# --------------------------------------------------------------------------- tests


def test_lock_gives_mutual_exclusion(ctx):
    counter = ctx.Value("i", 0, lock=False)
    lock = ctx.Lock()
    procs = [start(ctx, add_under_lock, counter, lock, 300) for _ in range(2)]
    add_under_lock(counter, lock, 300)
    finish(*procs)
    assert counter.value == 900


def test_rlock_held_by_another_process(ctx):
    lock, held, release = ctx.RLock(), ctx.Event(), ctx.Event()
    p = start(ctx, hold_rlock, lock, held, release)
    try:
        assert held.wait(20)
        assert repr(lock) == "<RLock(SomeOtherProcess, nonzero)>"
        assert lock.acquire(timeout=0.01) is False
    finally:
        release.set()
        finish(p)
    assert lock.acquire(timeout=10)
    lock.release()


def test_lock_held_by_another_process(ctx):
    lock, held, release = ctx.Lock(), ctx.Event(), ctx.Event()
    p = start(ctx, hold_lock, lock, held, release)
    try:
        assert held.wait(20)
        assert repr(lock) == "<Lock(owner=SomeOtherProcess)>"
        assert lock.acquire(timeout=0.01) is False
    finally:
        release.set()
        finish(p)
    assert repr(lock) == "<Lock(owner=None)>"


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS cannot read a semaphore's value")
def test_semaphore_permits_are_shared(ctx):
    sem = ctx.Semaphore(3)
    finish(start(ctx, take_permits, sem, 2))
    assert sem.get_value() == 1
    bounded = ctx.BoundedSemaphore(2)
    finish(start(ctx, take_permits, bounded, 2))
    assert bounded.acquire(False) is False


def test_condition_notify_one_then_all(ctx):
    cond = ctx.Condition()
    sleeping, woken = ctx.Semaphore(0), ctx.Semaphore(0)
    procs = [start(ctx, wait_on_condition, cond, sleeping, woken) for _ in range(2)]
    for _ in procs:
        assert sleeping.acquire(timeout=20)
    with cond:   # both children released the lock inside wait(): both are waiting now
        cond.notify()
    assert woken.acquire(timeout=20)
    assert woken.acquire(timeout=0.1) is False
    with cond:
        cond.notify_all()
    assert woken.acquire(timeout=20)
    finish(*procs)
    if sys.platform != "darwin":
        assert (cond._sleepers.get_value(), cond._gate.get_value(),
                cond._acks.get_value()) == (0, 0, 0)


def test_event_set_in_parent_wakes_child(ctx):
    event, result = ctx.Event(), ctx.Value("i", 0)
    p = start(ctx, wait_for_event, event, result)
    event.set()
    finish(p)
    assert result.value == 1


def test_barrier_across_processes_with_action(ctx):
    counter = ctx.Value("i", 0)
    barrier = ctx.Barrier(3, action=functools.partial(count_action, counter))
    indices = ctx.Array("i", [-1, -1, -1])
    procs = [start(ctx, meet_at_barrier, barrier, indices, slot) for slot in (1, 2)]
    meet_at_barrier(barrier, indices, 0)
    finish(*procs)
    assert sorted(indices[:]) == [0, 1, 2]
    assert counter.value == 1
    assert barrier.n_waiting == 0 and not barrier.broken


def test_barrier_abort_reaches_waiting_child(ctx):
    barrier, result = ctx.Barrier(2), ctx.Value("i", 0)
    p = start(ctx, wait_expecting_broken, barrier, result)
    assert wait_until(lambda: barrier.n_waiting == 1, 20)
    barrier.abort()
    finish(p)
    assert result.value == 2 and barrier.broken


def test_fork_context_lock_cannot_go_to_a_spawned_child():
    fork_lock = manyproc.get_context("fork").Lock()
    spawn = manyproc.get_context("spawn")
    p = spawn.Process(target=take_permits, args=(fork_lock, 1))
    with pytest.raises(RuntimeError, match=r"A SemLock created in a fork context.*get_context"):
        p.start()


# --------------------------------------------------------------------------- name lifecycle

named_methods = pytest.mark.parametrize("method", ["spawn", "forkserver"])


@pytest.mark.skipif(not LINUX, reason="semaphore names are listed from /dev/shm")
@named_methods
def test_semaphore_name_goes_with_its_creator_object(method):
    before = set(shm.list_named_objects())
    lock = manyproc.get_context(method).Lock()
    created = set(shm.list_named_objects()) - before
    assert created == {"sem." + lock._semlock.name[1:]}
    del lock
    gc.collect()
    assert set(shm.list_named_objects()) == before


@pytest.mark.skipif(not LINUX, reason="semaphore names are listed from /dev/shm")
@named_methods
def test_lock_passed_inline_outlives_the_parents_object(method):
    ctx = manyproc.get_context(method)
    go, result = ctx.Event(), ctx.Value("i", 0)
    before = set(shm.list_named_objects())
    p = ctx.Process(target=use_lock_when_told, args=(ctx.Lock(), go, result))
    p.start()   # the Process drops its arguments: the parent's Lock is collected now
    gc.collect()
    lock_names = set(shm.list_named_objects()) - before
    assert len(lock_names) == 1, "the name was removed while a child may still open it"
    go.set()
    finish(p)
    assert result.value == 7
    assert wait_until(lambda: not (lock_names & set(shm.list_named_objects())))


def test_fork_children_do_not_inherit_rlock_ownership():
    ctx = manyproc.get_context("fork")
    lock = ctx.RLock()
    result = ctx.Value("i", 0, lock=False)
    with lock:
        p = start(ctx, try_acquire_inherited, lock, result)
        p.join(30)
    assert p.exitcode == 0
    assert result.value == 1   # the child did not think it owned the lock


def try_acquire_inherited(lock, result):
    result.value = 1 if not lock._semlock._is_mine() else 2


def test_os_fork_child_sees_the_same_lock():
    lock = synchronize.Lock(ctx=manyproc.get_context("fork"))
    lock.acquire()
    pid = os.fork()
    if pid == 0:
        code = 0 if lock.acquire(timeout=20) else 1
        os._exit(code)
    time.sleep(0.01)
    lock.release()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


# --------------------------------------------------------------------------- waiters that die


def wait_forever(event):
    event.wait()


@pytest.mark.skipif(sys.platform == "darwin", reason="reads semaphore values")
def test_set_does_not_hang_on_a_waiter_killed_while_waiting(ctx, monkeypatch):
    monkeypatch.setattr(synchronize, "_ACK_GRACE", 0.2)
    event = ctx.Event()
    victim = start(ctx, wait_forever, event)
    assert wait_until(lambda: event._cond._sleepers.get_value() == 1, 30)
    victim.kill()
    victim.join(30)
    event.set()   # the dead waiter never acknowledges: set() must still return
    cond = event._cond
    assert (cond._sleepers.get_value(), cond._gate.get_value(), cond._acks.get_value()) \
        == (0, 0, 0)
    event.clear()   # and the event keeps working for the living
    result = ctx.Value("i", 0)
    p = start(ctx, wait_for_event, event, result)
    assert wait_until(lambda: cond._sleepers.get_value() == 1, 30)
    event.set()
    finish(p)
    assert result.value == 1
