"""The same Pool and executor API on a Dask cluster: backend="dask".

Needs ``pip install 'manyproc[dask]'``. Without ``backend_options`` the pool starts a
``distributed.LocalCluster`` (one single-threaded worker process per pool slot) and
closes it with the pool; pass ``backend_options={"client": client}`` (or
``{"address": "tcp://scheduler:8786"}``) to use a cluster you already have. The Dask
workers must be able to import manyproc (they can when they share this environment).

What manyproc adds on top of Dask, shown below: a per-task timeout that really stops the
stuck task (its worker process is killed and the nanny restarts it), a worker that dies
failing only its own task (Dask is not allowed to run it again), exceptions that come
back as themselves with the worker's traceback, lazy ``imap`` over an endless input.
"""

import itertools
import os
import signal
import time
from concurrent.futures import as_completed

import manyproc
from manyproc.futures import ProcessPoolExecutor
from manyproc.pool import Pool


def crash():
    os.kill(os.getpid(), signal.SIGKILL)  # the Dask worker process dies mid-task


def main():
    started = time.monotonic()
    with Pool(2, backend="dask") as pool:
        scale = 3
        print("map with a closure:", pool.map(lambda x: x * scale, range(8)))
        squares = pool.imap(lambda x: x * x, itertools.count())
        print("imap over an endless input, first 5:", list(itertools.islice(squares, 5)))
        squares.close()  # drop the rest (input is read only a bounded way ahead)

        try:
            pool.apply(lambda: {}["missing"])
        except KeyError as exc:
            print("the task's own exception came back:", repr(exc))
            print("  with the worker's traceback as its cause:",
                  type(exc.__cause__).__name__)

        try:
            pool.apply(time.sleep, (60,), task_timeout=0.5)
        except manyproc.TaskTimeoutError as exc:
            print("a stuck task was stopped:", str(exc).split(";")[0])

        try:
            pool.apply(crash)
        except manyproc.WorkerLostError as exc:
            print("a dead worker failed only its task:", str(exc).split(" was lost")[0], "was lost")

        print("and the pool goes on:", pool.map(abs, [-1, -2, -3]))
        stats = pool.statistics()
        print(f"statistics: {stats.tasks_done} tasks done, {stats.tasks_timed_out} timed out, "
              f"{stats.workers_lost} worker lost, {stats.restarts} restarts")

    with ProcessPoolExecutor(2, backend="dask") as executor:
        futures = [executor.submit(pow, 2, n) for n in range(6)]
        print("executor:", sorted(f.result() for f in as_completed(futures)))
    print(f"done in {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()
