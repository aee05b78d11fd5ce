"""Worker pools that never hang: ``Pool``, ``ThreadPool`` and their results.

The standard library's ``multiprocessing.pool`` API, on manyproc's pool core::

    Pool (this module)               Driver (_backends.driver)          workers
    ------------------               -------------------------          -------
    apply_async / map_async  ------> SubmitJob -> core -> SendTask ----> private pipe
    imap / imap_unordered            (lazy input read by a feeder)       per worker
    AsyncResult.get, next()  <-----> leader/follower wait:
                                     the waiting thread reads results   <-- answers,
                                     itself; a background thread leads       deaths
                                     when nobody waits                       (sentinels)
    close / terminate / join ------> Close / Terminate -> Stop/KillWorker

What manyproc adds, all keyword-only or new methods:

* a worker that dies (SIGKILL, segfault, ``os._exit``, out of memory) fails exactly
  the task it held with :class:`manyproc.WorkerLostError`; it is replaced and the pool
  goes on;
* ``task_timeout=`` (seconds per item) on the pool and on each call: a task that runs
  longer fails with :class:`manyproc.TaskTimeoutError` and its worker is killed and
  replaced. ``AsyncResult.get(timeout)`` keeps its standard meaning (it only waits);
* ``AsyncResult.cancel()``: cancel a job, killing the workers running it;
* ``progress=True`` (or a dict of tqdm options) on map, imap, imap_unordered, starmap
  and their ``_async`` forms: a progress bar with rate and ETA on stderr;
* ``Pool.statistics()``: per-worker tasks, busy time, restarts, and the CPU budget;
* an exception raised in a worker keeps its own type, carries the worker's traceback
  as ``__cause__`` (a :class:`RemoteTraceback`) and a note naming the worker and item;
  one that cannot be pickled comes back as :class:`RemoteTaskError`, a result that
  cannot be pickled as :class:`MaybeEncodingError`; neither ever hangs the pool;
* ``imap``/``imap_unordered`` read their input lazily with a bounded number of tasks in
  flight; ``chunksize=None`` (the default of ``map``) adapts to measured task times;
  with ``chunksize=1`` (their default), items measured to be tiny travel in batches,
  each still run, answered and failed on its own (a crash or a timeout in a batch fails
  only the item at fault: the batch is retried item by item, so items of that batch that
  had already finished run a second time);
* Ctrl-C in a blocking call raises ``KeyboardInterrupt`` at once: pending work is
  cancelled and the workers are killed (they ignore SIGINT themselves);
* workers are not daemonic, so a task may start its own pool; they still never outlive
  the parent (they watch it) nor block its exit (the pool terminates them at exit);
* ``backend="dask"`` (keyword-only, with ``backend_options``): the same API and the same
  semantics on a Dask cluster (timeouts and kill-on-cancel restart the Dask worker that
  runs the task, a lost worker fails only its task); see ``manyproc._backends.dask``.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import CancelledError
from dataclasses import dataclass
from typing import Any

from . import util
from ._backends import worker as _wire
from ._backends.base import JobRecord
from ._backends.driver import Driver
from ._backends.remote import MaybeEncodingError, RemoteTaskError, RemoteTraceback
from ._errors import TimeoutError
from ._os.cpus import CpuBudget, cpu_budget
from ._poolcore import (
    BrokenPoolError,
    CancelMode,
    JobKind,
    JobSpec,
    PoolClosedError,
    PoolConfig,
)
from ._poolcore import PoolStatistics as CoreStatistics
from ._poolcore import WorkerStatistics as WorkerStatistics
from ._progress import ProgressBar, make_bar

__all__ = [
    "Pool", "ThreadPool", "AsyncResult", "ApplyResult", "MapResult", "IMapIterator",
    "IMapUnorderedIterator", "RemoteTraceback", "RemoteTaskError", "MaybeEncodingError",
    "PoolStatistics", "WorkerStatistics", "BrokenPoolError", "PoolClosedError",
]

# The pool's states, under the standard library's names (``Pool._state``).
INIT = "INIT"
RUN = "RUN"
CLOSE = "CLOSE"
TERMINATE = "TERMINATE"

#: tasks a busy worker holds beyond the one it runs (hides the round trip between tasks)
PREFETCH = 1
#: the same for tasks measured to be short (a few ms): lets messages travel in batches
DEEP_PREFETCH = 16
#: tasks of one imap in flight per worker (read ahead + running + not yet consumed)
IMAP_WINDOW_PER_WORKER = 2 * (1 + DEEP_PREFETCH)
#: items of a chunksize=1 imap that may travel as one task once they are measured to be
#: tiny (each still answered on its own; see JobSpec.batch_limit)
BATCH_LIMIT = 32

for _cls in (RemoteTraceback, RemoteTaskError, MaybeEncodingError):
    _cls.__module__ = __name__
del _cls


def _label(func: Any) -> str:
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None)
    if not isinstance(name, str):
        name = type(func).__name__
    return name


def _check_callable(func: Any, method: str) -> None:
    if not callable(func):
        raise TypeError(
            f"{method}() needs a function as its first argument, got {func!r} "
            f"({type(func).__name__}); pass the function itself and its arguments "
            f"separately, e.g. pool.{method.split('.')[-1]}(f, ...) rather than the result "
            "of calling it")


def _check_chunksize(chunksize: Any, allow_none: bool) -> None:
    if chunksize is None and allow_none:
        return
    if isinstance(chunksize, bool) or not isinstance(chunksize, int):
        raise TypeError(f"chunksize must be an int >= 1{' or None' if allow_none else ''}, "
                        f"not {chunksize!r} ({type(chunksize).__name__})")
    if chunksize < 1:
        raise ValueError(f"Chunksize must be 1+, not {chunksize!r}: pass chunksize=1 or more"
                         f"{' (or None to let the pool choose)' if allow_none else ''}")


def _check_timeout(task_timeout: Any) -> float | None:
    if task_timeout is None:
        return None
    if isinstance(task_timeout, bool) or not isinstance(task_timeout, (int, float)):
        raise TypeError(f"task_timeout must be a number of seconds or None, not "
                        f"{task_timeout!r}")
    if not task_timeout > 0:
        raise ValueError(f"task_timeout must be a positive number of seconds (or None for no "
                         f"limit), not {task_timeout!r}")
    return float(task_timeout)


def _check_memory_limit(limit: Any, backend: str) -> int | None:
    """Check ``max_memory_per_child`` (bytes of resident memory; None: no limit)."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise TypeError(f"max_memory_per_child must be a number of bytes (int) or None, not "
                        f"{limit!r} ({type(limit).__name__}); e.g. 500 * 2**20 for 500 MiB")
    if limit <= 0:
        raise ValueError(f"max_memory_per_child must be a positive number of bytes, not "
                         f"{limit!r}")
    if backend != "processes":
        raise ValueError(f"max_memory_per_child recycles worker processes; it has no meaning "
                         f"with backend={backend!r}: leave it out")
    return limit


