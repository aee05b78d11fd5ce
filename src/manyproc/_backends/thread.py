"""Worker threads: the backend of ``ThreadPool`` and ``manyproc.dummy.Pool``.

Tasks and results are handed over as objects (nothing is pickled). Each worker
thread has its own in-box; what the threads report goes to one out-box that the
driver's leader drains in ``poll``.

A thread cannot be killed. When the core kills a worker (task timeout, cancel,
terminate) the thread is *abandoned*: its exit is reported at once, a new thread
takes its place, and the old one finishes its current call in the background (as a
daemon thread) with its result dropped.
"""

from __future__ import annotations

import itertools
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Sequence
from itertools import starmap
from typing import Any

from manyproc._poolcore import (
    Event,
    TaskDone,
    TaskSkipped,
    WorkerExited,
    WorkerInitFailed,
    WorkerReady,
)

from . import worker as wire
from .base import JobRecord, WorkerBackend

__all__ = ["ThreadBackend"]

_monotonic = time.monotonic
_perf_counter = time.perf_counter
_STOP = object()
_THIS_FILE = __file__


class _WorkerThread(threading.Thread):
    """One worker: runs the tasks put in its in-box, in order."""

    def __init__(self, backend: ThreadBackend, worker_id: int, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.backend = backend
        self.worker_id = worker_id
        self.inbox: deque[Any] = deque()
        self.revoked: set[int] = set()
        self.ready_event = threading.Condition(threading.Lock())
        self.abandoned = False

    def put(self, message: Any) -> None:
        with self.ready_event:
            self.inbox.append(message)
            self.ready_event.notify()

    def _next(self) -> Any:
        with self.ready_event:
            while not self.inbox:
                self.ready_event.wait()
            return self.inbox.popleft()

    def run(self) -> None:
        backend = self.backend
        worker_id = self.worker_id
        initializer = backend.initializer
        try:
            if initializer is not None:
                initializer(*backend.initargs)
        except BaseException as exc:  # noqa: BLE001 - reported to the pool
            backend.report(self, WorkerInitFailed(now=_monotonic(), worker_id=worker_id,
                                                  error=exc), exited=True)
            return
        backend.report(self, WorkerReady(now=_monotonic(), worker_id=worker_id))
        while True:
            message = self._next()
            if message is _STOP:
                break
            task_id, job, items = message
            if task_id in self.revoked:
                self.revoked.discard(task_id)
                backend.report(self, TaskSkipped(now=_monotonic(), worker_id=worker_id,
                                                 task_id=task_id))
                continue
            event = self._run(task_id, job, items)
            del message, job, items
            backend.report(self, event)
            del event
            if self.abandoned:
                return
        backend.report(self, None, exited=True)

    def _run(self, task_id: int, job: JobRecord, items: Sequence[Any]) -> Event:
        func = job.func
        call = job.call
        results: list[Any] = []
        append = results.append
        started = _perf_counter()
        try:
            if call == wire.CALL_ONE:
                results.extend(map(func, items))  # on an error, the results before it stay
            elif call == wire.CALL_STAR:
                results.extend(starmap(func, items))
            elif call == wire.CALL_APPLY:
                for args, kwargs in items:
                    append(func(*args, **kwargs))
            else:
                wire.run_each(func, call == wire.CALL_STAR_EACH, items, append, _keep)
        except Exception as exc:  # noqa: BLE001 - the task's error, for its caller
            return TaskDone(now=_monotonic(), worker_id=self.worker_id, task_id=task_id,
                            results=results, error=exc, duration=_perf_counter() - started)
        return TaskDone(now=_monotonic(), worker_id=self.worker_id, task_id=task_id,
                        results=results, duration=_perf_counter() - started)


def _keep(exc: BaseException, offset: int) -> BaseException:
    return exc


class ThreadBackend(WorkerBackend):
    """Worker threads in this process."""

    remote = False

    def __init__(self, processes: int, initializer: Any, initargs: Sequence[Any]) -> None:
        self.initializer = initializer
        self.initargs = tuple(initargs)
        self._threads: dict[int, _WorkerThread] = {}
        self._slots: list[Any] = [None] * processes
        self._names = itertools.count(1)
        # reentrant: wakeup() may run from a garbage collector's callback in a thread
        # that already holds it
        self._cond = threading.Condition(threading.RLock())
        self._events: list[Event] = []
        self._woken = False

    def report(self, thread: _WorkerThread, event: Event | None, *, exited: bool = False) -> None:
        """Called by worker threads: queue what happened for the leader."""
        with self._cond:
            if thread.abandoned:
                return
            if event is not None:
                self._events.append(event)
            if exited:
                thread.abandoned = True
                self._events.append(WorkerExited(now=_monotonic(), worker_id=thread.worker_id,
                                                 exitcode=0))
            self._cond.notify()

    # --- called with the driver's lock held -----------------------------------------------

    def spawn(self, worker_id: int, slot: int) -> int | None:
        thread = _WorkerThread(self, worker_id, f"ThreadPoolWorker-{next(self._names)}")
        thread.start()
        self._threads[worker_id] = thread
        self._slots[slot] = thread
        return None

    def send(self, worker_id: int, task_id: int, job: JobRecord, start: int,
             items: Sequence[Any]) -> BaseException | None:
        thread = self._threads.get(worker_id)
        if thread is not None:
            thread.put((task_id, job, items))
        return None

    def revoke(self, worker_id: int, task_id: int) -> None:
        thread = self._threads.get(worker_id)
        if thread is not None:
            thread.revoked.add(task_id)

    def stop(self, worker_id: int) -> None:
        thread = self._threads.get(worker_id)
        if thread is not None:
            thread.put(_STOP)

    def kill(self, worker_id: int) -> None:
        thread = self._threads.pop(worker_id, None)
        if thread is None:
            return
        with self._cond:
            if thread.abandoned:
                return
            thread.abandoned = True
            self._events.append(WorkerExited(now=_monotonic(), worker_id=worker_id))
            self._cond.notify()
        thread.put(_STOP)  # if it is idle, let it end; if busy, it ends after its task

    def where_stuck(self, worker_id: int) -> str | None:
        thread = self._threads.get(worker_id)
        if thread is None or thread.ident is None:
            return None
        frame = sys._current_frames().get(thread.ident)
        if frame is None:
            return None
        lines = traceback.format_stack(frame)
        # cut the worker loop's own frames: they say nothing about the task
        for index, line in enumerate(lines):
            if _THIS_FILE in line and "in _run\n" in line:
                lines = lines[index + 1:]
                break
        return f"Thread {thread.name!r} (most recent call last):\n" + "".join(lines)

    def workers(self) -> list[Any]:
        return list(self._slots)

    # --- the leader ---------------------------------------------------------------------------

    def poll(self, timeout: float | None) -> list[Event]:
        with self._cond:
            if not self._events and not self._woken:
                self._cond.wait(timeout)
            self._woken = False
            events, self._events = self._events, []
        for event in events:
            if isinstance(event, WorkerExited):
                self._threads.pop(event.worker_id, None)
        return events

    def wakeup(self) -> None:
        with self._cond:
            self._woken = True
            self._cond.notify()

    def kill_all_now(self) -> None:
        for worker_id in list(self._threads):
            thread = self._threads.pop(worker_id)
            thread.abandoned = True
            thread.put(_STOP)

    def close(self) -> None:
        self.kill_all_now()
