"""A progress bar on a long map, lazy imap input, and the pool's statistics.

    python examples/pool_progress_and_stats.py
"""

import time

from manyproc.pool import Pool


def slow_square(x):
    time.sleep(0.01)
    return x * x


def numbers():
    yield from range(200)  # read lazily, a bounded number of tasks ahead


if __name__ == "__main__":
    with Pool() as pool:
        total = sum(pool.map(slow_square, range(400), progress=True))
        print("sum of squares:", total)
        for _value in pool.imap(slow_square, numbers(), progress={"desc": "imap"}):
            pass
        stats = pool.statistics()
        print(f"CPUs used: {stats.cpu_budget.count} (machine: {stats.cpu_budget.machine})")
        for worker in stats.workers:
            print(f"  worker {worker.slot}: pid {worker.pid}, {worker.items_done} items, "
                  f"busy {worker.busy_time:.2f} s")