def _wait(driver: Driver, ready: Callable[[], bool], timeout: float | None) -> bool:
    """Wait as leader or follower; Ctrl-C cancels the pool's work and kills its workers."""
    try:
        return driver.wait_until(ready, timeout)
    except KeyboardInterrupt:
        driver.interrupt()
        raise


# An error standing at a position of a streaming job's results (also what a worker sends
# for an item that failed on its own in a batch).
_Failure = _wire.ItemFailure


# --- results --------------------------------------------------------------------------


class ApplyResult(JobRecord):
    """The result of ``apply_async`` (and, as ``MapResult``, of ``map_async``).

    ``get(timeout)`` waits and returns the value or raises the job's error;
    ``timeout`` only limits the wait (see ``task_timeout=`` to limit the work).
    """

    def __init__(self, pool: Pool, func: Any, call: int, kind: str,
                 callback: Callable[[Any], Any] | None,
                 error_callback: Callable[[BaseException], Any] | None,
                 bar: ProgressBar | None = None) -> None:
        super().__init__(func, call, _label(func), kind)
        self._driver = pool._driver
        self._callback = callback
        self._error_callback = error_callback
        self._bar = bar
        self._ready = False
        self._success = False
        self._value: Any = None

    def ready(self) -> bool:
        """Whether the job is over (done, failed or cancelled)."""
        return self._ready

    def successful(self) -> bool:
        """Whether the job finished without raising.

        Raises:
            ValueError: the job is not finished yet.
        """
        if not self._ready:
            raise ValueError(f"{self!r} not ready: call successful() once ready() is True "
                             "(or after wait()/get())")
        return self._success

    def wait(self, timeout: float | None = None) -> None:
        """Wait until the job is over, or at most ``timeout`` seconds."""
        if not self._ready:
            _wait(self._driver, self.ready, timeout)

    def get(self, timeout: float | None = None) -> Any:
        """Return the job's result, or raise its error.

        Raises:
            manyproc.TimeoutError: the result is not ready after ``timeout`` seconds
                (the job goes on).
        """
        if not self._ready:
            _wait(self._driver, self.ready, timeout)
            if not self._ready:
                raise TimeoutError(f"the result was not ready within {timeout} s (the job "
                                   "goes on; call get() again to keep waiting)")
        if self._success:
            return self._value
        raise self._value

    def cancel(self) -> bool:
        """Cancel the job: its queued tasks are dropped and workers running it are killed
        and replaced (a manyproc extension). Returns False if it was already over."""
        if self._ready:
            return False
        return self._driver.cancel(self.job_id, CancelMode.KILL)

    def _set(self, success: bool, value: Any) -> Callable[[], None] | None:
        self._value = value
        self._success = success
        callback = self._callback if success else self._error_callback
        bar = self._bar
        if callback is None and bar is None:
            self._ready = True
            return None

        def finish() -> None:
            try:
                if bar is not None:
                    bar.close()
                if callback is not None:
                    callback(value)
            finally:
                self._ready = True

        return finish

    def on_progress(self, done: int, total: int | None) -> Any:
        return self._bar.updater(done, total) if self._bar is not None else None

    def on_resolve(self, ok: bool, cancelled: bool, value: Any,
                   error: BaseException | None) -> Any:
        if ok:
            return self._set(True, value)
        if cancelled:
            error = CancelledError(self._driver.cancel_reason)
        return self._set(False, error)

    def __repr__(self) -> str:
        state = "ready" if self._ready else "pending"
        return f"<{type(self).__module__}.{type(self).__qualname__} {self.kind} {self.label} " \
               f"job {self.job_id} {state}>"


