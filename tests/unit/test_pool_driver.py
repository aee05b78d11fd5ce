"""The driver on a fake in-memory backend: leader/follower waiting, lazy input, windows,
callbacks, fatal errors. No processes, no threads of workers."""

from __future__ import annotations

import threading
import time
from collections import deque

import pytest

from manyproc._backends import worker as wire
from manyproc._backends.base import JobRecord, WorkerBackend
from manyproc._backends.driver import Driver
from manyproc._poolcore import (
    CancelMode,
    JobKind,
    JobSpec,
    PoolConfig,
    TaskDone,
    WorkerExited,
    WorkerReady,
)

pytestmark = pytest.mark.timeout(30)


class FakeBackend(WorkerBackend):
    """Workers that run a task the moment the leader polls; deaths on demand."""

    remote = False

    def __init__(self):
        self.cond = threading.Condition()
        self.events = []
        self.workers_alive = {}
        self.sent = deque()
        self.kills = []
        self.hold = threading.Event()  # while set, tasks are not run
        self.closed = False
        self.polling = None

    def spawn(self, worker_id, slot):
        self.workers_alive[worker_id] = slot
        self.events.append(WorkerReady(now=time.monotonic(), worker_id=worker_id))
        return 1000 + worker_id

    def send(self, worker_id, task_id, job, start, items):
        self.sent.append((worker_id, task_id, job, items))
        return None

    def revoke(self, worker_id, task_id):
        pass

    def stop(self, worker_id):
        self.events.append(WorkerExited(now=time.monotonic(), worker_id=worker_id, exitcode=0))
        self.workers_alive.pop(worker_id, None)

    def kill(self, worker_id):
        self.kills.append(worker_id)
        self.events.append(WorkerExited(now=time.monotonic(), worker_id=worker_id,
                                        exitcode=-9))
        self.workers_alive.pop(worker_id, None)
        self.sent = deque(s for s in self.sent if s[0] != worker_id)

    def poll(self, timeout):
        with self.cond:
            self.polling = threading.current_thread()
            if not self.events and (not self.sent or self.hold.is_set()):
                self.cond.wait(timeout)
            self.polling = None
            events, self.events = self.events, []
        if not self.hold.is_set():
            while self.sent:
                worker_id, task_id, job, items = self.sent.popleft()
                results, error = [], None
                try:
                    for item in items:
                        results.append(job.func(item))
                except Exception as exc:  # noqa: BLE001
                    error = exc
                events.append(TaskDone(now=time.monotonic(), worker_id=worker_id,
                                       task_id=task_id, results=results, error=error))
        return events

    def wakeup(self):
        with self.cond:
            self.cond.notify_all()

    def workers(self):
        return list(self.workers_alive)

    def close(self):
        self.closed = True


class Sink(JobRecord):
    def __init__(self, func, kind="map"):
        super().__init__(func, wire.CALL_ONE, getattr(func, "__name__", "f"), kind)
        self.delivered = []
        self.outcome = None
        self.actions_run = 0

    def on_deliver(self, start, values, error):
        self.delivered.extend(values)
        if error is not None:
            self.delivered.append(error)

    def on_resolve(self, ok, cancelled, value, error):
        self.outcome = ("ok", value) if ok else ("cancelled", None) if cancelled else \
            ("error", error)

        def action():
            self.actions_run += 1

        return action


@pytest.fixture
def driver():
    backend = FakeBackend()
    d = Driver(backend, PoolConfig(processes=2, prefetch=1), name="test")
    d.start()
    yield d
    d.terminate()
    assert d.join(timeout=10)
    assert backend.closed


def square(x):
    return x * x


def test_map_resolves_and_runs_its_action_outside_the_lock(driver):
    sink = Sink(square)
    driver.submit(sink, JobSpec(kind=JobKind.MAP, chunksize=2), list(range(7)))
    assert driver.wait_until(lambda: sink.outcome is not None, 10)
    assert sink.outcome == ("ok", [x * x for x in range(7)])
    assert driver.wait_until(lambda: sink.actions_run == 1, 10)


