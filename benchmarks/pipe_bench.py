"""Pipe round-trip latency: manyproc vs the raw OS floor vs the standard library.

Each variant forks one echo child and times ``N`` round trips of a small object
(send, child receives and sends it back, receive).  Variants run interleaved,
``ROUNDS`` times each, and the table shows medians (microseconds per round trip)
and ratios.  The raw variants move the same number of bytes with bare
``os.write``/``os.read`` and no pickling: the floor any Python transport sits on.

Where the two processes run changes what is measured, so each placement gets a table:

* ``split``: parent on CPU 0, child on CPU 1 -- a real cross-core wake-up, as in use;
* ``same``: both on CPU 0 -- no wake-up latency, so the software overhead (syscalls,
  pickling, Python) is all there is: the harshest ratio;
* ``free``: the scheduler decides (noisy on a busy machine).

"raw + pickle" adds ``pickle.dumps``/``loads`` to the raw floor: the least any
object transport can cost, and the fairer yardstick for the software overhead.

    python benchmarks/pipe_bench.py [--rounds 7] [--n 2000] [--placement split,same]

Goal: manyproc within 1.2x of the raw floor of the same kind of pipe.
"""

from __future__ import annotations

import argparse
import multiprocessing.connection as std_connection
import os
import pickle
import socket
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from manyproc import connection as mp_connection  # noqa: E402

MESSAGE = ("task", 42, {"x": 1.5, "tag": "abc"})
PAYLOAD = pickle.dumps(MESSAGE, 5)


CHILD_CPUS: set[int] | None = None


def _fork(child) -> int:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            if CHILD_CPUS is not None:
                os.sched_setaffinity(0, CHILD_CPUS)
            child()
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    return pid


def _time_loop(step, n: int) -> float:
    for _ in range(50):  # warm up both processes' caches and the scheduler
        step()
    start = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - start) / n * 1e6


def raw_pipes(n: int) -> float:
    """Two os.pipe()s, bare os.write/os.read of the pickled size: the OS floor."""
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    size = len(PAYLOAD) + 4
    data = b"\0" * size

    def child():
        for _ in range(n + 50):
            os.write(w2, os.read(r1, size))

    pid = _fork(child)

    def step():
        os.write(w1, data)
        os.read(r2, size)

    us = _time_loop(step, n)
    os.waitpid(pid, 0)
    for fd in (r1, w1, r2, w2):
        os.close(fd)
    return us


def raw_pipes_pickled(n: int) -> float:
    """The raw floor plus pickle.dumps/loads each way: the least any object transport costs."""
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    size = len(PAYLOAD)
    dumps, loads = pickle.dumps, pickle.loads

    def child():
        for _ in range(n + 50):
            os.write(w2, dumps(loads(os.read(r1, size)), 5))

    pid = _fork(child)

    def step():
        os.write(w1, dumps(MESSAGE, 5))
        loads(os.read(r2, size))

    us = _time_loop(step, n)
    os.waitpid(pid, 0)
    for fd in (r1, w1, r2, w2):
        os.close(fd)
    return us


def raw_socketpair(n: int) -> float:
    """One AF_UNIX socket pair (what a duplex Pipe is), bare os.write/os.read."""
    a, b = socket.socketpair()
    fa, fb = a.fileno(), b.fileno()
    size = len(PAYLOAD) + 4
    data = b"\0" * size

    def child():
        for _ in range(n + 50):
            os.write(fb, os.read(fb, size))

    pid = _fork(child)

    def step():
        os.write(fa, data)
        os.read(fa, size)

    us = _time_loop(step, n)
    os.waitpid(pid, 0)
    a.close()
    b.close()
    return us


def _connection_variant(module, duplex: bool):
    def run(n: int) -> float:
        if duplex:
            here, there = module.Pipe()
            send_end, recv_end = here, here
            child_recv, child_send = there, there
        else:
            child_recv, send_end = module.Pipe(duplex=False)
            recv_end, child_send = module.Pipe(duplex=False)

        def child():
            recv, send = child_recv.recv, child_send.send
            for _ in range(n + 50):
                send(recv())

        pid = _fork(child)
        send, recv = send_end.send, recv_end.recv

        def step():
            send(MESSAGE)
            recv()

        us = _time_loop(step, n)
        os.waitpid(pid, 0)
        for c in {send_end, recv_end, child_recv, child_send}:
            c.close()
        return us

    return run


