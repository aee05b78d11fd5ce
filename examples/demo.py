"""A tour in a few seconds: a process, a pool with a lambda, a crash and a hang that don't hang.

    make demo        (or: python examples/demo.py)
"""

import os
import time

import manyproc as mp


def hello(name):
    print("Hello", name, "from", mp.current_process().name)


def risky(x):
    if x == 3:
        os._exit(1)  # a worker crash: the standard library's Pool would wait for ever
    if x == 5:
        time.sleep(60)  # a stuck task: task_timeout kills and replaces its worker
    return x * x


if __name__ == "__main__":
    p = mp.Process(target=hello, args=("Alice",))
    p.start()
    p.join()
    print("exit code", p.exitcode)

    with mp.Pool(2) as pool:
        offset = 10
        print("a lambda in a pool:", pool.map(lambda x: x + offset, range(5)))
        for x in range(7):
            try:
                print(f"risky({x}) =", pool.apply(risky, (x,), task_timeout=1.0))
            except mp.WorkerLostError as exc:
                print(f"risky({x}) lost its worker: {exc}")
            except mp.TaskTimeoutError as exc:
                print(f"risky({x}) timed out: {exc}")
        stats = pool.statistics()
        print(f"the pool goes on: {stats.tasks_done} tasks done, {stats.restarts} workers "
              "replaced")
