"""synchronize within one process (threads only): semantics, reprs, timeouts, bad input."""

from __future__ import annotations

import pickle
import sys
import threading
import time

import pytest

import manyproc
from manyproc import synchronize
from manyproc.synchronize import (
    Barrier,
    BoundedSemaphore,
    BrokenBarrierError,
    Condition,
    Event,
    Lock,
    RLock,
    Semaphore,
)

pytestmark = pytest.mark.timeout(30)

FORK = manyproc.get_context("fork")
CAN_READ_VALUE = sys.platform != "darwin"


def run_threads(target, n):
    threads = [threading.Thread(target=target) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


def join_all(threads):
    for t in threads:
        t.join(10)
        assert not t.is_alive()


# --------------------------------------------------------------------------- module surface


def test_all_names_exist():
    for name in synchronize.__all__:
        assert hasattr(synchronize, name)
    assert set(synchronize.__all__) >= {"Lock", "RLock", "Semaphore", "BoundedSemaphore",
                                        "Condition", "Event", "Barrier"}


def test_context_factories_build_our_classes():
    assert isinstance(FORK.Lock(), Lock)
    assert isinstance(FORK.RLock(), RLock)
    assert isinstance(FORK.Semaphore(2), Semaphore)
    assert isinstance(FORK.BoundedSemaphore(2), BoundedSemaphore)
    assert isinstance(FORK.Condition(), Condition)
    assert isinstance(FORK.Event(), Event)
    assert isinstance(FORK.Barrier(2), Barrier)


def test_default_context_is_used_without_ctx():
    lock = Lock()
    assert lock.acquire()
    lock.release()


def test_fork_context_names_are_removed_at_once():
    assert Lock(ctx=FORK)._semlock.name is None


# --------------------------------------------------------------------------- Lock / RLock


def test_lock_acquire_release():
    lock = Lock(ctx=FORK)
    assert lock.acquire() is True
    assert lock.acquire(False) is False
    assert lock.release() is None
    with pytest.raises(ValueError, match="released too many times"):
        lock.release()


def test_lock_timeout_returns_false_after_waiting():
    lock = Lock(ctx=FORK)
    lock.acquire()
    start = time.monotonic()
    assert lock.acquire(timeout=0.05) is False
    assert time.monotonic() - start >= 0.04
    assert lock.acquire(True, 0) is False
    lock.release()
    assert lock.acquire(block=True, timeout=None) is True
    lock.release()


def test_lock_context_manager():
    lock = Lock(ctx=FORK)
    with lock:
        assert lock.acquire(False) is False
    assert lock.acquire(False) is True
    lock.release()


def test_lock_repr_shows_owner():
    lock = Lock(ctx=FORK)
    assert repr(lock) == "<Lock(owner=None)>"
    lock.acquire()
    assert repr(lock) == "<Lock(owner=MainProcess)>"
    seen = []
    t = threading.Thread(target=lambda: seen.append(repr(lock)), name="T1")
    t.start()
    t.join()
    assert seen == ["<Lock(owner=SomeOtherThread)>"]
    lock.release()


def test_lock_repr_in_a_thread_names_the_thread():
    lock = Lock(ctx=FORK)
    seen = []

    def body():
        with lock:
            seen.append(repr(lock))

    t = threading.Thread(target=body, name="Worker-7")
    t.start()
    t.join()
    assert seen == ["<Lock(owner=MainProcess|Worker-7)>"]


def test_lock_can_be_released_by_another_thread():
    lock = Lock(ctx=FORK)
    lock.acquire()
    t = threading.Thread(target=lock.release)
    t.start()
    t.join()
    assert lock.acquire(False)
    lock.release()


def test_rlock_recursion_and_repr():
    lock = RLock(ctx=FORK)
    assert repr(lock) == "<RLock(None, 0)>"
    for _ in range(3):
        assert lock.acquire() is True
    assert repr(lock) == "<RLock(MainProcess, 3)>"
    seen = []
    t = threading.Thread(target=lambda: seen.append((repr(lock), lock.acquire(timeout=0.01))))
    t.start()
    t.join()
    assert seen == [("<RLock(SomeOtherThread, nonzero)>", False)]
    for _ in range(3):
        lock.release()
    with pytest.raises((AssertionError, RuntimeError)):
        lock.release()


# --------------------------------------------------------------------------- semaphores


@pytest.mark.skipif(not CAN_READ_VALUE, reason="macOS cannot read a semaphore's value")
def test_semaphore_counts():
    sem = Semaphore(2, ctx=FORK)
    assert sem.get_value() == 2
    assert repr(sem) == "<Semaphore(value=2)>"
    assert sem.acquire() and sem.acquire()
    assert sem.get_value() == 0
    assert sem.acquire(False) is False
    assert sem.acquire(timeout=0.01) is False
    sem.release()
    sem.release()
    sem.release()
    assert sem.get_value() == 3


@pytest.mark.skipif(not CAN_READ_VALUE, reason="macOS cannot read a semaphore's value")
def test_bounded_semaphore_refuses_extra_release():
    sem = BoundedSemaphore(2, ctx=FORK)
    assert repr(sem) == "<BoundedSemaphore(value=2, maxvalue=2)>"
    sem.acquire()
    sem.release()
    with pytest.raises(ValueError):
        sem.release()
    assert sem.get_value() == 2


@pytest.mark.parametrize("cls", [Semaphore, BoundedSemaphore])
def test_semaphore_rejects_negative_value(cls):
    with pytest.raises(ValueError, match=r">= 0, got -1"):
        cls(-1, ctx=FORK)


@pytest.mark.parametrize("cls", [Semaphore, BoundedSemaphore])
def test_semaphore_rejects_non_int_value(cls):
    with pytest.raises(TypeError, match="must be an int, not float"):
        cls(1.5, ctx=FORK)


def test_semaphore_rejects_too_large_value():
    with pytest.raises(ValueError, match="SEM_VALUE_MAX"):
        Semaphore(synchronize.SEM_VALUE_MAX + 1, ctx=FORK)


def test_zero_semaphore_blocks_until_released_by_another_thread():
    sem = Semaphore(0, ctx=FORK)
    t = threading.Timer(0.02, sem.release)
    t.start()
    assert sem.acquire(timeout=10) is True
    t.join()


# --------------------------------------------------------------------------- pickling


@pytest.mark.parametrize("factory", [
    lambda: Lock(ctx=FORK), lambda: RLock(ctx=FORK), lambda: Semaphore(ctx=FORK),
    lambda: Condition(ctx=FORK), lambda: Event(ctx=FORK), lambda: Barrier(2, ctx=FORK),
])
def test_pickling_outside_process_start_is_refused(factory):
    obj = factory()
    with pytest.raises(RuntimeError, match="inheritance"):
        pickle.dumps(obj)


# --------------------------------------------------------------------------- Condition


def test_condition_requires_the_lock():
    cond = Condition(ctx=FORK)
    with pytest.raises(AssertionError, match="does not hold"):
        cond.wait(0.01)
    with pytest.raises(RuntimeError, match="does not hold"):
        cond.notify()


def test_condition_wait_times_out():
    cond = Condition(ctx=FORK)
    with cond:
        start = time.monotonic()
        assert cond.wait(0.05) is False
        assert time.monotonic() - start >= 0.04
    assert repr(cond).endswith(", 0)>")


def test_condition_notify_wakes_one_then_all():
    cond = Condition(ctx=FORK)
    woken = []
    ready = Semaphore(0, ctx=FORK)

    def waiter():
        with cond:
            ready.release()
            woken.append(cond.wait(10))

    threads = run_threads(waiter, 3)
    for _ in range(3):
        assert ready.acquire(timeout=10)
    with cond:   # every waiter released the lock, so all three are waiting
        cond.notify()
    deadline = time.monotonic() + 10
    while len(woken) < 1 and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(0.02)
    assert woken == [True]
    with cond:
        cond.notify_all()
    join_all(threads)
    assert woken == [True, True, True]
    if CAN_READ_VALUE:
        assert (cond._sleeping_count.get_value(), cond._woken_count.get_value(),
                cond._wait_semaphore.get_value()) == (0, 0, 0)


def test_condition_with_rlock_held_twice_releases_fully_while_waiting():
    cond = Condition(RLock(ctx=FORK), ctx=FORK)
    got = []
    with cond:
        with cond:
            t = threading.Thread(target=lambda: got.append(cond.acquire(timeout=10)) or
                                 cond.notify() or cond.release())
            t.start()
            assert cond.wait(10) is True
            t.join()
        assert repr(cond._lock) == "<RLock(MainProcess, 1)>"
    assert got == [True]


def test_condition_wait_for_predicate_and_timeout():
    cond = Condition(ctx=FORK)
    box = []

    def producer():
        time.sleep(0.02)
        with cond:
            box.append(1)
            cond.notify_all()

    t = threading.Thread(target=producer)
    t.start()
    with cond:
        assert cond.wait_for(lambda: box, timeout=10) == [1]
        assert cond.wait_for(lambda: len(box) > 1, timeout=0.02) is False
    t.join()


def test_timed_out_waiter_does_not_steal_later_notifications():
    cond = Condition(ctx=FORK)
    with cond:
        assert cond.wait(0.01) is False
    woken = []
    ready = Semaphore(0, ctx=FORK)

    def waiter():
        with cond:
            ready.release()
            woken.append(cond.wait(10))

    threads = run_threads(waiter, 1)
    assert ready.acquire(timeout=10)
    with cond:
        cond.notify()
    join_all(threads)
    assert woken == [True]


# --------------------------------------------------------------------------- Event


def test_event_set_clear_wait():
    ev = Event(ctx=FORK)
    assert not ev.is_set()
    assert ev.wait(0) is False
    assert ev.wait(0.02) is False
    ev.set()
    assert ev.is_set()
    assert ev.wait() is True
    assert ev.wait(0.01) is True
    ev.clear()
    assert not ev.is_set()


def test_event_repr():
    ev = Event(ctx=FORK)
    assert repr(ev).startswith("<Event at 0x") and repr(ev).endswith(" unset>")
    ev.set()
    assert repr(ev).endswith(" set>")


def test_event_wakes_waiting_threads():
    ev = Event(ctx=FORK)
    results = []
    threads = run_threads(lambda: results.append(ev.wait(10)), 3)
    time.sleep(0.02)
    ev.set()
    join_all(threads)
    assert results == [True, True, True]


# --------------------------------------------------------------------------- Barrier


def test_barrier_rejects_bad_parties():
    with pytest.raises(ValueError, match="parties must be > 0, got 0"):
        Barrier(0, ctx=FORK)
    with pytest.raises(TypeError, match="parties must be an int"):
        Barrier("3", ctx=FORK)
    with pytest.raises(TypeError, match="action must be callable"):
        Barrier(2, action=5, ctx=FORK)


def test_barrier_releases_all_with_distinct_indices_and_runs_action_once():
    actions = []
    barrier = Barrier(3, action=lambda: actions.append(1), ctx=FORK)
    assert barrier.parties == 3
    results = []
    for _ in range(2):  # the barrier is reusable
        join_all(run_threads(lambda: results.append(barrier.wait(10)), 3))
    assert sorted(results) == [0, 0, 1, 1, 2, 2]
    assert actions == [1, 1]
    assert barrier.n_waiting == 0 and not barrier.broken


def test_barrier_timeout_breaks_it():
    barrier = Barrier(2, timeout=0.02, ctx=FORK)
    with pytest.raises(BrokenBarrierError):
        barrier.wait()
    assert barrier.broken
    with pytest.raises(BrokenBarrierError):
        barrier.wait()
    barrier.reset()
    assert not barrier.broken


def test_barrier_abort_wakes_waiters_with_error():
    barrier = Barrier(3, ctx=FORK)
    errors = []

    def body():
        try:
            barrier.wait(10)
        except BrokenBarrierError:
            errors.append("broken")

    threads = run_threads(body, 2)
    deadline = time.monotonic() + 10
    while barrier.n_waiting < 2 and time.monotonic() < deadline:
        time.sleep(0.001)
    barrier.abort()
    join_all(threads)
    assert errors == ["broken", "broken"]
    assert barrier.broken and barrier.n_waiting == 0


def test_barrier_reset_breaks_current_round_then_works_again():
    barrier = Barrier(2, ctx=FORK)
    errors = []

    def body():
        try:
            barrier.wait(10)
        except BrokenBarrierError:
            errors.append("reset")

    threads = run_threads(body, 1)
    deadline = time.monotonic() + 10
    while barrier.n_waiting < 1 and time.monotonic() < deadline:
        time.sleep(0.001)
    barrier.reset()
    join_all(threads)
    assert errors == ["reset"]
    results = []
    join_all(run_threads(lambda: results.append(barrier.wait(10)), 2))
    assert sorted(results) == [0, 1]


def test_barrier_action_failure_breaks_barrier():
    def boom():
        raise KeyError("action failed")

    barrier = Barrier(2, action=boom, ctx=FORK)
    outcome = []

    def body():
        try:
            barrier.wait(10)
            outcome.append("passed")
        except BrokenBarrierError:
            outcome.append("broken")
        except KeyError:
            outcome.append("action error")

    join_all(run_threads(body, 2))
    assert sorted(outcome) == ["action error", "broken"]
    assert barrier.broken