AsyncResult = ApplyResult


class MapResult(ApplyResult):
    """The result of ``map_async``/``starmap_async``: ``get()`` returns the list."""


class _StreamSink(JobRecord):
    """The driver's side of an ``imap`` iterator: the results delivered so far."""

    def __init__(self, driver: Driver, func: Any, call: int, kind: str,
                 bar: ProgressBar | None, acks: bool) -> None:
        super().__init__(func, call, _label(func), kind)
        self.driver = driver
        self.items: deque[Any] = deque()
        self.bounds: deque[int] = deque()  # item counts at which each delivery ends
        self.delivered = 0
        self.done = False
        self.bar = bar
        self.acks = acks

    def on_deliver(self, start: int, values: Sequence[Any], error: BaseException | None) -> None:
        items = self.items
        items.extend(values)
        count = len(values)
        if error is not None:
            items.append(_Failure(error))
            count += 1
        self.delivered += count
        if self.acks:
            self.bounds.append(self.delivered)

    def on_progress(self, done: int, total: int | None) -> Any:
        return self.bar.updater(done, total) if self.bar is not None else None

    def on_resolve(self, ok: bool, cancelled: bool, value: Any,
                   error: BaseException | None) -> Any:
        if not ok:
            if cancelled:
                error = CancelledError(self.driver.cancel_reason)
            assert error is not None
            self.items.append(_Failure(error))
        self.done = True
        bar = self.bar
        return bar.close if bar is not None else None


class IMapIterator:
    """The iterator ``imap`` returns: results in input order, as they come.

    ``next(timeout)`` waits at most ``timeout`` seconds (``manyproc.TimeoutError``).
    An error raised for one item is raised when that item's turn comes; iteration can
    go on after it. ``close()`` (a manyproc extension) drops the rest of the job.
    """

    _kind = JobKind.IMAP

    def __init__(self, sink: _StreamSink) -> None:
        self._sink = sink
        self._taken = 0
        self._unacked = 0
        self._closed = False

    def __iter__(self) -> IMapIterator:
        return self

    def next(self, timeout: float | None = None) -> Any:
        """Return the next result, waiting at most ``timeout`` seconds for it.

        Raises:
            StopIteration: every result was returned.
            manyproc.TimeoutError: no result came within ``timeout``.
        """
        sink = self._sink
        items = sink.items
        if not items:
            if sink.done or self._closed:
                if not items:
                    raise StopIteration
            else:
                if self._unacked:
                    self._ack()
                _wait(sink.driver, self._has_next, timeout)
                if not items:
                    if sink.done or self._closed:
                        raise StopIteration
                    raise TimeoutError(f"no result within {timeout} s (the job goes on; call "
                                       "next() again to keep waiting)")
        value = items.popleft()
        if sink.acks:
            self._taken += 1
            bounds = sink.bounds
            while bounds and bounds[0] <= self._taken:
                bounds.popleft()
                self._unacked += 1
            if self._unacked >= 8:
                self._ack()
        if type(value) is _Failure:
            raise value.error
        return value

    __next__ = next

    def _has_next(self) -> bool:
        return bool(self._sink.items) or self._sink.done

    def _ack(self) -> None:
        count, self._unacked = self._unacked, 0
        self._sink.driver.consumed(self._sink.job_id, count)

    def close(self) -> None:
        """Stop the job: tasks not yet running are dropped, running ones finish unobserved."""
        if self._closed:
            return
        self._closed = True
        sink = self._sink
        if not sink.done:
            sink.driver.cancel(sink.job_id, CancelMode.ABANDON)
        sink.items.clear()

    def __del__(self) -> None:
        sink = getattr(self, "_sink", None)
        if sink is not None and not sink.done and sink.acks and not self._closed:
            # Dropped unfinished: like the standard library, let the job run to its end,
            # no longer held back waiting for this iterator to consume it.
            sink.driver.release_window_later(sink.job_id)

    def __repr__(self) -> str:
        sink = self._sink
        return (f"<{type(self).__module__}.{type(self).__qualname__} {sink.label} job "
                f"{sink.job_id} {'done' if sink.done else 'running'}>")


