"""Dask distributed: the same ``Pool`` / executor API on a cluster (``backend="dask"``).

Dask runs the tasks; manyproc's pool core still decides everything else, so a pool on a
cluster keeps the semantics of a pool on this machine, including what Dask lacks:
per-task timeouts and kill-on-cancel that really stop the work, a lost worker failing
only its task (never silently re-run), bounded submission (``imap`` reads its input as
the cluster needs it), adaptive chunks sized for Dask's per-task overhead::

    Driver (pool core)         DaskBackend (this process)              Dask cluster
    ------------------         --------------------------              ------------
    SpawnWorker(w, slot) ----> bind virtual worker w to one thread  +------------------+
                               of a Dask worker (address, pid)      | worker A (nanny) |
    SendTask(w, t, items) ---> client.submit(run_task, pinned to A, |  thread: w1      |
                               retries=0) ------------------------> |  thread: w2      |
    TaskDone / WorkerExited <- collector thread: future done ->     +------------------+
                               fetch, decode (remote tracebacks)    +------------------+
    KillWorker(w) -----------> agent thread: cancel the future; if  | worker B (nanny) |
     (timeout, cancel)         the task still runs, the nanny       |  thread: w3 ...  |
                               SIGKILLs A (it restarts A)           +------------------+
                               scheduler events ("all" topic): worker added / removed

Virtual workers. The pool has ``processes`` slots; each live worker of the core is a
*virtual worker* bound to one thread of one Dask worker process, and its tasks are
pinned there (``workers=[address]``, ``allow_other_workers=False``). So the core's
picture stays exact: a virtual worker runs one task at a time (no prefetch), the pid
in statistics and errors is the Dask worker's, and when that process dies every virtual
worker bound to it exits (its task fails with :class:`manyproc.WorkerLostError` naming
the address) and is replaced on a live one. Pinning is also what stops Dask from
re-running a task whose worker died: it has nowhere else to go, and the backend cancels
it. A pool that starts its own ``LocalCluster`` also sets ``allowed-failures`` to 0.

Killing. Dask cannot interrupt a running task. On a timeout or a kill-on-cancel the
backend cancels the future and, if the task is still executing, has the worker's nanny
SIGKILL the worker process (the nanny starts a fresh one; the virtual workers bound to
the old process exit). A worker without a nanny is ended with ``os._exit`` and is not
restarted; ``client.restart_workers`` is the fallback when neither takes effect. A
worker living in this very process (``LocalCluster(processes=False)``) cannot be killed:
its task is abandoned, as a ``ThreadPool`` abandons a thread.

Requirements: the Dask workers must be able to import manyproc (the tasks run
``manyproc._backends.dask.run_task``); they can when they share this environment, as
the workers of a ``LocalCluster`` do. Functions travel pickled by manyproc (cloudpickle
for lambdas and closures), arguments and results as manyproc pickles them, so errors
read the same as with the local backend. The client must be synchronous.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import pickle
import re
import signal
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from concurrent import futures as _cf
from itertools import starmap
from typing import Any

import dask
from distributed import Client, LocalCluster
from distributed.comm.core import CommClosedError
from distributed.scheduler import KilledWorker

from manyproc import reduction, util
from manyproc._errors import WorkerLostError
from manyproc._os.cpus import cpu_budget
from manyproc._poolcore import (
    Event,
    TaskDone,
    TaskSkipped,
    WorkerExited,
    WorkerInitFailed,
    WorkerReady,
    WorkerStarted,
)

from . import worker as wire
from .base import JobRecord, WorkerBackend
from .local import FunctionCache, _describe
from .remote import add_note, rebuild_error

__all__ = ["DaskBackend", "VirtualWorker", "OPTIONS", "SUBMIT_OPTIONS", "run_task",
           "prepare_worker"]

#: what ``backend_options`` may hold
OPTIONS = frozenset({"client", "address", "cluster_options", "submit_options"})
#: what ``backend_options["submit_options"]`` may pass on to ``Client.submit``
SUBMIT_OPTIONS = frozenset({"priority", "resources", "annotations"})

#: seconds a killed Dask worker has to leave the scheduler before the fallback
#: (``client.restart_workers``), and as long again before its virtual workers are
#: reported gone anyway (so that the pool never hangs)
KILL_CONFIRM_SECONDS = 10.0
#: seconds a replacement virtual worker waits for a killed or lost Dask worker to come
#: back (the nanny restarts it) before it shares a thread of another worker
REJOIN_GRACE_SECONDS = 10.0
#: seconds between checks, while tasks are in flight, that every Dask worker the
#: backend binds to is still known to the scheduler
AUDIT_SECONDS = 5.0
#: settings of the pool core for this backend (see ``PoolConfig``): Dask spends hundreds
#: of microseconds per task, so adaptive chunks aim at 0.1 s of work; no prefetch, so a
#: virtual worker holds exactly the task it runs (and a killed one kills only that)
POOL_CONFIG: Mapping[str, Any] = {"prefetch": 0, "deep_prefetch": 0,
                                  "chunk_target_seconds": 0.1,
                                  "batch_target_seconds": 0.05, "lost_task_retries": 0}
#: most items of a ``chunksize=1`` imap that travel as one Dask task once measured tiny
#: (each still answered, failed and timed on its own; see ``JobSpec.batch_limit``). Kept
#: moderate because the core gives a batch ``count * batch_target_seconds`` on top of
#: one item's ``task_timeout`` before it splits it to find a stuck item.
BATCH_LIMIT = 256

_monotonic = time.monotonic
_perf_counter = time.perf_counter
_RUNNING_STATES = ("executing", "long-running")
_KILL_SIGNAL = getattr(signal, "SIGKILL", signal.SIGTERM)
_LOST_ERRORS: tuple[type[BaseException], ...] = (KilledWorker, CommClosedError, OSError)
_CANCELLED = (asyncio.CancelledError, _cf.CancelledError)


# --- what runs in the Dask workers -----------------------------------------------------------

_FUNCTIONS: OrderedDict[bytes, tuple[Any, int]] = OrderedDict()
_FUNCTIONS_LOCK = threading.Lock()
_READY: set[str] = set()  # pools whose initializer ran in this process
_READY_LOCK = threading.Lock()


def _function(fblob: bytes) -> tuple[Any, int]:
    """The ``(func, call)`` pickled in ``fblob``, unpickled once per worker process."""
    with _FUNCTIONS_LOCK:
        entry = _FUNCTIONS.get(fblob)
        if entry is not None:
            _FUNCTIONS.move_to_end(fblob)
            return entry
    entry = pickle.loads(fblob)
    with _FUNCTIONS_LOCK:
        _FUNCTIONS[fblob] = entry
        if len(_FUNCTIONS) > 32:
            _FUNCTIONS.popitem(last=False)
    return entry


class _Capture(wire._Worker):
    """The local worker's encoding-failure logic, keeping the answer instead of writing it."""

    def __init__(self, mode: int) -> None:
        super().__init__(-1, -1)
        self.current_mode = mode
        self.answer = b""

    def send(self, message: tuple[Any, ...]) -> None:
        self.answer = wire.dumps_result(message)


