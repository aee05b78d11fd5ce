"""The asyncio face: awaiting worker processes, and cancellation that reaches them."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

import manyproc
from manyproc.aio import AsyncPool

pytestmark = pytest.mark.timeout(90)


def square(x):
    return x * x


def slow_pid(seconds):
    time.sleep(seconds)
    return os.getpid()


def boom(x):
    raise ValueError(f"bad {x}")


def test_apply_map_imap(ctx):
    async def main():
        async with AsyncPool(2, mp_context=ctx) as pool:
            assert await pool.apply(square, 7) == 49
            assert await pool.map(square, range(10), chunksize=3) == [x * x for x in range(10)]
            assert await pool.starmap(pow, [(2, 3), (3, 2)]) == [8, 9]
            got = [v async for v in pool.imap(square, iter(range(20)))]
            assert got == [x * x for x in range(20)]
            unordered = [v async for v in pool.imap_unordered(square, range(20), chunksize=4)]
            assert sorted(unordered) == [x * x for x in range(20)]
            assert await pool.apply(lambda: "by value") == "by value"

    asyncio.run(main())


def test_errors_come_back_as_their_own_type():
    async def main():
        async with AsyncPool(1) as pool:
            with pytest.raises(ValueError, match="bad 3"):
                await pool.apply(boom, 3)
            with pytest.raises(ValueError, match="bad"):
                await pool.map(boom, [1])

    asyncio.run(main())


def test_cancelling_the_await_kills_the_running_call():
    async def main():
        async with AsyncPool(1) as pool:
            first_pid = await pool.apply(os.getpid)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(pool.apply(slow_pid, 30), timeout=0.5)
            started = time.monotonic()
            second_pid = await pool.apply(os.getpid)
            assert time.monotonic() - started < 10  # not stuck behind the 30 s call
            assert second_pid != first_pid  # the worker running it was replaced
            stats = pool.statistics()
            assert stats is not None

    asyncio.run(main())


def test_task_timeout():
    async def main():
        async with AsyncPool(1, task_timeout=0.5) as pool:
            with pytest.raises(manyproc.TaskTimeoutError):
                await pool.apply(slow_pid, 30)
            assert await pool.apply(square, 3) == 9

    asyncio.run(main())


def test_bad_arguments():
    async def main():
        async with AsyncPool(1) as pool:
            with pytest.raises(TypeError, match="callable"):
                await pool.map(42, [1])
            with pytest.raises(ValueError, match="chunksize"):
                await pool.map(square, [1], chunksize=0)

    asyncio.run(main())
