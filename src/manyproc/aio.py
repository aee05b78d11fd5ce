"""asyncio face: await work running in worker processes; cancelling the await kills it.

::

    import manyproc.aio

    async def main():
        async with manyproc.aio.AsyncPool(4, task_timeout=30) as pool:
            print(await pool.apply(sum, [1, 2, 3]))
            print(await pool.map(str.upper, ["a", "b"]))
            async for value in pool.imap(slow, range(100)):   # lazy, bounded
                ...

``AsyncPool`` sits on :class:`manyproc.futures.ProcessPoolExecutor` created with
``kill_on_cancel=True``: when the awaiting task is cancelled (``asyncio.wait_for``
timing out, a ``TaskGroup`` failing, Ctrl-C), the calls it was waiting for are
cancelled too, and a call already running has its worker killed and replaced.
The event loop never blocks: results arrive through ``asyncio.wrap_future``.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from .futures import ProcessPoolExecutor

__all__ = ["AsyncPool"]


def _call_chunk(fn: Callable[..., Any], items: list[Any], star: bool) -> list[Any]:
    """Run ``fn`` over a chunk of items in a worker."""
    if star:
        return [fn(*item) for item in items]
    return [fn(item) for item in items]


class AsyncPool:
    """A pool of worker processes for asyncio code.

    Args:
        processes: number of workers (``None``: the CPUs this process may use).
        mp_context: a manyproc context choosing the start method.
        initializer, initargs: run in each worker as it starts.
        max_tasks_per_child: calls a worker runs before it is replaced.
        task_timeout: seconds a call (or chunk item) may run; past it the call fails with
            ``manyproc.TaskTimeoutError`` and its worker is replaced.
    """

    def __init__(self, processes: int | None = None, *, mp_context: Any = None,
                 initializer: Callable[..., Any] | None = None, initargs: tuple[Any, ...] = (),
                 max_tasks_per_child: int | None = None,
                 task_timeout: float | None = None) -> None:
        self._executor = ProcessPoolExecutor(
            processes, mp_context, initializer, initargs,
            max_tasks_per_child=max_tasks_per_child, task_timeout=task_timeout,
            kill_on_cancel=True)
        self._workers = self._executor._max_workers

    async def apply(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` in a worker and return its result.

        Raises:
            whatever ``fn`` raised (with the worker's traceback as its cause),
            ``manyproc.WorkerLostError`` if the worker died, ``TaskTimeoutError``.
        """
        return await asyncio.wrap_future(self._executor.submit(fn, *args, **kwargs))

    async def map(self, fn: Callable[..., Any], iterable: Iterable[Any], *,
                  chunksize: int = 1) -> list[Any]:
        """``[fn(x) for x in iterable]`` computed by the workers, in order."""
        return [value async for value in self.imap(fn, iterable, chunksize=chunksize)]

    async def starmap(self, fn: Callable[..., Any], iterable: Iterable[Iterable[Any]], *,
                      chunksize: int = 1) -> list[Any]:
        """``[fn(*args) for args in iterable]`` computed by the workers, in order."""
        return [value async for value in self._stream(fn, iterable, chunksize, True, True)]

    def imap(self, fn: Callable[..., Any], iterable: Iterable[Any], *,
             chunksize: int = 1) -> AsyncIterator[Any]:
        """Results of ``fn`` over ``iterable`` in input order, reading the input lazily."""
        return self._stream(fn, iterable, chunksize, False, True)

    def imap_unordered(self, fn: Callable[..., Any], iterable: Iterable[Any], *,
                       chunksize: int = 1) -> AsyncIterator[Any]:
        """Results of ``fn`` over ``iterable`` as they complete."""
        return self._stream(fn, iterable, chunksize, False, False)

    async def _stream(self, fn: Callable[..., Any], iterable: Iterable[Any], chunksize: int,
                      star: bool, ordered: bool) -> AsyncIterator[Any]:
        if not callable(fn):
            raise TypeError(f"the function to map must be callable, got {fn!r}")
        if isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError(f"chunksize must be an int >= 1, got {chunksize!r}")
        source = iter(iterable)
        window = 2 * self._workers
        pending: deque[asyncio.Future[list[Any]]] = deque()

        def submit_next() -> bool:
            chunk = list(itertools.islice(source, chunksize))
            if not chunk:
                return False
            pending.append(asyncio.wrap_future(
                self._executor.submit(_call_chunk, fn, chunk, star)))
            return True

        try:
            while len(pending) < window and submit_next():
                pass
            while pending:
                if ordered:
                    done_future = pending[0]
                    values = await done_future
                    pending.popleft()
                else:
                    finished, _ = await asyncio.wait(pending,
                                                     return_when=asyncio.FIRST_COMPLETED)
                    done_future = finished.pop()
                    pending.remove(done_future)
                    values = done_future.result()
                submit_next()
                for value in values:
                    yield value
        finally:
            for future in pending:  # cancelled or abandoned: stop the work still out
                future.cancel()

    async def close(self, *, cancel_pending: bool = False) -> None:
        """Accept no more work and wait (without blocking the loop) for the workers to exit."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(
            None, lambda: self._executor.shutdown(wait=True, cancel_futures=cancel_pending))

    def statistics(self) -> Any:
        """Worker statistics (see ``manyproc.pool.PoolStatistics``)."""
        return self._executor.statistics()

    async def __aenter__(self) -> AsyncPool:
        return self

    async def __aexit__(self, exc_type: Any, *exc: Any) -> None:
        await self.close(cancel_pending=exc_type is not None)
