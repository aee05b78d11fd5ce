"""``concurrent.futures`` executors on manyproc's pool core.

``ProcessPoolExecutor`` is a drop-in for ``concurrent.futures.ProcessPoolExecutor``:
same constructor, ``submit``, ``map(timeout, chunksize, buffersize)``,
``shutdown(wait, cancel_futures)``, and it returns real ``concurrent.futures.Future``
objects, so ``as_completed``, ``wait``, ``asyncio.wrap_future`` and
``loop.run_in_executor`` work unchanged. What differs is what goes wrong:

* a worker that dies (SIGKILL, segfault, ``os._exit``, out of memory) fails only the
  future it was running, with :class:`manyproc.WorkerLostError`; the worker is
  replaced and the executor goes on (the standard one breaks for good);
* ``task_timeout=`` (keyword-only, on the executor; seconds per call or per map item):
  a call that runs longer fails with :class:`manyproc.TaskTimeoutError` and its worker
  is killed and replaced;
* ``kill_on_cancel=True`` (keyword-only): ``future.cancel()`` on a *running* future
  kills its worker (replaced at once) and returns True. By default ``cancel()`` keeps
  the standard meaning: a running future cannot be cancelled (False);
* an initializer that raises breaks the executor, as in the standard library, with
  :class:`manyproc.pool.BrokenPoolError` (a ``concurrent.futures.BrokenExecutor``)
  chained to the initializer's error;
* ``map(..., progress=True)`` shows a progress bar; functions defined by value
  (lambdas, closures, ``__main__`` of a notebook) work.

``backend="dask"`` (keyword-only) runs the calls on a Dask cluster with the same
semantics and the same ``PoolFuture`` type (see ``manyproc._backends.dask``).

``ThreadPoolExecutor`` is the same on threads (nothing is pickled; timeouts and
kill-on-cancel abandon the thread instead of killing it).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Executor, Future
from concurrent.futures import TimeoutError as FuturesTimeoutError
from concurrent.futures._base import (
    CANCELLED,
    CANCELLED_AND_NOTIFIED,
    FINISHED,
)
from typing import Any

from . import util
from ._backends import worker as _wire
from ._backends.base import JobRecord
from ._backends.driver import Driver
from ._errors import TaskTimeoutError
from ._errors import TimeoutError as _PoolTimeoutError
from ._os.cpus import usable_cpu_count
from ._poolcore import CancelMode, JobKind, JobSpec, PoolConfig
from ._progress import make_bar
from .pool import (
    _REMOTE_BACKENDS,
    BATCH_LIMIT,
    DEEP_PREFETCH,
    PREFETCH,
    IMapIterator,
    _apply_spec,
    _check_backend,
    _check_memory_limit,
    _check_timeout,
    _label,
    _open_remote_backend,
    _StreamSink,
)

__all__ = ["ProcessPoolExecutor", "ThreadPoolExecutor", "PoolFuture"]


class PoolFuture(Future[Any]):
    """A ``concurrent.futures.Future`` whose work runs in a manyproc executor.

    ``result()`` and ``exception()`` read the workers' answers in the waiting thread
    itself when no other thread does (no hand-off between threads); ``cancel()`` asks
    the executor, which kills a running call's worker if it was created with
    ``kill_on_cancel=True``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._mp_driver: Driver | None = None
        self._mp_record: _FutureRecord | None = None
        self._mp_kill = False

    def cancel(self) -> bool:
        """Cancel the call; see the class docstring for running calls.

        Returns:
            True if the future is now cancelled.
        """
        record, driver = self._mp_record, self._mp_driver
        if record is None or driver is None or record.settled:
            return super().cancel()
        if self.done():
            return self.cancelled()
        mode = CancelMode.KILL if self._mp_kill else CancelMode.PENDING_ONLY
        if not driver.cancel(record.job_id, mode):
            return False
        return self.cancelled()

    def _mp_wait(self, timeout: float | None) -> None:
        record, driver = self._mp_record, self._mp_driver
        if record is None or driver is None or record.settled:
            return
        try:
            driver.wait_until(lambda: record.settled, timeout)
        except KeyboardInterrupt:
            driver.interrupt()
            raise

    def result(self, timeout: float | None = None) -> Any:
        if not self.done():
            self._mp_wait(timeout)
            if not self.done():
                timeout = 0
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if not self.done():
            self._mp_wait(timeout)
            if not self.done():
                timeout = 0
        return super().exception(timeout)

    def _mp_force_cancel(self) -> None:
        """Cancel even if running (its worker was killed): state, waiters, callbacks."""
        with self._condition:
            if self._state in (FINISHED, CANCELLED, CANCELLED_AND_NOTIFIED):
                return
            self._state = CANCELLED
            self._condition.notify_all()
        self._invoke_callbacks()  # type: ignore[attr-defined]
        self.set_running_or_notify_cancel()  # tells as_completed()/wait() waiters