def run_task(fblob: bytes, items_blob: bytes, task_id: int) -> bytes:
    """Run one task in a Dask worker; return the pickled answer of the local wire protocol.

    The answer is ``DONE(task, results, seconds)`` or ``FAILED(task, results_before,
    error, seconds)``: the task's own exception never escapes to Dask, so Dask never
    retries it and its traceback comes back whole.
    """
    results: list[Any] = []
    mode = wire.CALL_ONE
    started = _perf_counter()
    try:
        func, mode = _function(fblob)
        items = pickle.loads(items_blob)
        append = results.append
        if mode == wire.CALL_ONE:
            results.extend(map(func, items))
        elif mode == wire.CALL_STAR:
            results.extend(starmap(func, items))
        elif mode == wire.CALL_APPLY:
            for args, kwargs in items:
                append(func(*args, **kwargs))
        else:
            wire.run_each(func, mode == wire.CALL_STAR_EACH, items, append, wire._error_payload)
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the pool
        seconds = _perf_counter() - started
        message: tuple[Any, ...] = (wire.FAILED, task_id, results,
                                    wire._error_payload(exc, len(results)), seconds)
        del exc
    else:
        seconds = _perf_counter() - started
        message = (wire.DONE, task_id, results, seconds)
    try:
        return wire.dumps_result(message)
    except Exception:  # noqa: BLE001 - a result that does not pickle fails its item
        capture = _Capture(mode)
        capture.send_encoding_failure(task_id, results, seconds)
        return capture.answer


def prepare_worker(token: str, init_blob: bytes) -> bytes:
    """Run the pool's initializer once in this Dask worker process (a virtual worker's
    start); answer ``READY(pid)`` or ``INIT_FAILED(error)``."""
    with _READY_LOCK:
        if token not in _READY:
            try:
                initializer, initargs = pickle.loads(init_blob)
                initializer(*initargs)
            except BaseException as exc:  # noqa: BLE001 - reported to the pool
                return wire.dumps_result((wire.INIT_FAILED, wire._error_payload(exc, 0)))
            _READY.add(token)
    return wire.dumps_result((wire.READY, os.getpid()))


def identify_worker(dask_worker: Any) -> tuple[int, int, str | None]:
    """``(pid, threads, nanny address)`` of a Dask worker (run with ``client.run``)."""
    state = getattr(dask_worker, "state", None)
    nthreads = getattr(state, "nthreads", None) or getattr(dask_worker, "nthreads", None) or 1
    return os.getpid(), int(nthreads), getattr(dask_worker, "nanny", None)


def tasks_running(keys: list[str], dask_worker: Any) -> bool:
    """Whether this Dask worker still executes one of ``keys`` (even if it was cancelled)."""
    for key in keys:
        task = dask_worker.state.tasks.get(key)
        if task is not None and (task.state in _RUNNING_STATES
                                 or getattr(task, "previous", None) in _RUNNING_STATES):
            return True
    return False


def kill_worker_process(dask_worker: Any) -> int | None:
    """Run in a nanny: SIGKILL its worker process now (the nanny then starts a new one)."""
    pid = dask_worker.pid
    if pid:
        os.kill(pid, _KILL_SIGNAL)
    return pid


def exit_worker_process() -> None:
    """Run in a worker without a nanny: end the process now (a task cannot be stopped)."""
    os._exit(70)


# --- the pool's side -------------------------------------------------------------------------