class IMapUnorderedIterator(IMapIterator):
    """The iterator ``imap_unordered`` returns: results in the order they finish."""

    _kind = JobKind.IMAP_UNORDERED


# --- statistics ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolStatistics:
    """What ``Pool.statistics()`` returns: the pool now and since it started.

    Attributes:
        processes: worker places in the pool.
        cpu_budget: how the default number of workers was decided (affinity, cgroup
            quota, ``PYTHON_CPU_COUNT``); see ``manyproc._os.cpus.CpuBudget``.
        workers: one ``WorkerStatistics`` per place: tasks and items done, busy seconds,
            restarts (after deaths and kills), recycles (maxtasksperchild), lost and
            timed-out tasks, the current worker's pid.
        tasks_done, tasks_failed, tasks_lost, tasks_timed_out, tasks_cancelled: totals.
        tasks_queued, tasks_running, jobs_pending: now.
        workers_spawned, workers_lost, workers_recycled, start_failures: totals.
        state: the core's pool state name ('running', 'closed', 'terminated', 'broken').
    """

    processes: int
    cpu_budget: CpuBudget | None
    workers: tuple[WorkerStatistics, ...]
    tasks_done: int
    tasks_failed: int
    tasks_lost: int
    tasks_timed_out: int
    tasks_cancelled: int
    tasks_queued: int
    tasks_running: int
    jobs_pending: int
    workers_spawned: int
    workers_lost: int
    workers_recycled: int
    start_failures: int
    state: str

    @property
    def busy_time(self) -> float:
        """Seconds spent running tasks, summed over every worker."""
        return sum(w.busy_time for w in self.workers)

    @property
    def restarts(self) -> int:
        """Workers replaced after they died or were killed."""
        return sum(w.restarts for w in self.workers)


def _statistics(core: CoreStatistics, budget: CpuBudget | None) -> PoolStatistics:
    return PoolStatistics(
        processes=core.processes, cpu_budget=budget, workers=core.workers,
        tasks_done=core.tasks_done, tasks_failed=core.tasks_failed,
        tasks_lost=core.tasks_lost, tasks_timed_out=core.tasks_timed_out,
        tasks_cancelled=core.tasks_cancelled, tasks_queued=core.tasks_queued,
        tasks_running=core.tasks_running, jobs_pending=core.jobs_pending,
        workers_spawned=core.workers_spawned, workers_lost=core.workers_lost,
        workers_recycled=core.workers_recycled, start_failures=core.start_failures,
        state=core.state.value)


# --- the pool ------------------------------------------------------------------------------


#: backends whose workers live elsewhere: they take ``backend_options`` and size the pool
_REMOTE_BACKENDS = ("dask",)


def _check_backend(name: Any, options: Any, *, context: Any = None,
                   maxtasks: Any = None) -> str:
    """Check a ``backend=`` name (and what goes with it) before anything starts.

    Raises:
        ValueError: an unknown name (the message lists the valid ones), or an argument
            that has no meaning with that backend.
        TypeError: ``backend_options`` for a backend that takes none.
    """
    from ._backends import BACKENDS

    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"unknown pool backend {name!r}; choose one of "
                         f"{', '.join(repr(n) for n in BACKENDS)}")
    if name not in _REMOTE_BACKENDS:
        if options:
            keys = sorted(options) if isinstance(options, Mapping) else options
            raise TypeError(f"the {name!r} backend takes no backend_options, got {keys!r}; "
                            "backend_options are for backend='dask'")
        return name
    if context is not None:
        raise ValueError(f"context= chooses how local worker processes start; it has no "
                         f"meaning with backend={name!r} (got {context!r}): leave it out")
    if maxtasks is not None:
        raise ValueError(f"maxtasksperchild / max_tasks_per_child ({maxtasks!r}) is not "
                         f"supported with backend={name!r}: Dask recycles its own worker "
                         "processes (distributed.worker.memory.terminate); leave it out")
    return name


