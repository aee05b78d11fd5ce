"""manyproc.futures.ProcessPoolExecutor: concurrent.futures, asyncio, and kill-on-cancel.

    python examples/pool_executor.py
"""

import asyncio
import time
from concurrent.futures import as_completed

from manyproc.futures import ProcessPoolExecutor


def cube(x):
    return x ** 3


def sleepy(seconds):
    time.sleep(seconds)
    return seconds


async def main(executor):
    loop = asyncio.get_running_loop()
    return await asyncio.gather(*(loop.run_in_executor(executor, cube, i) for i in range(5)))


if __name__ == "__main__":
    with ProcessPoolExecutor(max_workers=2, kill_on_cancel=True) as executor:
        futures = [executor.submit(cube, i) for i in range(10)]
        print(sorted(f.result() for f in as_completed(futures)))
        print(list(executor.map(cube, range(10), chunksize=4)))
        print(asyncio.run(main(executor)))
        stuck = executor.submit(sleepy, 60)
        time.sleep(0.5)
        print("cancelled a running call:", stuck.cancel())  # its worker is killed, replaced
        print(executor.submit(cube, 4).result())
