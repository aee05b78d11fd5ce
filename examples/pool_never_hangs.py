"""A worker that crashes fails only its own task; the pool replaces it and goes on.

    python examples/pool_never_hangs.py
"""

import os
import time

import manyproc
from manyproc.pool import Pool


def work(x):
    if x == 3:
        os._exit(1)  # a crash: segfault, OOM kill and kill -9 look the same to the pool
    if x == 5:
        time.sleep(60)  # stuck: task_timeout kills and replaces the worker
    return x * x


if __name__ == "__main__":
    with Pool(2) as pool:
        for x in range(8):
            try:
                print(x, "->", pool.apply(work, (x,), task_timeout=1.0))
            except manyproc.WorkerLostError as exc:
                print(x, "-> lost:", exc)
            except manyproc.TaskTimeoutError as exc:
                print(x, "-> timed out:", exc)
        stats = pool.statistics()
        print(f"{stats.tasks_done} tasks done, {stats.restarts} workers replaced")
