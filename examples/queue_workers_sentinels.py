"""Workers fed by a queue, stopped with one sentinel (None) each.

Run it:  python examples/queue_workers_sentinels.py
"""
import manyproc as mp


def worker(tasks, results):
    name = mp.current_process().name
    # iter(get, None) keeps taking tasks until it meets the sentinel.
    for n in iter(tasks.get, None):
        results.put((n, n * n, name))


if __name__ == "__main__":
    tasks, results = mp.Queue(), mp.Queue()
    workers = [mp.Process(target=worker, args=(tasks, results)) for _ in range(3)]
    for w in workers:
        w.start()

    for n in range(20):
        tasks.put(n)
    for _ in workers:
        tasks.put(None)  # one sentinel per worker

    # Read every result *before* joining: a worker cannot exit while its results
    # are still waiting in the pipe.
    squares = sorted(results.get(timeout=30) for _ in range(20))
    for w in workers:
        w.join()

    print("squares:", [sq for _, sq, _ in squares])
    print("workers used:", sorted({name for _, _, name in squares}))
    print("exit codes:", [w.exitcode for w in workers])