VARIANTS = {
    "raw os.pipe x2": raw_pipes,
    "raw os.pipe x2 + pickle": raw_pipes_pickled,
    "manyproc Pipe(duplex=False) x2": _connection_variant(mp_connection, False),
    "stdlib Pipe(duplex=False) x2": _connection_variant(std_connection, False),
    "raw socketpair": raw_socketpair,
    "manyproc Pipe()": _connection_variant(mp_connection, True),
    "stdlib Pipe()": _connection_variant(std_connection, True),
}


def _placements(wanted: list[str]) -> dict[str, tuple[set[int] | None, set[int] | None]]:
    """CPU sets (parent, child) of each placement this machine supports."""
    found: dict[str, tuple[set[int] | None, set[int] | None]] = {}
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    for name in wanted:
        if name == "free":
            found[name] = (None, None)
        elif name == "same" and cpus:
            found[name] = ({cpus[0]}, {cpus[0]})
        elif name == "split" and len(cpus) >= 2:
            found[name] = ({cpus[0]}, {cpus[1]})
        else:
            print(f"(placement {name!r} is not available here; skipped)")
    return found


def run_table(placement: str, parent_cpus, child_cpus, rounds: int, n: int) -> None:
    global CHILD_CPUS
    original = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    CHILD_CPUS = child_cpus
    if parent_cpus is not None:
        os.sched_setaffinity(0, parent_cpus)
    samples: dict[str, list[float]] = {name: [] for name in VARIANTS}
    start = time.monotonic()
    try:
        for _ in range(rounds):
            for name, fn in VARIANTS.items():
                samples[name].append(fn(n))
    finally:
        CHILD_CPUS = None
        if original is not None:
            os.sched_setaffinity(0, original)
    elapsed = time.monotonic() - start
    med = {name: statistics.median(v) for name, v in samples.items()}

    print(f"\n[{placement}] parent CPUs {parent_cpus or 'any'}, child CPUs {child_cpus or 'any'}; "
          f"{rounds} rounds x {n} round trips, medians, {elapsed:.1f} s")
    print(f"{'variant':34} {'us/round trip':>14} {'vs raw':>8} {'vs stdlib':>10}")
    pairs = {
        "raw os.pipe x2 + pickle": ("raw os.pipe x2", None),
        "manyproc Pipe(duplex=False) x2": ("raw os.pipe x2", "stdlib Pipe(duplex=False) x2"),
        "stdlib Pipe(duplex=False) x2": ("raw os.pipe x2", None),
        "manyproc Pipe()": ("raw socketpair", "stdlib Pipe()"),
        "stdlib Pipe()": ("raw socketpair", None),
    }
    for name, value in med.items():
        raw, std = pairs.get(name, (None, None))
        vs_raw = f"{value / med[raw]:.2f}x" if raw else ""
        vs_std = f"{value / med[std]:.2f}x" if std else ""
        print(f"{name:34} {value:14.1f} {vs_raw:>8} {vs_std:>10}")
    print(f"manyproc Pipe(duplex=False) x2 vs raw pipes + pickle: "
          f"{med['manyproc Pipe(duplex=False) x2'] / med['raw os.pipe x2 + pickle']:.2f}x")
    print(f"manyproc Pipe() vs raw os.pipe ping-pong: "
          f"{med['manyproc Pipe()'] / med['raw os.pipe x2']:.2f}x "
          f"(raw socketpair alone is {med['raw socketpair'] / med['raw os.pipe x2']:.2f}x "
          "raw pipes)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--n", type=int, default=2000, help="round trips per measurement")
    parser.add_argument("--placement", default="split,same",
                        help="comma-separated: split, same, free")
    args = parser.parse_args()
    print(f"Pipe round trip of {MESSAGE!r} ({len(PAYLOAD)} pickled bytes)")
    for name, (parent_cpus, child_cpus) in _placements(args.placement.split(",")).items():
        run_table(name, parent_cpus, child_cpus, args.rounds, args.n)


if __name__ == "__main__":
    main()
