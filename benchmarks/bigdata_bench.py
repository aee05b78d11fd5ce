"""Big arrays between processes: manyproc (shared memory) vs the standard library (pipe).

Each case sends a numpy array parent -> child -> parent: the child receives it and
sends the same object back; the parent then reads one byte of every page of what
came back (so a mapping that was never touched is not counted as free).  A child
per case lives for all rounds, so process start-up is not measured.  Variants run
interleaved, ``--rounds`` times each, one array size after the other; the table
shows medians, the rate as array MB moved per second (two transfers per round
trip), and the manyproc/stdlib ratio (higher is better).  With a pool
(``manyproc.Pool``, when it exists), ``map`` of an echo function over 8 arrays of
20 MB is timed the same way.

    python benchmarks/bigdata_bench.py [--rounds 7] [--sizes 1,10,100] [--no-pool]

Run it with the project venv (numpy is a dev dependency); about 30-60 s.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import numpy as np  # noqa: E402

import manyproc  # noqa: E402

MB = 1 << 20
PAGE = 4096


def _echo_pipe(conn: Any) -> None:
    while True:
        obj = conn.recv()
        if obj is None:
            return
        conn.send(obj)
        del obj  # free it now, not when the next (perhaps smaller) message arrives


def _echo_queue(inq: Any, outq: Any) -> None:
    while True:
        obj = inq.get()
        if obj is None:
            return
        outq.put(obj)
        del obj


def _echo(obj: Any) -> Any:
    return obj


def _touch(arr: np.ndarray) -> int:
    """Read one byte per page, as a consumer of the array would (faults in a mapping)."""
    return int(arr.reshape(-1).view(np.uint8)[::PAGE].sum())


class PipeCase:
    def __init__(self, lib: Any) -> None:
        ctx = lib.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_echo_pipe, args=(child,))
        self.proc.start()
        child.close()

    def round_trip(self, arr: np.ndarray) -> float:
        start = time.perf_counter()
        self.conn.send(arr)
        back = self.conn.recv()
        _touch(back)
        elapsed = time.perf_counter() - start
        assert back.shape == arr.shape and back[-1] == arr[-1]
        return elapsed

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(30)
        self.conn.close()


class QueueCase:
    def __init__(self, lib: Any) -> None:
        ctx = lib.get_context("fork")
        self.inq, self.outq = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=_echo_queue, args=(self.inq, self.outq))
        self.proc.start()

    def round_trip(self, arr: np.ndarray) -> float:
        start = time.perf_counter()
        self.inq.put(arr)
        back = self.outq.get()
        _touch(back)
        elapsed = time.perf_counter() - start
        assert back.shape == arr.shape and back[-1] == arr[-1]
        return elapsed

    def close(self) -> None:
        self.inq.put(None)
        self.proc.join(30)
        for q in (self.inq, self.outq):
            q.close()
            q.join_thread()


class PoolCase:
    def __init__(self, lib: Any) -> None:
        self.pool = lib.get_context("fork").Pool(2)
        self.pool.map(_echo, [1, 2, 3, 4])  # the workers are up

    def round_trip(self, arrays: list[np.ndarray]) -> float:
        start = time.perf_counter()
        back = self.pool.map(_echo, arrays, chunksize=1)
        for b in back:
            _touch(b)
        elapsed = time.perf_counter() - start
        assert len(back) == len(arrays) and back[-1][-1] == arrays[-1][-1]
        return elapsed

    def close(self) -> None:
        self.pool.close()
        self.pool.join()


def _give_up(signum: int, frame: Any) -> None:
    raise SystemExit("bigdata_bench: gave up after 300 s; a child is probably broken")


def _pool_available() -> str | None:
    """None if manyproc has a working Pool, else why not."""
    try:
        pool = manyproc.get_context("fork").Pool(1)
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return f"{type(exc).__name__}: {exc}"
    try:
        if pool.map(_echo, [1]) != [1]:
            return "manyproc.Pool.map gave a wrong answer"
    finally:
        pool.terminate()
        pool.join()
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--sizes", default="1,10,100", help="array sizes in MB")
    parser.add_argument("--no-pool", action="store_true", help="skip the Pool.map case")
    args = parser.parse_args()
    signal.signal(signal.SIGALRM, _give_up)
    signal.alarm(300)

    sizes = [int(s) for s in args.sizes.split(",")]
    arrays = {mb: np.random.default_rng(mb).random(mb * MB // 8) for mb in sizes}
    libs = {"manyproc": manyproc, "stdlib": multiprocessing}
    kinds = {"Pipe": PipeCase, "Queue": QueueCase}
    samples: dict[tuple[str, str, str], list[float]] = {}
    start = time.monotonic()
    cases = {(kind, name): make(lib) for kind, make in kinds.items()
             for name, lib in libs.items()}
    try:
        for mb, arr in arrays.items():  # one size at a time: big frees do not spill over
            for _ in range(args.rounds):
                for (kind, name), case in cases.items():
                    seconds = case.round_trip(arr)
                    samples.setdefault((kind, f"{mb} MB", name), []).append(2 * mb / seconds)
    finally:
        for case in cases.values():
            case.close()

    pool_note = None
    if not args.no_pool:
        pool_note = _pool_available()
        if pool_note is None:
            batch = [np.random.default_rng(i).random(20 * MB // 8) for i in range(8)]
            pools = {name: PoolCase(lib) for name, lib in libs.items()}
            try:
                for _ in range(max(3, args.rounds // 2)):
                    for name, pool in pools.items():
                        seconds = pool.round_trip(batch)
                        samples.setdefault(("Pool.map", "8 x 20 MB", name), []).append(
                            2 * 8 * 20 / seconds)
            finally:
                for pool in pools.values():
                    pool.close()
    elapsed = time.monotonic() - start

    print(f"numpy float64 arrays parent -> child -> parent (fork), {args.rounds} rounds, "
          f"medians; {elapsed:.1f} s total")
    print(f"manyproc shared-memory threshold: {manyproc.reduction.get_shm_threshold()} bytes")
    print(f"{'channel':10} {'array':>10} {'manyproc MB/s':>14} {'stdlib MB/s':>12} {'ratio':>7}")
    for kind, size, name in samples:
        if name != "manyproc":
            continue
        ours = statistics.median(samples[(kind, size, "manyproc")])
        theirs = statistics.median(samples[(kind, size, "stdlib")])
        print(f"{kind:10} {size:>10} {ours:14.0f} {theirs:12.0f} {ours / theirs:6.2f}x")
    if pool_note is not None:
        print(f"Pool.map 8 x 20 MB: skipped, manyproc.Pool is not usable yet ({pool_note})")


if __name__ == "__main__":
    main()
