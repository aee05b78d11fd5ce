"""Process start-to-exit time per start method: manyproc vs the standard library.

Each round starts a process whose target does nothing and joins it; variants are
interleaved so machine noise hits both libraries alike.  Prints medians (ms) and
the manyproc/stdlib ratio (lower is better).

    python benchmarks/process_bench.py [--rounds 15]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import manyproc  # noqa: E402


def noop() -> None:
    pass


def start_and_join(lib, method: str) -> float:
    ctx = lib.get_context(method)
    start = time.perf_counter()
    p = ctx.Process(target=noop)
    p.start()
    p.join()
    elapsed = time.perf_counter() - start
    assert p.exitcode == 0
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    libs = {"manyproc": manyproc, "stdlib": multiprocessing}
    print(f"{'start method':<12} {'manyproc ms':>12} {'stdlib ms':>10} {'ratio':>7}")
    for method in ("fork", "spawn", "forkserver"):
        for lib in libs.values():  # warm-up: the fork server starts on first use
            start_and_join(lib, method)
        times: dict[str, list[float]] = {name: [] for name in libs}
        for _ in range(args.rounds):
            for name, lib in libs.items():
                times[name].append(start_and_join(lib, method))
        ours = statistics.median(times["manyproc"]) * 1e3
        theirs = statistics.median(times["stdlib"]) * 1e3
        print(f"{method:<12} {ours:>12.2f} {theirs:>10.2f} {ours / theirs:>7.2f}")


if __name__ == "__main__":
    main()
