"""Share a dict, a list and a lock between processes through a manager.

    python examples/manager_shared_state.py

Each worker records its result in a shared dict and appends to a shared list;
the manager's server process holds the real objects, the workers get proxies.
"""

from __future__ import annotations

import os

import manyproc as mp


def work(n: int, results, log, lock) -> None:
    value = n * n
    results[n] = value
    with lock:  # a lock held in the manager, shared by every worker
        log.append(f"worker {os.getpid()} squared {n}")


if __name__ == "__main__":
    with mp.Manager() as manager:
        results = manager.dict()
        log = manager.list()
        lock = manager.Lock()
        workers = [mp.Process(target=work, args=(n, results, log, lock)) for n in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        print("results:", dict(sorted(results.items())))
        print("\n".join(sorted(log)))