class VirtualWorker:
    """One worker of the pool: a thread of a Dask worker process (``Pool._pool`` shows it).

    Attributes:
        worker_id: the pool core's id of this worker.
        slot: the pool slot it fills.
        address: the Dask worker it is bound to (``None`` while waiting for one).
        pid: that Dask worker's process id (on its host).
        exitcode: ``None`` while alive; 0 once it has exited (how Dask's process ended
            is not known here).
    """

    __slots__ = ("worker_id", "slot", "address", "pid", "exitcode", "name", "task",
                 "probe", "killing", "stopping", "started", "waiting_since")

    def __init__(self, worker_id: int, slot: int, name: str) -> None:
        self.worker_id = worker_id
        self.slot = slot
        self.name = name
        self.address: str | None = None
        self.pid: int | None = None
        self.exitcode: int | None = None
        self.task: _Task | None = None
        self.probe: _Task | None = None
        self.killing = False
        self.stopping = False
        self.started = False  # the driver knows its pid (spawn returned it)
        self.waiting_since = _monotonic()

    def is_alive(self) -> bool:
        return self.exitcode is None

    @property
    def ident(self) -> int | None:
        return self.pid

    def __repr__(self) -> str:
        state = "alive" if self.exitcode is None else "exited"
        return (f"<VirtualWorker {self.name} on {self.address or '(waiting for a Dask worker)'}"
                f" pid={self.pid} {state}>")


class _Node:
    """A Dask worker process the backend knows."""

    __slots__ = ("address", "pid", "nthreads", "nanny", "bound", "doomed")

    def __init__(self, address: str, pid: int, nthreads: int, nanny: str | None) -> None:
        self.address = address
        self.pid = pid
        self.nthreads = max(1, nthreads)
        self.nanny = nanny
        self.bound: set[int] = set()  # virtual workers bound here
        self.doomed = False  # being killed: bind nothing new here


class _Task:
    """A task (or a virtual worker's start probe) submitted to Dask."""

    __slots__ = ("vw", "task_id", "job", "start", "count", "future", "key", "settled",
                 "revoked", "is_probe")

    def __init__(self, vw: VirtualWorker, task_id: int, job: JobRecord | None, start: int,
                 count: int, key: str, is_probe: bool = False) -> None:
        self.vw = vw
        self.task_id = task_id
        self.job = job
        self.start = start
        self.count = count
        self.key = key
        self.future: Any = None
        self.settled = False
        self.revoked = False
        self.is_probe = is_probe


class _Hub:
    """Fans the scheduler's ``all`` events out to every backend sharing one client (a
    client has one handler per topic; the user's own handler keeps being called)."""

    def __init__(self, previous: Any) -> None:
        self.previous = previous
        self.listeners: list[Any] = []

    def __call__(self, event: Any) -> Any:
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception as exc:  # noqa: BLE001 - one pool's bug must not stop the others
                util.sub_warning("manyproc dask backend: event handler failed: %r", exc)
        if self.previous is not None:
            return self.previous(event)
        return None


_HUBS: dict[int, _Hub] = {}
_HUBS_LOCK = threading.Lock()


def _check_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise TypeError(f"backend_options must be a dict, not {options!r} "
                        f"({type(options).__name__}); e.g. backend_options={{'client': client}}")
    unknown = sorted(set(options) - OPTIONS, key=str)
    if unknown:
        raise TypeError(f"unsupported backend_options for the 'dask' backend: "
                        f"{', '.join(repr(k) for k in unknown)}; supported: "
                        f"{', '.join(sorted(OPTIONS))}")
    if "client" in options and "address" in options:
        raise ValueError("backend_options: pass either 'client' or 'address', not both")
    submit = options.get("submit_options") or {}
    if not isinstance(submit, Mapping):
        raise TypeError(f"backend_options['submit_options'] must be a dict, not {submit!r}")
    unknown = sorted(set(submit) - SUBMIT_OPTIONS, key=str)
    if unknown:
        raise TypeError(f"unsupported submit_options for the 'dask' backend: "
                        f"{', '.join(repr(k) for k in unknown)}; supported: "
                        f"{', '.join(sorted(SUBMIT_OPTIONS))} (the backend pins each task "
                        "to its worker and sets retries=0 itself)")
    cluster_options = options.get("cluster_options")
    if cluster_options is not None:
        if not isinstance(cluster_options, Mapping):
            raise TypeError(f"backend_options['cluster_options'] must be a dict of "
                            f"LocalCluster arguments, not {cluster_options!r}")
        if "client" in options or "address" in options:
            raise ValueError("backend_options: 'cluster_options' configures the LocalCluster "
                             "the pool starts itself; it cannot go with 'client' or 'address'")
    return dict(options)