def _open_remote_backend(name: str, processes: int | None, initializer: Any,
                         initargs: tuple[Any, ...], options: Any) -> Any:
    """Load the backend module by name (only now: e.g. dask is imported only if chosen)."""
    from ._backends import get_backend

    try:
        cls = get_backend(name)
    except ImportError as exc:
        missing = exc.name or name
        raise ImportError(f"backend={name!r} needs the optional dependency {missing!r}, "
                          f"which cannot be imported ({exc}): pip install 'manyproc[{name}]'",
                          name=missing) from exc
    return cls(processes, initializer, initargs, options)


def _finalize_pool(driver: Driver) -> None:
    """Stop a pool that was collected or is still running at exit: workers are killed.

    When collected, the work is left to the pool's background thread: a collector's
    callback may run anywhere, even in a thread that holds the pool's lock.
    """
    if util.is_exiting():
        driver.terminate()
        driver.join(timeout=10.0)
    else:
        driver.terminate_soon()


class Pool:
    """A pool of worker processes (the standard library's ``multiprocessing.Pool``).

    Args:
        processes: number of workers; ``None`` uses the CPUs this process may really
            use (affinity and container quota, see ``statistics().cpu_budget``).
        initializer: called as ``initializer(*initargs)`` in each worker when it starts.
            If it raises, the error is reported and, after a few workers in a row fail
            the same way, every pending job fails with ``BrokenPoolError`` (chained to
            the initializer's exception) instead of restarting workers for ever.
        initargs: arguments of the initializer.
        maxtasksperchild: tasks a worker runs before it is replaced (``None``: no limit).
        context: the context whose start method starts the workers.
        task_timeout: keyword-only; seconds each item of every task may run before its
            worker is killed and the task fails with ``TaskTimeoutError``. Each call can
            set its own.
        backend: keyword-only; what runs the workers: ``"processes"`` (the default),
            ``"threads"``, or ``"dask"`` (a Dask cluster, with the same semantics: see
            ``manyproc._backends.dask``; ``processes=None`` then means the cluster's threads).
        backend_options: keyword-only; for ``"dask"``: ``client`` (a
            ``distributed.Client``) or ``address`` (the scheduler's), else the pool starts
            a ``LocalCluster`` of ``processes`` workers (``cluster_options`` are passed to
            it) and closes it with the pool; ``submit_options`` (``priority``,
            ``resources``, ``annotations``) go to each ``Client.submit``.
        max_memory_per_child: keyword-only; bytes of resident memory (RSS) a worker may
            hold after a task: past it, the worker takes no new task and is replaced once
            its current ones are done (a leaking library cannot grow a worker for ever).

    Raises:
        ValueError: ``processes`` < 1, or ``maxtasksperchild`` not a positive int, or an
            unknown ``backend`` (the message lists the valid ones).
        TypeError: ``initializer`` is not callable, or ``backend_options`` holds a key the
            backend does not support (the message names it).
        OSError: a worker could not be started (those already started are stopped).
    """

    _backend_name = "processes"

    def __init__(self, processes: int | None = None,
                 initializer: Callable[..., Any] | None = None, initargs: Iterable[Any] = (),
                 maxtasksperchild: int | None = None, context: Any = None, *,
                 task_timeout: float | None = None, backend: str | None = None,
                 backend_options: Mapping[str, Any] | None = None,
                 max_memory_per_child: int | None = None) -> None:
        self._state = INIT
        self._backend_kind = _check_backend(
            self._backend_name if backend is None else backend, backend_options,
            context=context, maxtasks=maxtasksperchild)
        self._memory_limit = _check_memory_limit(max_memory_per_child, self._backend_kind)
        budget: CpuBudget | None = None
        if processes is None and self._backend_kind not in _REMOTE_BACKENDS:
            budget = cpu_budget()
            processes = budget.count
        if processes is None:
            pass  # the remote backend sizes the pool from its cluster
        elif isinstance(processes, bool) or not isinstance(processes, int):
            raise TypeError(f"processes must be an int or None, not {processes!r} "
                            f"({type(processes).__name__})")
        elif processes < 1:
            raise ValueError(f"Number of processes must be at least 1, got {processes}; pass "
                             "processes=None to use every CPU this process may use")
        if maxtasksperchild is not None and (
                isinstance(maxtasksperchild, bool) or not isinstance(maxtasksperchild, int)
                or maxtasksperchild <= 0):
            raise ValueError(f"maxtasksperchild must be a positive int or None, not "
                             f"{maxtasksperchild!r}")
        if initializer is not None and not callable(initializer):
            raise TypeError(f"initializer must be a callable, not {initializer!r} "
                            f"({type(initializer).__name__})")
        self._task_timeout = _check_timeout(task_timeout)
        self._budget = budget
        self._initializer = initializer
        self._initargs = tuple(initargs)
        self._maxtasksperchild = maxtasksperchild
        self._ctx = context
        if self._backend_kind in _REMOTE_BACKENDS:
            backend_obj = _open_remote_backend(self._backend_kind, processes, initializer,
                                               self._initargs, backend_options)
            processes = backend_obj.processes
        else:
            assert processes is not None
            backend_obj = self._make_backend(processes, initializer, self._initargs, context)
        assert processes is not None
        self._processes: int = processes
        self._batch_limit: int = getattr(backend_obj, "batch_limit", BATCH_LIMIT)
        self._window_per_worker: int = getattr(backend_obj, "imap_window_per_worker",
                                               IMAP_WINDOW_PER_WORKER)
        config = PoolConfig(**{"processes": processes, "maxtasksperchild": maxtasksperchild,
                               "prefetch": PREFETCH, "deep_prefetch": DEEP_PREFETCH,
                               "eager_spawn": True,
                               **getattr(backend_obj, "pool_config", {})})
        self._driver = Driver(backend_obj, config, name=f"{type(self).__name__}-{id(self):x}")
        self._functions = getattr(backend_obj, "functions", None)
        self._driver.start()
        self._state = RUN
        self._finalizer = util.Finalize(self, _finalize_pool, (self._driver,), exitpriority=15)

    def _make_backend(self, processes: int, initializer: Any, initargs: tuple[Any, ...],
                      context: Any) -> Any:
        if self._backend_kind == "threads":
            from ._backends.thread import ThreadBackend

            return ThreadBackend(processes, initializer, initargs)
        from ._backends.local import ProcessBackend

        if context is None:
            from . import context as _context

            context = _context._default_context.get_context()
            self._ctx = context
        return ProcessBackend(context, processes, initializer, initargs,
                              memory_limit=self._memory_limit)

    # --- the standard surface ------------------------------------------------------------

    def _check_running(self) -> None:
        if self._state != RUN:
            how = "closed" if self._state == CLOSE else "terminated"
            raise PoolClosedError(f"Pool not running: it was {how}; submit work before "
                                  "close()/terminate(), or create a new pool")

    def _prepare(self, record: JobRecord) -> None:
        """Pickle the job's function once (processes), failing early if it cannot be."""
        if self._functions is not None:
            self._functions.prepare(record)

    def apply(self, func: Callable[..., Any], args: Iterable[Any] = (),
              kwds: Mapping[str, Any] = {}, *, task_timeout: float | None = None) -> Any:  # noqa: B006
        """Call ``func(*args, **kwds)`` in a worker and return its result."""
        return self.apply_async(func, args, kwds, task_timeout=task_timeout).get()

    def apply_async(self, func: Callable[..., Any], args: Iterable[Any] = (),
                    kwds: Mapping[str, Any] = {},  # noqa: B006 - the standard signature
                    callback: Callable[[Any], Any] | None = None,
                    error_callback: Callable[[BaseException], Any] | None = None, *,
                    task_timeout: float | None = None) -> ApplyResult:
        """Call ``func(*args, **kwds)`` in a worker; return an ``AsyncResult`` at once."""
        self._check_running()
        _check_callable(func, "Pool.apply_async")
        timeout = self._task_timeout if task_timeout is None else _check_timeout(task_timeout)
        result = ApplyResult(self, func, _wire.CALL_APPLY, "apply", callback, error_callback)
        spec = _apply_spec(result.label, timeout)
        if not isinstance(args, tuple):
            args = tuple(args)
        if self._submit_failed(result):
            return result
        self._driver.submit(result, spec, ((args, kwds),))
        return result

    def _submit_failed(self, record: ApplyResult) -> bool:
        """Prepare the record's function; on failure resolve the record with the error."""
        try:
            self._prepare(record)
        except Exception as exc:  # noqa: BLE001 - reported through the result, like the stdlib
            action = record._set(False, exc)
            if action is not None:
                action()
            return True
        return False

    def map(self, func: Callable[[Any], Any], iterable: Iterable[Any],
            chunksize: int | None = None, *, task_timeout: float | None = None,
            progress: Any = False) -> list[Any]:
        """Apply ``func`` to each item, in the workers; return the results in order."""
        return self._map_async(func, iterable, _wire.CALL_ONE, chunksize, None, None,
                               task_timeout, progress, "Pool.map").get()

    def starmap(self, func: Callable[..., Any], iterable: Iterable[Iterable[Any]],
                chunksize: int | None = None, *, task_timeout: float | None = None,
                progress: Any = False) -> list[Any]:
        """Like ``map``, but each item is unpacked as arguments: ``func(*item)``."""
        return self._map_async(func, iterable, _wire.CALL_STAR, chunksize, None, None,
                               task_timeout, progress, "Pool.starmap").get()

    def map_async(self, func: Callable[[Any], Any], iterable: Iterable[Any],
                  chunksize: int | None = None,
                  callback: Callable[[Any], Any] | None = None,
                  error_callback: Callable[[BaseException], Any] | None = None, *,
                  task_timeout: float | None = None, progress: Any = False) -> MapResult:
        """Like ``map``, but return a ``MapResult`` at once."""
        return self._map_async(func, iterable, _wire.CALL_ONE, chunksize, callback,
                               error_callback, task_timeout, progress, "Pool.map_async")

    def starmap_async(self, func: Callable[..., Any], iterable: Iterable[Iterable[Any]],
                      chunksize: int | None = None,
                      callback: Callable[[Any], Any] | None = None,
                      error_callback: Callable[[BaseException], Any] | None = None, *,
                      task_timeout: float | None = None, progress: Any = False) -> MapResult:
        """Like ``starmap``, but return a ``MapResult`` at once."""
        return self._map_async(func, iterable, _wire.CALL_STAR, chunksize, callback,
                               error_callback, task_timeout, progress, "Pool.starmap_async")

    def _map_async(self, func: Any, iterable: Iterable[Any], call: int, chunksize: Any,
                   callback: Any, error_callback: Any, task_timeout: Any, progress: Any,
                   method: str) -> MapResult:
        self._check_running()
        _check_callable(func, method)
        _check_chunksize(chunksize, allow_none=True)
        timeout = self._task_timeout if task_timeout is None else _check_timeout(task_timeout)
        if not isinstance(iterable, (list, tuple, range)):
            iterable = list(iterable)  # as the standard library does: errors raise here
        bar = make_bar(progress, len(iterable), _label(func))
        kind = "starmap" if call == _wire.CALL_STAR else "map"
        result = MapResult(self, func, call, kind, callback, error_callback, bar)
        if self._submit_failed(result):
            return result
        spec = JobSpec(kind=JobKind.MAP, chunksize=chunksize, task_timeout=timeout,
                       progress=bar is not None, label=result.label)
        self._driver.submit(result, spec, iterable)
        return result

    def imap(self, func: Callable[[Any], Any], iterable: Iterable[Any], chunksize: int = 1, *,
             task_timeout: float | None = None, progress: Any = False) -> IMapIterator:
        """Apply ``func`` to each item lazily; iterate over the results in order.

        The input is read as the workers need it (a bounded number of tasks ahead), and
        the results as they come. With ``chunksize=1`` tiny items travel in batches,
        each still failing on its own; ``chunksize=None`` adapts chunks to task times.
        """
        return self._imap(func, iterable, chunksize, task_timeout, progress, IMapIterator,
                          "Pool.imap")

    def imap_unordered(self, func: Callable[[Any], Any], iterable: Iterable[Any],
                       chunksize: int = 1, *, task_timeout: float | None = None,
                       progress: Any = False) -> IMapIterator:
        """Like ``imap``, but results come in the order they finish."""
        return self._imap(func, iterable, chunksize, task_timeout, progress,
                          IMapUnorderedIterator, "Pool.imap_unordered")

    def _imap(self, func: Any, iterable: Iterable[Any], chunksize: Any, task_timeout: Any,
              progress: Any, cls: type[IMapIterator], method: str) -> IMapIterator:
        self._check_running()
        _check_callable(func, method)
        _check_chunksize(chunksize, allow_none=True)
        timeout = self._task_timeout if task_timeout is None else _check_timeout(task_timeout)
        whole = isinstance(iterable, (list, tuple, range))
        length: int | None = len(iterable) if whole else _length_hint(iterable)  # type: ignore[arg-type]
        bar = make_bar(progress, length, _label(func))
        kind = "imap" if cls._kind is JobKind.IMAP else "imap_unordered"
        batch = self._batch_limit if chunksize == 1 and self._maxtasksperchild is None else None
        call = _wire.CALL_ONE_EACH if batch else _wire.CALL_ONE
        sink = _StreamSink(self._driver, func, call, kind, bar, acks=True)
        iterator = cls(sink)
        try:
            self._prepare(sink)
        except Exception as exc:  # noqa: BLE001 - raised by next(), like a task's error
            sink.on_resolve(False, False, None, exc)
            return iterator
        window = max(16, self._window_per_worker * self._processes)
        spec = JobSpec(kind=cls._kind, chunksize=chunksize, task_timeout=timeout,
                       max_in_flight=window, ack_consumption=True, progress=bar is not None,
                       length_hint=length, label=sink.label, batch_limit=batch)
        if whole:
            self._driver.submit(sink, spec, iterable)  # type: ignore[arg-type]
        else:
            self._driver.submit(sink, spec, (), exhausted=False, source=iter(iterable))
        return iterator

    def close(self) -> None:
        """Accept no more work; the workers exit once the pending jobs are done."""
        util.debug("closing pool")
        if self._state == RUN:
            self._state = CLOSE
            self._driver.close()

    def terminate(self) -> None:
        """Stop at once: pending jobs are cancelled and every worker is killed."""
        util.debug("terminating pool")
        self._state = TERMINATE
        self._driver.terminate()
        self._driver.join(timeout=30.0)

    def join(self) -> None:
        """Wait until every worker has exited (call ``close()`` or ``terminate()`` first).

        Raises:
            ValueError: the pool is still running.
        """
        util.debug("joining pool")
        if self._state == RUN:
            raise ValueError("Pool is still running: call close() (to finish the pending "
                             "work) or terminate() before join()")
        if self._state not in (CLOSE, TERMINATE):
            raise ValueError(f"In unknown state {self._state!r}")
        try:
            self._driver.join()
        except KeyboardInterrupt:
            self._driver.interrupt()
            raise

    def statistics(self) -> PoolStatistics:
        """A snapshot of the pool: per-worker counters, totals and the CPU budget."""
        return _statistics(self._driver.statistics(), self._budget)

    def __enter__(self) -> Pool:
        self._check_running()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.terminate()

    def __reduce__(self) -> Any:
        raise NotImplementedError(
            "pool objects cannot be passed between processes or pickled: create the pool "
            "in the process that uses it")

    def __repr__(self) -> str:
        return (f"<{type(self).__module__}.{type(self).__qualname__} "
                f"state={getattr(self, '_state', INIT)} "
                f"pool_size={getattr(self, '_processes', None)}>")

    def __del__(self, _warn: Any = warnings.warn, RUN: str = RUN) -> None:  # noqa: N803
        if getattr(self, "_state", None) == RUN:
            _warn(f"unclosed running multiprocessing pool {self!r}", ResourceWarning,
                  source=self)

    # --- what the standard library's tests look at ---------------------------------------------

    @property
    def _pool(self) -> list[Any]:
        """The worker objects (processes or threads) of every place, newest first filled."""
        return self._driver.workers()

    def _repopulate_pool(self) -> None:
        """Kept for compatibility: the pool replaces ended workers by itself."""