def test_lazy_input_is_read_by_the_feeder_and_bounded(driver):
    pulled = []

    def source():
        for i in range(1000):
            pulled.append(i)
            yield i

    driver.backend.hold.set()  # nothing finishes: the window must stop the reading
    sink = Sink(square, "imap")
    spec = JobSpec(kind=JobKind.IMAP, chunksize=1, max_in_flight=4, ack_consumption=True)
    driver.submit(sink, spec, (), exhausted=False, source=source())
    time.sleep(0.2)
    assert 0 < len(pulled) <= 10
    driver.backend.hold.clear()
    driver.release_window(sink.job_id)  # nobody consumes in step: run to the end
    assert driver.wait_until(lambda: sink.outcome is not None, 10)
    assert sink.delivered == [x * x for x in range(1000)]


def test_an_input_error_drops_the_chunk_it_interrupted(driver):
    def source():
        yield from range(7)
        raise KeyError("input broke")

    sink = Sink(square, "imap")
    spec = JobSpec(kind=JobKind.IMAP, chunksize=2)
    driver.submit(sink, spec, (), exhausted=False, source=source())
    assert driver.wait_until(lambda: sink.outcome is not None, 10)
    assert sink.delivered[:6] == [0, 1, 4, 9, 16, 25]
    assert isinstance(sink.delivered[6], KeyError) and len(sink.delivered) == 7


def test_a_follower_is_woken_by_the_leader(driver):
    driver.backend.hold.set()
    sink = Sink(square)
    driver.submit(sink, JobSpec(kind=JobKind.MAP), [3])
    seen = []
    follower = threading.Thread(
        target=lambda: seen.append(driver.wait_until(lambda: sink.outcome is not None, 10)))
    follower.start()
    time.sleep(0.05)
    driver.backend.hold.clear()
    driver.backend.wakeup()
    assert driver.wait_until(lambda: sink.outcome is not None, 10)
    follower.join(10)
    assert seen == [True]


def test_wait_until_times_out(driver):
    driver.backend.hold.set()
    sink = Sink(square)
    driver.submit(sink, JobSpec(kind=JobKind.MAP), [3])
    started = time.monotonic()
    assert not driver.wait_until(lambda: sink.outcome is not None, 0.1)
    assert time.monotonic() - started < 2


def test_cancel_kill_and_pending_only(driver):
    driver.backend.hold.set()
    running = Sink(square, "apply")
    driver.submit(running, JobSpec(kind=JobKind.APPLY), [2])
    assert not driver.cancel(running.job_id, CancelMode.PENDING_ONLY)  # it was sent
    assert driver.cancel(running.job_id, CancelMode.KILL)
    assert running.outcome == ("cancelled", None)
    assert driver.backend.kills


def test_terminate_soon_from_a_collector_callback(driver):
    driver.backend.hold.set()
    sink = Sink(square)
    driver.submit(sink, JobSpec(kind=JobKind.MAP), [1, 2, 3])
    driver.terminate_soon()  # takes no lock: the background thread does it
    assert driver.wait_until(lambda: driver.stopped, 10)
    assert sink.outcome == ("cancelled", None)
    assert "garbage-collected" in driver.cancel_reason


def test_a_failing_action_does_not_stop_the_others(driver, capsys):
    class Loud(Sink):
        def on_resolve(self, ok, cancelled, value, error):
            super().on_resolve(ok, cancelled, value, error)

            def action():
                raise RuntimeError("callback failed")

            return action

    loud, quiet = Loud(square), Sink(square)
    driver.submit(loud, JobSpec(kind=JobKind.MAP), [1])
    driver.submit(quiet, JobSpec(kind=JobKind.MAP), [1])
    assert driver.wait_until(lambda: quiet.actions_run == 1, 10)
    assert "callback failed" in capsys.readouterr().err


def test_a_caller_polling_is_woken_when_an_action_makes_its_result_ready(driver):
    # The background thread reads the result and runs the job's callback after giving
    # up the lead; meanwhile the caller takes the lead and polls. The callback finishing
    # must wake it (it once slept for ever).
    started = threading.Event()

    class Slow(Sink):
        def on_resolve(self, ok, cancelled, value, error):
            super().on_resolve(ok, cancelled, value, error)

            def action():
                started.set()
                deadline = time.monotonic() + 5
                while driver.backend.polling is None and time.monotonic() < deadline:
                    time.sleep(0.001)  # until the caller polls
                self.ready = True

            return action

    sink = Slow(square)
    sink.ready = False
    driver.submit(sink, JobSpec(kind=JobKind.MAP), [5])
    driver.backend.wakeup()  # the fake's send does not wake a poll; a pipe would
    assert started.wait(5)
    began = time.monotonic()
    assert driver.wait_until(lambda: sink.ready, 10)
    assert time.monotonic() - began < 4