class DaskBackend(WorkerBackend):
    """Runs a pool's tasks on a Dask cluster through virtual workers (see the module)."""

    remote = True
    pool_config = POOL_CONFIG
    batch_limit = BATCH_LIMIT
    #: tasks of one imap cut ahead per slot (no prefetch here: a few are plenty)
    imap_window_per_worker = 4

    def __init__(self, processes: int | None, initializer: Any, initargs: Sequence[Any],
                 options: Mapping[str, Any] | None = None) -> None:
        """Connect to (or start) a cluster and learn its workers.

        Args:
            processes: the pool's slots; ``None``: the cluster's threads (or, for a
                cluster the pool starts, the CPUs this process may use).
            initializer, initargs: run once in each Dask worker process before the
                first task of this pool there.
            options: ``backend_options`` (see ``OPTIONS``).

        Raises:
            TypeError, ValueError: bad options; the message names them.
            RuntimeError: the workers cannot run manyproc's tasks (not installed there).
            OSError: the scheduler cannot be reached.
        """
        opts = _check_options(options)
        self._submit_options = dict(opts.get("submit_options") or {})
        self._token = uuid.uuid4().hex[:12]
        self.functions = FunctionCache()
        self._init_blob: bytes | None = None
        if initializer is not None:
            self._init_blob = reduction.dumps((initializer, tuple(initargs)))
        self._cluster: Any = None
        self._owned = False
        client = opts.get("client")
        if client is not None:
            if not isinstance(client, Client):
                raise TypeError(f"backend_options['client'] must be a distributed.Client, not "
                                f"{client!r} ({type(client).__name__})")
        elif opts.get("address") is not None:
            address = opts["address"]
            if not isinstance(address, str):
                raise TypeError(f"backend_options['address'] must be the scheduler's address "
                                f"as a str (e.g. 'tcp://10.0.0.5:8786'), not {address!r}")
            client = Client(address, set_as_default=False)
            self._owned = True
        else:
            if processes is None:
                processes = cpu_budget().count
            cluster_kwargs: dict[str, Any] = {
                "n_workers": processes, "threads_per_worker": 1, "processes": True,
                "dashboard_address": ":0", "silence_logs": logging.CRITICAL}
            cluster_kwargs.update(opts.get("cluster_options") or {})
            with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
                self._cluster = LocalCluster(**cluster_kwargs)
            try:
                client = Client(self._cluster, set_as_default=False)
            except BaseException:
                self._cluster.close()
                raise
            self._owned = True
        if getattr(client, "asynchronous", False):
            raise ValueError("the 'dask' backend needs a synchronous distributed.Client (one "
                             "made with asynchronous=False, the default)")
        self.client: Any = client
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._events: list[Event] = []
        self._woken = False
        self._closed = False
        self._vws: dict[int, VirtualWorker] = {}  # alive
        self._exited: dict[int, VirtualWorker] = {}  # recently exited (see send)
        self._slots: list[VirtualWorker | None] = []
        self._nodes: dict[str, _Node] = {}
        self._tasks: dict[str, _Task] = {}  # key -> task or probe in flight
        self._pending: deque[VirtualWorker] = deque()  # waiting for a Dask worker
        self._names = itertools.count(1)
        self._rejoin_until = 0.0  # a lost or killed nanny worker may come back until then
        self._kills: dict[str, float] = {}  # address -> when to try the fallback
        self._given_up: set[str] = set()
        self._removed: set[str] = set()  # addresses the scheduler dropped (until re-added)
        self._next_audit = 0.0
        self._agent_jobs: deque[tuple[Any, ...]] = deque()
        self._agent_cond = threading.Condition(self._lock)
        self._collect: deque[_Task] = deque()
        self._collect_cond = threading.Condition(self._lock)
        try:
            self._subscribe()
            self._learn_workers()
            if processes is None:
                processes = sum(node.nthreads for node in self._nodes.values())
                if processes < 1:
                    raise ValueError(
                        "the Dask cluster has no workers yet, so the pool cannot size itself: "
                        "pass processes=N, or wait for workers first "
                        "(client.wait_for_workers(1))")
        except BaseException:
            self._shutdown()
            raise
        self.processes: int = processes
        self._slots = [None] * processes
        self._agent = threading.Thread(target=self._agent_loop, name="manyproc-dask-agent",
                                       daemon=True)
        self._collector = threading.Thread(target=self._collector_loop,
                                           name="manyproc-dask-collector", daemon=True)
        self._agent.start()
        self._collector.start()

    # --- cluster membership ------------------------------------------------------------------

    def _subscribe(self) -> None:
        client = self.client
        with _HUBS_LOCK:
            hub = _HUBS.get(id(client))
            if hub is None:
                previous = getattr(client, "_event_handlers", {}).get("all")
                if isinstance(previous, _Hub):  # left by a closed pool (it stays there)
                    previous = previous.previous
                hub = _Hub(previous)
                _HUBS[id(client)] = hub
                client.subscribe_topic("all", hub)
            hub.listeners.append(self._on_cluster_event)

    def _unsubscribe(self) -> None:
        client = self.client
        with _HUBS_LOCK:
            hub = _HUBS.get(id(client))
            if hub is None:
                return
            if self._on_cluster_event in hub.listeners:
                hub.listeners.remove(self._on_cluster_event)
            if hub.listeners:
                return
            del _HUBS[id(client)]
            try:
                if hub.previous is not None:
                    client.subscribe_topic("all", hub.previous)
                elif client.status in ("running", "connecting", "newly-created"):
                    client.unsubscribe_topic("all")
            except Exception:  # noqa: BLE001 - the client is closing
                pass

    def _learn_workers(self) -> None:
        """Ask every Dask worker who it is (and so check that it can import manyproc)."""
        answers = self.client.run(identify_worker, on_error="return")
        broken = {addr: value for addr, value in answers.items()
                  if isinstance(value, BaseException)}
        if broken and len(broken) == len(answers):
            addr, error = next(iter(broken.items()))
            raise RuntimeError(
                f"the Dask workers cannot run manyproc's tasks (worker {addr}: {error!r}). "
                "Install manyproc in the workers' environment (the same version as here)"
            ) from error
        with self._lock:
            for addr, value in answers.items():
                if not isinstance(value, BaseException):
                    self._add_node(addr, value)

    def _add_node(self, address: str, identity: tuple[int, int, str | None]) -> None:
        """A Dask worker is usable (lock held): bind the virtual workers waiting for one."""
        if address in self._nodes or address in self._removed or self._closed:
            return  # (removed: it left while we asked who it was)
        pid, nthreads, nanny = identity
        self._nodes[address] = _Node(address, pid, nthreads, nanny)
        self._bind_pending()

    def _on_cluster_event(self, event: Any) -> None:
        """The scheduler's ``all`` topic (runs in the client's event loop: never block)."""
        try:
            msg = event[1]
            action = msg.get("action")
        except (TypeError, IndexError, AttributeError):
            return
        if action == "add-worker" and msg.get("worker"):
            with self._lock:
                self._removed.discard(msg["worker"])
                self._agent_jobs.append(("identify", msg["worker"]))
                self._agent_cond.notify()
        elif action == "remove-worker" and msg.get("worker"):
            with self._lock:
                self._removed.add(msg["worker"])
                self._node_gone(msg["worker"], "it left the cluster (its process died, was "
                                "killed, or was removed by the scheduler)")

    def _node_gone(self, address: str, why: str) -> None:
        """A Dask worker is gone (lock held): its virtual workers exit, their tasks are lost."""
        node = self._nodes.pop(address, None)
        self._kills.pop(address, None)
        if node is not None and node.nanny is not None:
            self._rejoin_until = _monotonic() + REJOIN_GRACE_SECONDS
        for vw in list(self._vws.values()):
            if vw.address != address or vw.exitcode is not None:
                continue
            task = vw.task
            if task is not None and not task.settled:
                self._lost(task, why)
            self._exit(vw)

    # --- the core's instructions (driver lock held) ------------------------------------------

    def spawn(self, worker_id: int, slot: int) -> int | None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the Dask backend of this pool is closed")
            vw = VirtualWorker(worker_id, slot, f"DaskPoolWorker-{next(self._names)}")
            self._vws[worker_id] = vw
            self._slots[slot] = vw
            node = self._pick_node()
            if node is None:
                self._pending.append(vw)
                self._agent_cond.notify()  # it watches the grace period
            else:
                self._bind(vw, node)
            vw.started = True
            return vw.pid

    def send(self, worker_id: int, task_id: int, job: JobRecord, start: int,
             items: Sequence[Any]) -> BaseException | None:
        try:
            items_blob = reduction.dumps(items)
        except Exception as exc:  # noqa: BLE001 - an argument that cannot be pickled
            return exc
        fblob = job.fblob
        assert fblob is not None, "the pool prepares every job's function"
        with self._lock:
            key = f"manyproc-{_key_label(job.label)}-{self._token}-{task_id}"
            vw = self._vws.get(worker_id)
            if vw is None or vw.address is None:
                gone = self._exited.get(worker_id)
                if gone is not None:
                    self._lost_before_start(
                        worker_id, _Task(gone, task_id, job, start, len(items), key))
                return None  # its WorkerExited is on the way
            task = _Task(vw, task_id, job, start, len(items), key)
            try:
                future = self.client.submit(
                    run_task, fblob, items_blob, task_id, key=key, workers=[vw.address],
                    allow_other_workers=False, retries=0, pure=False, **self._submit_options)
            except Exception as exc:  # noqa: BLE001 - e.g. the client was closed
                error = RuntimeError(f"the task could not be submitted to the Dask cluster: "
                                     f"{exc!r}")
                error.__cause__ = exc
                return error
            task.future = future
            vw.task = task
            self._tasks[key] = task
        future.add_done_callback(functools.partial(self._future_done, task))
        return None

    def revoke(self, worker_id: int, task_id: int) -> None:
        with self._lock:
            vw = self._vws.get(worker_id)
            task = vw.task if vw is not None else None
            if task is None or task.task_id != task_id or task.settled:
                return
            task.revoked = True
            self._agent_jobs.append(("cancel", [task.future]))
            self._agent_cond.notify()

    def stop(self, worker_id: int) -> None:
        with self._lock:
            vw = self._vws.get(worker_id)
            if vw is None or vw.exitcode is not None:
                return
            if vw.task is not None and not vw.task.settled:
                vw.stopping = True  # exits once its task is answered
                return
            self._drop_probe(vw)
            self._exit(vw)

    def kill(self, worker_id: int) -> None:
        with self._lock:
            vw = self._vws.get(worker_id)
            if vw is None or vw.exitcode is not None:
                return
            self._drop_probe(vw)
            task = vw.task
            node = self._nodes.get(vw.address) if vw.address is not None else None
            if task is None or task.settled or node is None or task.future.done():
                if task is not None and not task.settled:
                    self._settle(task)
                self._exit(vw)  # nothing of it runs: nothing to stop
                return
            self._settle(task)  # the core ignores what a worker being killed says
            vw.killing = True
            node.doomed = True
            if node.nanny is not None:  # its replacement is worth waiting for
                self._rejoin_until = _monotonic() + REJOIN_GRACE_SECONDS
            self._agent_jobs.append(("kill", node.address))
            self._agent_cond.notify()

    def workers(self) -> list[Any]:
        return list(self._slots)

    # --- virtual workers (lock held) ---------------------------------------------------------

    def _pick_node(self) -> _Node | None:
        """The Dask worker with the most free threads; ``None`` to wait for one."""
        best: _Node | None = None
        best_free = 0
        least: _Node | None = None
        for node in self._nodes.values():
            if node.doomed:
                continue
            free = node.nthreads - len(node.bound)
            if free > best_free:
                best, best_free = node, free
            if least is None or len(node.bound) < len(least.bound):
                least = node
        if best is not None:
            return best
        if least is None or _monotonic() < self._rejoin_until or any(
                node.doomed for node in self._nodes.values()):
            return None  # a worker is being restarted: wait for it (or for the grace period)
        return least  # more slots than threads: share one (tasks queue in Dask)

    def _bind(self, vw: VirtualWorker, node: _Node) -> None:
        vw.address = node.address
        vw.pid = node.pid
        node.bound.add(vw.worker_id)
        if vw.started:  # it waited: the driver learns its pid now
            self._push(WorkerStarted(now=_monotonic(), worker_id=vw.worker_id, pid=vw.pid))
        if self._init_blob is None:
            self._push(WorkerReady(now=_monotonic(), worker_id=vw.worker_id))
            return
        key = f"manyproc-start-{self._token}-{vw.worker_id}"
        probe = _Task(vw, -1, None, 0, 0, key, is_probe=True)
        try:
            future = self.client.submit(prepare_worker, self._token, self._init_blob, key=key,
                                        workers=[node.address], allow_other_workers=False,
                                        retries=0, pure=False)
        except Exception as exc:  # noqa: BLE001 - the client was closed
            self._push(WorkerInitFailed(now=_monotonic(), worker_id=vw.worker_id, error=exc))
            self._exit(vw)
            return
        probe.future = future
        vw.probe = probe
        self._tasks[key] = probe
        future.add_done_callback(functools.partial(self._future_done, probe))

    def _bind_pending(self, *, force: bool = False) -> None:
        while self._pending:
            vw = self._pending[0]
            if vw.exitcode is not None:
                self._pending.popleft()
                continue
            node = self._pick_node()
            if node is None and force:
                live = [n for n in self._nodes.values() if not n.doomed]
                node = min(live, key=lambda n: len(n.bound)) if live else None
            if node is None:
                return
            self._pending.popleft()
            self._bind(vw, node)

    def _drop_probe(self, vw: VirtualWorker) -> None:
        probe = vw.probe
        if probe is not None and not probe.settled:
            self._settle(probe)
            self._agent_jobs.append(("cancel", [probe.future]))
            self._agent_cond.notify()
        vw.probe = None

    def _exit(self, vw: VirtualWorker) -> None:
        """Report the virtual worker's end (once)."""
        if vw.exitcode is not None:
            return
        vw.exitcode = 0
        if vw.address is not None:
            node = self._nodes.get(vw.address)
            if node is not None:
                node.bound.discard(vw.worker_id)
        self._vws.pop(vw.worker_id, None)
        if len(self._exited) > 64:
            self._exited.clear()
        self._exited[vw.worker_id] = vw
        self._push(WorkerExited(now=_monotonic(), worker_id=vw.worker_id))

    def _settle(self, task: _Task) -> None:
        task.settled = True
        self._tasks.pop(task.key, None)

    def _lost(self, task: _Task, why: str) -> None:
        """The task's Dask worker died under it (lock held); its virtual worker exits next."""
        self._settle(task)
        self._agent_jobs.append(("cancel", [task.future]))  # pinned to a dead worker: drop it
        self._agent_cond.notify()
        vw = task.vw
        if task.is_probe or vw.killing:
            return
        job = task.job
        assert job is not None
        if task.count > 1 and job.call >= wire.CALL_ONE_EACH:
            return  # a batch: the core splits it on the worker's exit, blaming one item
        what = _describe(job, task.task_id, task.start)
        error = WorkerLostError(
            f"Dask worker {vw.address} (pid {vw.pid}) was lost {what}: {why}. The task "
            "failed (Dask was not allowed to run it again); the pool replaced the worker and "
            "goes on.", pid=vw.pid, task=what)
        error.address = vw.address  # type: ignore[attr-defined]
        self._push(TaskDone(now=_monotonic(), worker_id=vw.worker_id, task_id=task.task_id,
                            results=(), error=error))

    def _lost_before_start(self, worker_id: int, task: _Task) -> None:
        """A task was sent to a virtual worker whose exit is reported but not yet handled:
        answer it before that exit, if the exit has not been polled yet (lock held)."""
        for index, event in enumerate(self._events):
            if isinstance(event, WorkerExited) and event.worker_id == worker_id:
                mark = len(self._events)
                self._lost(task, "its Dask worker left before the task could start")
                if len(self._events) > mark:  # move the answer in front of the exit
                    self._events.insert(index, self._events.pop())
                return

    def _push(self, event: Event) -> None:
        self._events.append(event)
        self._cond.notify()

    # --- answers: Dask's callback thread, then the collector ---------------------------------

    def _future_done(self, task: _Task, future: Any) -> None:
        with self._lock:
            if task.settled or self._closed:
                return
            self._collect.append(task)
            self._collect_cond.notify()

    def _collector_loop(self) -> None:
        """Fetch finished tasks' answers (blocking calls: never with the lock held)."""
        lock = self._lock
        while True:
            with lock:
                while not self._collect and not self._closed:
                    self._collect_cond.wait()
                if self._closed:
                    return
                task = self._collect.popleft()
                if task.settled:
                    continue
            future = task.future
            outcome: Any = None
            failure: BaseException | None = None
            try:
                status = future.status
                if status == "finished":
                    outcome = future.result()
                elif status == "error":
                    failure = future.exception()
                else:
                    failure = None  # cancelled
            except _CANCELLED:
                failure = None  # cancelled while we fetched it
            except BaseException as exc:  # noqa: BLE001 - fetching failed: the data is gone
                failure = exc
            event: Event | None = None
            if outcome is not None:
                try:
                    event = self._decode(task, pickle.loads(outcome))
                except Exception as exc:  # noqa: BLE001 - e.g. a type that exists only there
                    add_note(exc, "the task's answer could not be unpickled in this process")
                    event = self._dask_failure(task, exc, note=False)
            with lock:
                if task.settled or self._closed:
                    continue
                vw = task.vw
                if event is not None:
                    self._settle(task)
                    self._push(event)
                    if task.is_probe:
                        vw.probe = None
                        if isinstance(event, WorkerInitFailed):
                            self._exit(vw)
                    elif vw.stopping:
                        self._exit(vw)
                elif isinstance(failure, _LOST_ERRORS) or failure is None and not task.revoked:
                    self._failed_under(task, failure)
                elif failure is None:  # revoked
                    self._settle(task)
                    self._push(TaskSkipped(now=_monotonic(), worker_id=vw.worker_id,
                                           task_id=task.task_id))
                else:
                    self._settle(task)
                    self._push(self._dask_failure(task, failure))
                    if task.is_probe:
                        self._exit(vw)
                del event, failure, outcome

    def _failed_under(self, task: _Task, failure: BaseException | None) -> None:
        """Dask says the task's worker died (or the future vanished): lock held."""
        vw = task.vw
        if isinstance(failure, KilledWorker):
            last = getattr(failure.last_worker, "address", None) or vw.address
            if last is not None:
                self._node_gone(last, "its process died while running the task "
                                      "(Dask reported KilledWorker)")
            if not task.settled:
                self._lost(task, "Dask reported KilledWorker")
                self._exit(vw)
            return
        why = ("Dask cancelled the task (was the client closed, or the scheduler lost?)"
               if failure is None else f"the connection to it failed ({failure!r})")
        self._lost(task, why)
        self._exit(vw)

    def _decode(self, task: _Task, message: tuple[Any, ...]) -> Event:
        vw = task.vw
        code = message[0]
        now = _monotonic()
        where = f"in Dask worker {vw.address} (pid {vw.pid})"
        if code == wire.READY:
            return WorkerReady(now=now, worker_id=vw.worker_id)
        if code == wire.INIT_FAILED:
            error = rebuild_error(message[1], f"raised by the pool initializer {where}")
            return WorkerInitFailed(now=now, worker_id=vw.worker_id, error=error)
        job = task.job
        assert job is not None
        if code == wire.DONE:
            results = message[2]
            if job.call >= wire.CALL_ONE_EACH:
                for offset, value in enumerate(results):
                    if type(value) is wire.ItemFailure:
                        value.error = rebuild_error(
                            value.error,
                            f"raised {where} {_describe(job, task.task_id, task.start + offset)}")
            return TaskDone(now=now, worker_id=vw.worker_id, task_id=task.task_id,
                            results=results, duration=message[3])
        if code == wire.FAILED:
            payload = message[3]
            error = rebuild_error(
                payload, f"raised {where} {_describe(job, task.task_id, task.start + payload[5])}")
            return TaskDone(now=now, worker_id=vw.worker_id, task_id=task.task_id,
                            results=message[2], error=error, duration=message[4])
        raise RuntimeError(f"a Dask task of the pool answered with an unknown message {code!r}")

    def _dask_failure(self, task: _Task, failure: BaseException, note: bool = True) -> Event:
        """Dask itself failed the task (not the function): fail it with Dask's error."""
        vw = task.vw
        if note:
            hint = ""
            if isinstance(failure, ImportError) and "manyproc" in str(failure):
                hint = "; install manyproc in the Dask workers' environment"
            add_note(failure, f"raised by Dask (not by the function) in worker {vw.address}"
                              f"{hint}")
        if task.is_probe:
            return WorkerInitFailed(now=_monotonic(), worker_id=vw.worker_id, error=failure)
        job = task.job
        assert job is not None
        if job.call >= wire.CALL_ONE_EACH:  # each item answers for itself
            return TaskDone(now=_monotonic(), worker_id=vw.worker_id, task_id=task.task_id,
                            results=[wire.ItemFailure(failure)] * task.count)
        return TaskDone(now=_monotonic(), worker_id=vw.worker_id, task_id=task.task_id,
                        results=(), error=failure)

    # --- the agent: control calls that block -------------------------------------------------

    def _agent_loop(self) -> None:
        lock = self._lock
        while True:
            with lock:
                job = None
                while not self._closed:
                    if self._agent_jobs:
                        job = self._agent_jobs.popleft()
                        break
                    due = self._agent_due()
                    if due is not None and due <= 0:
                        break
                    self._agent_cond.wait(due)
                if self._closed:
                    return
            try:
                if job is None:
                    self._agent_deadlines()
                elif job[0] == "identify":
                    self._identify(job[1])
                elif job[0] == "cancel":
                    self._cancel(job[1])
                elif job[0] == "kill":
                    self._kill_node(job[1])
            except Exception as exc:  # noqa: BLE001 - never let the agent die; the pool goes on
                util.sub_warning("manyproc dask backend: %r failed: %r", job, exc)

    def _agent_due(self) -> float | None:
        """Seconds until the agent has something to check (lock held)."""
        now = _monotonic()
        dues = list(self._kills.values())
        if self._pending and any(not node.doomed for node in self._nodes.values()):
            dues.append(self._force_bind_at())
        if self._tasks:
            if self._next_audit <= 0.0:
                self._next_audit = now + AUDIT_SECONDS
            dues.append(self._next_audit)
        return None if not dues else max(0.0, min(dues) - now)

    def _force_bind_at(self) -> float:
        """When the first waiting virtual worker stops waiting for a restarted Dask worker
        and shares a thread of another one (lock held)."""
        return max(self._rejoin_until, self._pending[0].waiting_since + REJOIN_GRACE_SECONDS)

    def _agent_deadlines(self) -> None:
        now = _monotonic()
        fallback: list[str] = []
        with self._lock:
            for address, due in list(self._kills.items()):
                if due > now:
                    continue
                if address in self._given_up:
                    # it never left: report its virtual workers gone so the pool goes on
                    util.sub_warning("manyproc dask backend: Dask worker %s did not stop; its "
                                     "tasks may still be running", address)
                    self._given_up.discard(address)
                    self._node_gone(address, "it could not be stopped")
                else:
                    self._given_up.add(address)
                    self._kills[address] = now + KILL_CONFIRM_SECONDS
                    fallback.append(address)
            if self._pending and now >= self._force_bind_at():
                self._bind_pending(force=True)
            audit = bool(self._tasks) and 0.0 < self._next_audit <= now
            if audit:
                self._next_audit = 0.0
        if audit:
            self._audit()
        for address in fallback:
            util.debug("dask backend: restarting worker %s with restart_workers", address)
            self.client.restart_workers([address], timeout=KILL_CONFIRM_SECONDS,
                                        raise_for_error=False)

    def _audit(self) -> None:
        """Drop the workers the scheduler no longer has (a missed ``remove-worker`` event
        would leave tasks pinned to a gone worker waiting for ever)."""
        with self._lock:
            before = set(self._nodes)
        known = set(self.client.scheduler_info(n_workers=-1).get("workers", ()))
        with self._lock:
            for address in [a for a in self._nodes if a in before and a not in known]:
                self._node_gone(address, "the scheduler no longer knows it")

    def _identify(self, address: str) -> None:
        answers = self.client.run(identify_worker, workers=[address], on_error="return")
        identity = answers.get(address)
        if identity is None or isinstance(identity, BaseException):
            util.debug("dask backend: cannot use worker %s: %r", address, identity)
            return
        with self._lock:
            self._add_node(address, identity)

    def _cancel(self, futures: list[Any]) -> None:
        futures = [f for f in futures if f is not None]
        if futures and self.client.status == "running":
            self.client.cancel(futures, reason="manyproc pool: task no longer wanted")

    def _kill_node(self, address: str) -> None:
        """Stop tasks that Dask cannot interrupt: cancel them, and if one still runs, end
        the process running it (its virtual workers exit when the scheduler drops it)."""
        with self._lock:
            if address not in self._nodes or address in self._kills:
                return  # gone already, or being ended: its removal settles everything
            victims = [vw for vw in self._vws.values() if vw.address == address and vw.killing]
            tasks = [vw.task for vw in victims if vw.task is not None]
        if not victims:
            return
        self._cancel([task.future for task in tasks])
        answers = self.client.run(tasks_running, [task.key for task in tasks],
                                  workers=[address], on_error="return")
        with self._lock:
            node = self._nodes.get(address)
            if node is None or address in self._kills:
                return
            if answers.get(address) is False or node.pid == os.getpid():
                # none had begun (or all just ended): the process need not be touched; or
                # the worker lives in this very process (a LocalCluster of threads), which
                # cannot be killed: like a ThreadPool's thread, the task is abandoned
                for vw in victims:
                    self._exit(vw)
                node.doomed = any(vw.killing for vw in self._vws.values()
                                  if vw.address == address)
                self._bind_pending()
                return
            self._kills[address] = _monotonic() + KILL_CONFIRM_SECONDS
            self._rejoin_until = _monotonic() + REJOIN_GRACE_SECONDS
            nanny = node.nanny
            self._agent_cond.notify()
        if nanny is not None:
            self.client.run(kill_worker_process, workers=[address], nanny=True,
                            on_error="return")
        else:
            self.client.run(exit_worker_process, workers=[address], on_error="return")

    # --- the leader --------------------------------------------------------------------------

    def poll(self, timeout: float | None) -> list[Event]:
        with self._cond:
            if not self._events and not self._woken:
                self._cond.wait(timeout)
            self._woken = False
            events, self._events = self._events, []
        return events

    def wakeup(self) -> None:
        with self._cond:
            self._woken = True
            self._cond.notify()

    # --- the end -----------------------------------------------------------------------------

    def kill_all_now(self) -> None:
        futures: list[Any] = []
        with self._lock:
            for task in list(self._tasks.values()):
                self._settle(task)
                futures.append(task.future)
            for vw in list(self._vws.values()):
                vw.exitcode = 0
            self._vws.clear()
        if not self._owned or self._cluster is None:
            try:
                self._cancel(futures)
            except Exception:  # noqa: BLE001 - best effort in an emergency
                pass
        self.close()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            futures = [task.future for task in self._tasks.values()]
            self._tasks.clear()
            self._agent_cond.notify_all()
            self._collect_cond.notify_all()
            self._cond.notify_all()
        if futures and not self._owned:
            try:
                self._cancel(futures)  # also ends a fetch the collector may be waiting on
            except Exception:  # noqa: BLE001 - the client may be closing
                pass
        del futures
        try:
            self._shutdown()
        finally:
            for thread in (getattr(self, "_agent", None), getattr(self, "_collector", None)):
                if thread is not None and thread is not threading.current_thread():
                    thread.join(timeout=5.0)

    def _shutdown(self) -> None:
        try:
            self._unsubscribe()
        finally:
            if self._owned:
                try:
                    self.client.close()
                finally:
                    if self._cluster is not None:
                        self._cluster.close()


def _key_label(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", label)[:40] or "task"