def _length_hint(iterable: Any) -> int | None:
    try:
        hint = len(iterable)
    except Exception:  # noqa: BLE001 - any sized-looking object may refuse
        return None
    return hint if isinstance(hint, int) and hint >= 0 else None


_apply_specs: dict[tuple[str, float | None], JobSpec] = {}


def _apply_spec(label: str, timeout: float | None) -> JobSpec:
    """The spec of an apply job (specs are immutable, so they are shared)."""
    key = (label, timeout)
    spec = _apply_specs.get(key)
    if spec is None:
        if len(_apply_specs) > 512:
            _apply_specs.clear()
        spec = _apply_specs[key] = JobSpec(kind=JobKind.APPLY, task_timeout=timeout,
                                           label=label)
    return spec


class ThreadPool(Pool):
    """A pool of worker threads with the ``Pool`` API (``multiprocessing.pool.ThreadPool``).

    Nothing is pickled. A thread cannot be killed: on ``task_timeout``, cancel or
    ``terminate()`` the thread is abandoned (replaced at once; it finishes its current
    call in the background and its result is dropped).
    """

    _backend_name = "threads"

    def __init__(self, processes: int | None = None,
                 initializer: Callable[..., Any] | None = None,
                 initargs: Iterable[Any] = (), *, task_timeout: float | None = None) -> None:
        super().__init__(processes, initializer, initargs, task_timeout=task_timeout)

    def _make_backend(self, processes: int, initializer: Any, initargs: tuple[Any, ...],
                      context: Any) -> Any:
        from ._backends.thread import ThreadBackend

        return ThreadBackend(processes, initializer, initargs)

