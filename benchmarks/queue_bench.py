"""Queue throughput: manyproc vs the standard library, small messages and 1 MB payloads.

A producer child (started with each library's own fork context) waits for a
"go" byte, then puts ``N`` items and ends; the parent starts the clock at "go"
and stops it at the last ``get``.  Variants run interleaved, ``ROUNDS`` times
each; the table shows medians and the manyproc/stdlib ratio (higher is better).

    python benchmarks/queue_bench.py [--rounds 7] [--small 20000] [--big 150]

Goals: manyproc >= stdlib for small messages (msg/s) and for 1 MB payloads (MB/s).
manyproc pickles in ``put`` (so errors surface in the caller); this benchmark is
also the check that doing so costs no throughput.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import manyproc  # noqa: E402

SMALL = ("item", 12345, 6.5)
MB = 1 << 20


def _producer(q, go_fd: int, n: int, item) -> None:
    os.read(go_fd, 1)
    put = q.put
    for _ in range(n):
        put(item)


def measure(lib, kind: str, n: int, item) -> float:
    """Seconds to move ``n`` copies of ``item`` from a child through a fresh queue."""
    ctx = lib.get_context("fork")
    q = ctx.SimpleQueue() if kind == "SimpleQueue" else ctx.Queue()
    go_r, go_w = os.pipe()
    p = ctx.Process(target=_producer, args=(q, go_r, n, item))
    p.start()
    get = q.get
    os.write(go_w, b"g")
    start = time.perf_counter()
    for _ in range(n):
        get()
    elapsed = time.perf_counter() - start
    p.join()
    os.close(go_r)
    os.close(go_w)
    if kind == "Queue":
        q.close()
        q.join_thread()
    else:
        q.close()
    return elapsed


def _give_up(signum, frame):
    raise SystemExit("queue_bench: gave up after 300 s; a producer is probably broken")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--small", type=int, default=20000, help="small messages per run")
    parser.add_argument("--big", type=int, default=150, help="1 MB messages per run")
    args = parser.parse_args()
    # A broken producer must fail the run, not hang it (the blocking get() is measured).
    signal.signal(signal.SIGALRM, _give_up)
    signal.alarm(300)

    big_item = os.urandom(MB)
    cases = [
        ("Queue, small messages", "Queue", args.small, SMALL, "msg/s"),
        ("SimpleQueue, small messages", "SimpleQueue", args.small, SMALL, "msg/s"),
        ("Queue, 1 MB payloads", "Queue", args.big, big_item, "MB/s"),
    ]
    libs = {"manyproc": manyproc, "stdlib": multiprocessing}
    samples: dict[tuple[str, str], list[float]] = {}
    start = time.monotonic()
    for _ in range(args.rounds):
        for label, kind, n, item, unit in cases:
            for name, lib in libs.items():
                seconds = measure(lib, kind, n, item)
                rate = n / seconds if unit == "msg/s" else n * len(item) / MB / seconds
                samples.setdefault((label, name), []).append(rate)
    elapsed = time.monotonic() - start

    print(f"Queue throughput, producer child -> consumer parent, {args.rounds} rounds, "
          f"medians; {elapsed:.1f} s total")
    print(f"{'case':30} {'unit':>6} {'manyproc':>12} {'stdlib':>12} {'ratio':>7}")
    for label, _kind, _n, _item, unit in cases:
        ours = statistics.median(samples[(label, "manyproc")])
        theirs = statistics.median(samples[(label, "stdlib")])
        print(f"{label:30} {unit:>6} {ours:12.0f} {theirs:12.0f} {ours / theirs:6.2f}x")


if __name__ == "__main__":
    main()
