"""Worker pools: manyproc vs multiprocessing.Pool and concurrent.futures, side by side.

For each start method, in one run, interleaving the contenders round by round and
reporting medians (and ratios: manyproc / standard library, lower is better except
for speedups):

* ``create -> first result``: ``Pool(2)`` created, one ``apply`` answered, pool ended;
* ``apply round trip``: sequential ``apply_async(f, (x,)).get()`` on ``Pool(1)``, next to
  the floors it cannot beat: a raw ``os.pipe`` ping-pong between two processes and a
  pickled ``manyproc.connection`` ping-pong (pickling + pipe, no pool);
* ``submit round trip``: the same with ``ProcessPoolExecutor(1).submit(f, x).result()``;
* ``imap chunksize=1``: throughput of tiny tasks on ``Pool(2)``, per item;
* ``map 200k default``: ``Pool(2).map`` of 200,000 tiny tasks with default chunking;
* ``cpu speedup 2 vs 1``: a CPU-bound map on 2 workers vs 1 worker, next to two plain
  processes vs one (the machine's own limit).

    python benchmarks/pool_bench.py [--methods fork,spawn,forkserver] [--rounds 5] [--quick]

Goals (issue 4): apply round trip <= 1.5x the raw pipe ping-pong (reported against the
pickled ping-pong too, the real floor); imap >= 3x the stdlib's throughput; map >= the
stdlib's; CPU speedup >= 1.9x (or the machine's limit); creation <= the stdlib's.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import manyproc  # noqa: E402
from manyproc import connection as mp_connection  # noqa: E402
from manyproc.futures import ProcessPoolExecutor as MpExecutor  # noqa: E402
from manyproc.pool import Pool as MpPool  # noqa: E402


def identity(x):
    return x


def burn(n):
    total = 0
    for i in range(n):
        total += i * i
    return total


CPU_TASKS = 8
CPU_WORK = 300_000  # about 20-40 ms of Python per task


# --- floors -------------------------------------------------------------------------------


def raw_pipe_pingpong(n: int) -> float:
    """Microseconds per round trip of one byte between two processes over os.pipe."""
    a_r, a_w = os.pipe()
    b_r, b_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(a_w)
            os.close(b_r)
            while True:
                data = os.read(a_r, 64)
                if not data:
                    break
                os.write(b_w, data)
        finally:
            os._exit(0)
    os.close(a_r)
    os.close(b_w)
    for _ in range(200):
        os.write(a_w, b"x")
        os.read(b_r, 64)
    start = time.perf_counter()
    for _ in range(n):
        os.write(a_w, b"x")
        os.read(b_r, 64)
    elapsed = time.perf_counter() - start
    os.close(a_w)
    os.close(b_r)
    os.waitpid(pid, 0)
    return elapsed / n * 1e6


def pickled_pingpong(n: int) -> float:
    """The same with a pickled (task-like) message over a manyproc Connection."""
    parent, child = mp_connection.Pipe()
    pid = os.fork()
    if pid == 0:
        try:
            parent.close()
            while True:
                message = child.recv()
                child.send(message[1])
        except EOFError:
            pass
        finally:
            os._exit(0)
    child.close()
    for i in range(200):
        parent.send((7, i, (i,), {}))
        parent.recv()
    start = time.perf_counter()
    for i in range(n):
        parent.send((7, i, (i,), {}))
        parent.recv()
    elapsed = time.perf_counter() - start
    parent.close()
    os.waitpid(pid, 0)
    return elapsed / n * 1e6


def plain_process_speedup(ctx_name: str) -> float:
    """Two processes splitting CPU_TASKS tasks vs one process doing them all."""
    ctx = multiprocessing.get_context(ctx_name)

    def run(workers: int) -> float:
        per = CPU_TASKS // workers
        procs = [ctx.Process(target=_burn_many, args=(per,)) for _ in range(workers)]
        start = time.perf_counter()
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        return time.perf_counter() - start

    return run(1) / run(2)


def _burn_many(count: int) -> None:
    for _ in range(count):
        burn(CPU_WORK)


# --- contenders -------------------------------------------------------------------------------


def make_pool(kind: str, method: str, processes: int):
    if kind == "stdlib":
        return multiprocessing.get_context(method).Pool(processes)
    return MpPool(processes, context=manyproc.get_context(method))


def make_executor(kind: str, method: str, workers: int):
    if kind == "stdlib":
        return concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context(method))
    return MpExecutor(workers, mp_context=manyproc.get_context(method))


def bench_create(kind: str, method: str) -> float:
    start = time.perf_counter()
    pool = make_pool(kind, method, 2)
    pool.apply(identity, (1,))
    elapsed = time.perf_counter() - start
    pool.terminate()
    pool.join()
    return elapsed * 1e3


def bench_apply(pool, n: int) -> float:
    for i in range(100):
        pool.apply_async(identity, (i,)).get()
    start = time.perf_counter()
    for i in range(n):
        pool.apply_async(identity, (i,)).get()
    return (time.perf_counter() - start) / n * 1e6


def bench_submit(executor, n: int) -> float:
    for i in range(100):
        executor.submit(identity, i).result()
    start = time.perf_counter()
    for i in range(n):
        executor.submit(identity, i).result()
    return (time.perf_counter() - start) / n * 1e6


def bench_imap(pool, n: int) -> float:
    start = time.perf_counter()
    for _ in pool.imap(identity, range(n), chunksize=1):
        pass
    return (time.perf_counter() - start) / n * 1e6


def bench_map(pool, n: int) -> float:
    start = time.perf_counter()
    pool.map(identity, range(n))
    return (time.perf_counter() - start) * 1e3


def bench_cpu(pool) -> float:
    start = time.perf_counter()
    pool.map(burn, [CPU_WORK] * CPU_TASKS, chunksize=1)
    return time.perf_counter() - start


# --- running -------------------------------------------------------------------------------------


def interleaved(rounds: int, **contenders):
    """Run each contender once per round, in turn; return their medians."""
    results: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, run in contenders.items():
            results[name].append(run())
    return {name: statistics.median(values) for name, values in results.items()}


def with_pools(method: str, processes: int, rounds: int, measure) -> dict[str, float]:
    pools = {kind: make_pool(kind, method, processes) for kind in ("stdlib", "manyproc")}
    try:
        for pool in pools.values():
            pool.map(identity, range(100))  # warm up every worker
        return interleaved(rounds, **{k: (lambda p=p: measure(p)) for k, p in pools.items()})
    finally:
        for pool in pools.values():
            pool.terminate()
            pool.join()


def with_executors(method: str, rounds: int, measure) -> dict[str, float]:
    executors = {kind: make_executor(kind, method, 1) for kind in ("stdlib", "manyproc")}
    try:
        return interleaved(rounds, **{k: (lambda e=e: measure(e)) for k, e in executors.items()})
    finally:
        for executor in executors.values():
            executor.shutdown()


def row(name: str, unit: str, std: float, mine: float, goal: str, note: str = "") -> str:
    ratio = mine / std if std else float("nan")
    return (f"  {name:<26} {std:>10.2f} {mine:>10.2f} {unit:<5} {ratio:>7.2f}x  "
            f"{goal:<22} {note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default=",".join(manyproc.get_all_start_methods()))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="fewer tasks per measurement")
    args = parser.parse_args(argv)
    scale = 0.25 if args.quick else 1.0
    n_apply = int(2000 * scale)
    n_imap = int(20000 * scale)
    n_map = 200_000
    rounds = args.rounds

    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs "
          f"(usable {manyproc._os.cpus.usable_cpu_count()}), medians of {rounds} rounds; "
          "ratio = manyproc / stdlib")
    floors = interleaved(rounds, raw=lambda: raw_pipe_pingpong(n_apply * 2),
                         pickled=lambda: pickled_pingpong(n_apply * 2))
    print(f"floors: raw os.pipe ping-pong {floors['raw']:.1f} us, pickled Connection "
          f"ping-pong {floors['pickled']:.1f} us per round trip")
    for method in args.methods.split(","):
        print(f"\n[{method}]  {'benchmark':<26} {'stdlib':>10} {'manyproc':>10} {'':<5} "
              f"{'ratio':>8}  {'goal':<22} note")
        create = interleaved(rounds, stdlib=lambda m=method: bench_create("stdlib", m),
                             manyproc=lambda m=method: bench_create("manyproc", m))
        print(row("create -> first result", "ms", create["stdlib"], create["manyproc"],
                  "<= 1.0x"))
        apply = with_pools(method, 1, rounds, lambda p: bench_apply(p, n_apply))
        print(row("apply round trip", "us", apply["stdlib"], apply["manyproc"],
                  f"<= {1.5 * floors['raw']:.0f} us (1.5x raw)",
                  f"{apply['manyproc'] / floors['raw']:.2f}x raw, "
                  f"{apply['manyproc'] / floors['pickled']:.2f}x pickled"))
        submit = with_executors(method, rounds, lambda e: bench_submit(e, n_apply))
        print(row("submit round trip", "us", submit["stdlib"], submit["manyproc"],
                  "lower", f"{submit['manyproc'] / floors['raw']:.2f}x raw"))
        imap = with_pools(method, 2, rounds, lambda p: bench_imap(p, n_imap))
        print(row("imap chunksize=1", "us/it", imap["stdlib"], imap["manyproc"],
                  "<= 0.33x (3x faster)",
                  f"{imap['stdlib'] / imap['manyproc']:.2f}x the stdlib's throughput"))
        big = with_pools(method, 2, rounds, lambda p: bench_map(p, n_map))
        print(row("map 200k default", "ms", big["stdlib"], big["manyproc"], "<= 1.0x"))
        one = with_pools(method, 1, max(3, rounds // 2), bench_cpu)
        two = with_pools(method, 2, max(3, rounds // 2), bench_cpu)
        limit = plain_process_speedup(method)
        std_speedup = one["stdlib"] / two["stdlib"]
        mine_speedup = one["manyproc"] / two["manyproc"]
        print(f"  {'cpu speedup 2 vs 1':<26} {std_speedup:>10.2f} {mine_speedup:>10.2f} "
              f"{'x':<5} {'':>8}  {'>= 1.9x':<22} plain processes: {limit:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
