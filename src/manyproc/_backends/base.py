"""The backend seam: what a driver needs from the thing that runs workers.

A *backend* owns workers (processes, threads, cluster slots) and the channels to
them; the :class:`~manyproc._backends.driver.Driver` owns the pool core and the
callers' jobs, and turns the core's instructions into backend calls::

    Driver (one per pool)                      WorkerBackend
    ---------------------                      -------------
    SpawnWorker(w, slot)    ---------------->  spawn(w, slot) -> pid
    SendTask(w, t, job...)  ---------------->  send(w, t, job, start, items) -> error?
    RevokeTask / StopWorker / KillWorker --->  revoke / stop / kill
    leader thread, lock released:              poll(timeout) -> [events]
        TaskDone, WorkerReady, WorkerExited ... what the workers said and did
    any thread:                                wakeup(): make a running poll() return

Rules every backend keeps (the pool core's driver contract):

* ``spawn`` either returns (the worker exists; its ``WorkerReady`` or exit follows
  from ``poll``) or raises (the driver reports the failure itself);
* every spawned worker is answered by exactly one ``WorkerExited`` from ``poll``,
  after every message that worker sent;
* ``send``, ``revoke``, ``stop`` and ``kill`` never block for long and never raise
  because the worker died: its ``WorkerExited`` tells the story;
* ``poll`` is called by one thread at a time (the driver's leader), without the
  driver's lock; everything else is called with the lock held.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

from manyproc._poolcore import Event

__all__ = ["WorkerBackend", "JobRecord"]


class JobRecord:
    """What the driver knows of one job besides the core: the function and the face.

    Faces (``AsyncResult``, ``IMapIterator``, executor futures) subclass it; the driver
    calls the ``on_*`` hooks with its lock held, so they must be quick and must not
    call back into the pool. Work that may run user code (callbacks, future
    callbacks, progress bars) is returned as an *action*, which the driver runs
    after releasing its lock.

    Attributes:
        func: the function the job runs.
        call: how it is called on each item (``worker.CALL_APPLY`` / ``CALL_ONE`` /
            ``CALL_STAR``).
        label: names the work in error notes, e.g. ``"sqr"``.
        kind: ``"apply"``, ``"map"``, ``"imap"``... for error notes.
        fkey, fblob: the function's key and pickled form (process backends).
        job_id: given by the driver at submit time.
        wants_start: call ``on_start`` when the job's first task is sent.
    """

    __slots__ = ("func", "call", "label", "kind", "fkey", "fblob", "job_id", "wants_start",
                 "__weakref__")

    def __init__(self, func: Any, call: int, label: str, kind: str) -> None:
        self.func = func
        self.call = call
        self.label = label
        self.kind = kind
        self.fkey = 0
        self.fblob: bytes | None = None
        self.job_id = -1
        self.wants_start = False

    def on_start(self) -> None:
        """The first task of the job was sent to a worker."""

    def on_deliver(self, start: int, values: Sequence[Any], error: BaseException | None) -> None:
        """Results of a streaming job (see ``DeliverResults``)."""

    def on_progress(self, done: int, total: int | None) -> Any:
        """Items finished; may return an action."""
        return None

    def on_resolve(self, ok: bool, cancelled: bool, value: Any,
                   error: BaseException | None) -> Any:
        """The job's final word; may return an action to run without the lock."""
        raise NotImplementedError


class WorkerBackend(abc.ABC):
    """Starts workers, talks to them, and reports what they do as pool-core events."""

    #: whether task items and results cross a process boundary (pickled)
    remote: bool = True

    @abc.abstractmethod
    def spawn(self, worker_id: int, slot: int) -> int | None:
        """Start a worker for ``slot``; return its pid (or None for a thread).

        Raises:
            OSError, RuntimeError...: the worker could not be started.
        """

    @abc.abstractmethod
    def send(self, worker_id: int, task_id: int, job: JobRecord, start: int,
             items: Sequence[Any]) -> BaseException | None:
        """Queue a task (items ``start``... of the job) for the worker.

        Returns:
            ``None``, or the error if the task cannot be serialised (nothing was sent).
        """

    @abc.abstractmethod
    def revoke(self, worker_id: int, task_id: int) -> None:
        """Ask the worker to skip a task it holds and has not begun (best effort)."""

    @abc.abstractmethod
    def stop(self, worker_id: int) -> None:
        """Ask an idle worker to exit."""

    @abc.abstractmethod
    def kill(self, worker_id: int) -> None:
        """Kill the worker now (a thread cannot be killed: it is abandoned instead)."""

    def where_stuck(self, worker_id: int) -> str | None:
        """Ask a worker about to be killed for the stack of each of its threads.

        Called with the lock held, just before :meth:`kill` of a worker whose task timed
        out; must answer within a fraction of a second. ``None``: cannot tell.
        """
        return None

    @abc.abstractmethod
    def poll(self, timeout: float | None) -> list[Event]:
        """Wait up to ``timeout`` seconds for worker activity and return it as events.

        Called by the driver's leader thread without the lock. Returns early, possibly
        with no events, when :meth:`wakeup` is called.
        """

    @abc.abstractmethod
    def wakeup(self) -> None:
        """Make a ``poll`` running in another thread return soon (any thread may call it)."""

    def flush(self) -> None:  # noqa: B027 - optional hook, nothing to do by default
        """Push out data queued by ``send`` & co. (called with the lock held, once per round)."""

    def prepare_poll(self) -> None:  # noqa: B027 - optional hook
        """Called with the lock held just before the leader releases it to ``poll``."""

    @abc.abstractmethod
    def workers(self) -> list[Any]:
        """The objects behind each slot (``Process`` or ``Thread``), for ``Pool._pool``."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release every resource; every worker has exited (or was abandoned)."""

    def kill_all_now(self) -> None:  # noqa: B027 - optional hook
        """Emergency stop without the core (its state can no longer be trusted)."""