class _FutureRecord(JobRecord):
    """The driver's side of one submitted call."""

    def __init__(self, future: PoolFuture, func: Any) -> None:
        super().__init__(func, _wire.CALL_APPLY, _label(func), "apply")
        self.future = future
        self.settled = False
        self.wants_start = True

    def on_start(self) -> None:
        self.future.set_running_or_notify_cancel()

    def on_resolve(self, ok: bool, cancelled: bool, value: Any,
                   error: BaseException | None) -> Any:
        future = self.future

        def settle() -> None:
            try:
                if ok:
                    future.set_result(value)
                elif cancelled:
                    future._mp_force_cancel()
                else:
                    future.set_exception(error)
            finally:
                self.settled = True
                future._mp_record = None  # drop the function and job data with it

        return settle


def _finalize_executor(driver: Driver) -> None:
    """At exit or when collected: finish the pending work, as the standard library does."""
    if util.is_exiting():
        driver.close()
        driver.join()
    else:
        driver.close_soon()  # the background thread finishes the work, as in the stdlib


class ProcessPoolExecutor(Executor):
    """An executor running calls in worker processes (``concurrent.futures`` API).

    Args:
        max_workers: most worker processes (started as work arrives); ``None`` uses the
            CPUs this process may really use.
        mp_context: the context whose start method starts the workers.
        initializer: called as ``initializer(*initargs)`` in each worker when it starts;
            if it raises, the executor is broken (``BrokenPoolError``).
        initargs: arguments of the initializer.
        max_tasks_per_child: calls a worker runs before it is replaced.
        task_timeout: keyword-only; seconds a call (or a map item) may run before its
            worker is killed and the future fails with ``TaskTimeoutError``.
        kill_on_cancel: keyword-only; ``cancel()`` on a running future kills its worker.
        max_memory_per_child: keyword-only; bytes of resident memory after which a worker
            is replaced once its current task is done (see ``manyproc.Pool``).
        backend: keyword-only; ``"processes"`` (the default), ``"threads"`` or ``"dask"``
            (calls run on a Dask cluster with the same semantics; ``max_workers=None``
            then means the cluster's threads). See ``manyproc.Pool``.
        backend_options: keyword-only; for ``"dask"``: ``client``, ``address``,
            ``cluster_options``, ``submit_options`` (see ``manyproc.Pool``).

    Raises:
        ValueError: ``max_workers`` < 1 or ``max_tasks_per_child`` < 1, or an unknown
            ``backend`` (the message lists the valid ones).
        TypeError: ``initializer`` is not callable, or ``backend_options`` holds a key the
            backend does not support (the message names it).
    """

    _thread_name = "ProcessPoolExecutor"
    _backend_name = "processes"

    def __init__(self, max_workers: int | None = None, mp_context: Any = None,
                 initializer: Callable[..., Any] | None = None, initargs: tuple[Any, ...] = (),
                 *, max_tasks_per_child: int | None = None, task_timeout: float | None = None,
                 kill_on_cancel: bool = False, backend: str | None = None,
                 backend_options: Mapping[str, Any] | None = None,
                 max_memory_per_child: int | None = None) -> None:
        kind = _check_backend(self._backend_name if backend is None else backend,
                              backend_options, context=mp_context, maxtasks=max_tasks_per_child)
        self._backend_kind = kind
        self._memory_limit = _check_memory_limit(max_memory_per_child, kind)
        if max_workers is None:
            if kind not in _REMOTE_BACKENDS:
                max_workers = self._default_workers()
        elif isinstance(max_workers, bool) or not isinstance(max_workers, int):
            raise TypeError(f"max_workers must be an int or None, not {max_workers!r}")
        elif max_workers <= 0:
            raise ValueError(f"max_workers must be greater than 0, got {max_workers}")
        if initializer is not None and not callable(initializer):
            raise TypeError(f"initializer must be a callable, not {initializer!r}")
        if max_tasks_per_child is not None:
            if isinstance(max_tasks_per_child, bool) or not isinstance(max_tasks_per_child, int):
                raise TypeError(f"max_tasks_per_child must be an integer, not "
                                f"{max_tasks_per_child!r}")
            if max_tasks_per_child <= 0:
                raise ValueError(f"max_tasks_per_child must be >= 1, got {max_tasks_per_child}")
        self._max_tasks = max_tasks_per_child
        self._task_timeout = _check_timeout(task_timeout)
        self._kill_on_cancel = bool(kill_on_cancel)
        self._shutdown_lock = threading.Lock()
        self._shutdown_thread = False
        if kind in _REMOTE_BACKENDS:
            backend_obj = _open_remote_backend(kind, max_workers, initializer, tuple(initargs),
                                               backend_options)
            max_workers = backend_obj.processes
        else:
            assert max_workers is not None
            backend_obj = self._make_backend(max_workers, initializer, tuple(initargs), mp_context)
        assert max_workers is not None
        self._max_workers: int = max_workers
        self._functions = getattr(backend_obj, "functions", None)
        self._batch_limit: int = getattr(backend_obj, "batch_limit", BATCH_LIMIT)
        config = PoolConfig(**{"processes": max_workers,
                               "maxtasksperchild": max_tasks_per_child,
                               "prefetch": PREFETCH, "deep_prefetch": DEEP_PREFETCH,
                               "eager_spawn": False, "max_start_failures": 1,
                               **getattr(backend_obj, "pool_config", {})})
        self._driver = Driver(backend_obj, config, name=f"{self._thread_name}-{id(self):x}")
        self._driver.start()
        self._finalizer = util.Finalize(self, _finalize_executor, (self._driver,),
                                        exitpriority=15)

    @staticmethod
    def _default_workers() -> int:
        return usable_cpu_count()

    def _make_backend(self, workers: int, initializer: Any, initargs: tuple[Any, ...],
                      context: Any) -> Any:
        if self._backend_kind == "threads":
            from ._backends.thread import ThreadBackend

            return ThreadBackend(workers, initializer, initargs)
        from ._backends.local import ProcessBackend

        if context is None:
            from . import context as _context

            context = _context._default_context.get_context()
        return ProcessBackend(context, workers, initializer, initargs,
                              memory_limit=self._memory_limit)

    def _check_open(self) -> None:
        driver = self._driver
        with driver.lock:
            broken = driver.core.broken_error()
        if broken is not None:
            raise broken
        if self._shutdown_thread:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if util.is_exiting():
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    def submit(self, fn: Callable[..., Any], /, *args: Any,
               **kwargs: Any) -> Future[Any]:
        """Schedule ``fn(*args, **kwargs)``; return a ``Future`` for its result.

        Raises:
            RuntimeError: the executor was shut down.
            BrokenPoolError: workers could not start (e.g. the initializer raised).
            TypeError: ``fn`` is not callable.
        """
        if not callable(fn):
            raise TypeError(f"submit() needs a function as its first argument, got {fn!r} "
                            f"({type(fn).__name__}); pass the function and its arguments "
                            "separately: submit(f, x), not submit(f(x))")
        with self._shutdown_lock:
            self._check_open()
            future = PoolFuture()
            record = _FutureRecord(future, fn)
            try:
                if self._functions is not None:
                    self._functions.prepare(record)
            except Exception as exc:  # noqa: BLE001 - the future carries it, as in the stdlib
                future.set_exception(exc)
                return future
            future._mp_driver = self._driver
            future._mp_record = record
            future._mp_kill = self._kill_on_cancel
            self._driver.submit(record, _apply_spec(record.label, self._task_timeout),
                                ((args, kwargs),))
        return future

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any],
            timeout: float | None = None, chunksize: int = 1, buffersize: int | None = None,
            progress: Any = False, task_timeout: float | None = None) -> Iterator[Any]:
        """Return an iterator over ``fn(*args)`` for args taken from ``iterables`` in step.

        Without ``buffersize`` the input is read at once (as the standard library
        does); with it, at most about ``buffersize`` items are in flight and input is
        read as results are consumed. Results come in input order. ``progress`` shows a
        bar; ``task_timeout`` (seconds per item) overrides the executor's.

        Raises:
            TimeoutError: (when iterating) a result is not ready ``timeout`` seconds
                after the call to ``map``.
        """
        if not callable(fn):
            raise TypeError(f"map() needs a function as its first argument, got {fn!r}")
        if isinstance(chunksize, bool) or not isinstance(chunksize, int):
            raise TypeError(f"chunksize must be an int >= 1, not {chunksize!r}")
        if chunksize < 1:
            raise ValueError(f"chunksize must be >= 1, got {chunksize}")
        if buffersize is not None:
            if isinstance(buffersize, bool) or not isinstance(buffersize, int):
                raise TypeError(f"buffersize must be an integer or None, got {buffersize!r}")
            if buffersize < 1:
                raise ValueError(f"buffersize must be None or > 0, got {buffersize}")
        item_timeout = (self._task_timeout if task_timeout is None
                        else _check_timeout(task_timeout))
        end_time = None if timeout is None else timeout + time.monotonic()
        with self._shutdown_lock:
            self._check_open()
            source: Iterator[Any] | None = None
            items: Any = ()
            if buffersize is None:
                items = list(zip(*iterables))  # noqa: B905 - the stdlib stops at the shortest
                length: int | None = len(items)
            else:
                source = zip(*iterables)  # noqa: B905 - the stdlib stops at the shortest
                length = None
            bar = make_bar(progress, length, _label(fn))
            batch = self._batch_limit if chunksize == 1 and self._max_tasks is None else None
            call = _wire.CALL_STAR_EACH if batch else _wire.CALL_STAR
            sink = _StreamSink(self._driver, fn, call, "map", bar, acks=buffersize is not None)
            iterator = IMapIterator(sink)
            if self._functions is not None:
                self._functions.prepare(sink)
            window = None if buffersize is None else max(1, -(-buffersize // chunksize))
            spec = JobSpec(kind=JobKind.IMAP, chunksize=chunksize,
                           task_timeout=item_timeout, max_in_flight=window,
                           ack_consumption=buffersize is not None, progress=bar is not None,
                           length_hint=length, label=sink.label, batch_limit=batch)
            if source is None:
                self._driver.submit(sink, spec, items)
            else:
                self._driver.submit(sink, spec, (), exhausted=False, source=source)
        return _results(iterator, end_time)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Accept no more work; finish (or, with ``cancel_futures``, cancel) the pending
        calls; with ``wait``, return once every worker has exited."""
        with self._shutdown_lock:
            self._shutdown_thread = True
        self._driver.close(cancel_pending=cancel_futures)
        if wait:
            try:
                self._driver.join()
            except KeyboardInterrupt:
                self._driver.interrupt()
                raise

    def statistics(self) -> Any:
        """A snapshot of the workers and tasks (see ``manyproc.pool.PoolStatistics``)."""
        from .pool import _statistics

        return _statistics(self._driver.statistics(), None)


def _results(iterator: IMapIterator, end_time: float | None) -> Iterator[Any]:
    """The generator ``Executor.map`` returns; closing it drops the rest of the job."""
    try:
        while True:
            remaining = None if end_time is None else end_time - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise FuturesTimeoutError()
            try:
                value = iterator.next(remaining)
            except StopIteration:
                return
            except TaskTimeoutError:
                raise  # an item ran past task_timeout: that is its result
            except _PoolTimeoutError:
                raise FuturesTimeoutError() from None  # the wait ran past map(timeout=)
            yield value
    finally:
        iterator.close()


class ThreadPoolExecutor(ProcessPoolExecutor):
    """An executor running calls in worker threads, with manyproc's timeouts and stats.

    Args:
        max_workers: most worker threads (default ``min(32, cpus + 4)``).
        thread_name_prefix: accepted for compatibility; threads are named
            ``ThreadPoolWorker-N``.
        initializer, initargs: as for ``ProcessPoolExecutor``.
        task_timeout, kill_on_cancel: as for ``ProcessPoolExecutor``, except that a
            thread cannot be killed: it is abandoned and replaced.
    """

    _thread_name = "ThreadPoolExecutor"
    _backend_name = "threads"

    def __init__(self, max_workers: int | None = None, thread_name_prefix: str = "",
                 initializer: Callable[..., Any] | None = None, initargs: tuple[Any, ...] = (),
                 *, task_timeout: float | None = None, kill_on_cancel: bool = False) -> None:
        super().__init__(max_workers, None, initializer, initargs, task_timeout=task_timeout,
                         kill_on_cancel=kill_on_cancel)

    @staticmethod
    def _default_workers() -> int:
        return min(32, usable_cpu_count() + 4)

    def _make_backend(self, workers: int, initializer: Any, initargs: tuple[Any, ...],
                      context: Any) -> Any:
        from ._backends.thread import ThreadBackend

        return ThreadBackend(workers, initializer, initargs)
