"""Big arrays and buffers between real processes through shared memory, every start method.

Covers round trips around the threshold (Pipe, Queue, SimpleQueue), zero-copy in the
receiving child, messages that outlive their sender, and the two ways a message can
be orphaned (receiver killed, sender killed) -- those run as separate programs, so
their clean-up at program end can be checked.
"""

from __future__ import annotations

import multiprocessing.connection as std  # noqa: TID251 - interop with the stdlib is tested
import os
import signal
import threading
import time

import pytest

import manyproc as mp
from manyproc import _bigdata, connection, reduction, resource_tracker
from manyproc._os import shm

from .scripts import run_script

np = pytest.importorskip("numpy")

pytestmark = pytest.mark.timeout(120)

T = _bigdata.DEFAULT_THRESHOLD
# Below the threshold (pipe), at it, and well above it (shared memory).
SIZES = [T - (64 << 10), T, 6 * T + 12345]


@pytest.fixture
def ctx(start_method):
    return mp.get_context(start_method)


@pytest.fixture(autouse=True)
def default_threshold():
    saved = _bigdata._threshold, _bigdata._explicit
    _bigdata.set_threshold(T)
    yield
    _bigdata._threshold, _bigdata._explicit = saved


def tracked_messages():
    return [r["name"] for r in resource_tracker._tracked()
            if r["name"].startswith(f"/{shm.NAME_PREFIX}{shm.family_token()}{shm.BUFFER_KIND}")]


@pytest.fixture(autouse=True)
def tracker_books_balanced():
    """Every message a test sent was received, so the tracker holds none of them."""
    yield
    assert wait_until(lambda: not tracked_messages(), 10), tracked_messages()


def wait_until(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def mapped_from_shm(arr) -> bool:
    """True if the array's memory lies in a /dev/shm mapping of this process (Linux)."""
    address = arr.__array_interface__["data"][0]
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= address < hi:
                return "/dev/shm/" in line
    return False


def messages():
    """(label, object) pairs sent in every round-trip test."""
    out = []
    for size in SIZES:
        out.append((f"f8[{size}]", np.arange(size // 8, dtype=np.float64)))
        out.append((f"bytearray[{size}]", bytearray(os.urandom(size))))
    out.append(("bytes", os.urandom(2 * T)))
    out.append(("mixed", {"a": np.ones(T // 8, dtype=np.int64), "b": b"x" * 100_000,
                          "meta": ("shape", 3)}))
    return out


def transform(obj):
    """What the child does to each message: change it in place, so it must be writable."""
    if isinstance(obj, np.ndarray):
        obj += 1
        return obj
    if isinstance(obj, bytearray):
        obj[:1] = b"!"
        return obj
    if isinstance(obj, dict):
        obj["a"] += 1
        return obj
    return obj[::-1]


def expected(obj):
    if isinstance(obj, np.ndarray):
        return obj + 1
    if isinstance(obj, bytearray):
        return bytearray(b"!") + obj[1:]
    if isinstance(obj, dict):
        return {**obj, "a": obj["a"] + 1}
    return obj[::-1]


def describe(obj):
    """How the child received it: (type name, writable, backed by shared memory)."""
    arr = obj["a"] if isinstance(obj, dict) else obj
    if isinstance(arr, np.ndarray):
        return type(obj).__name__, arr.flags.writeable, mapped_from_shm(arr)
    return type(obj).__name__, True, None


def check(sent, received, info):
    name, writable, on_shm = info
    assert name == type(sent).__name__ and writable
    want = expected(sent)
    if isinstance(sent, dict):
        np.testing.assert_array_equal(received["a"], want["a"])
        assert received["b"] == want["b"] and received["meta"] == want["meta"]
    elif isinstance(sent, np.ndarray):
        np.testing.assert_array_equal(received, want)
        assert on_shm is (sent.nbytes >= T)  # zero-copy in the child exactly when big
    else:
        assert type(received) is type(sent) and received == want


# --------------------------------------------------------------------------- round trips


def echo_pipe(conn):
    while (obj := conn.recv()) is not None:
        info = describe(obj)
        conn.send((info, transform(obj)))


def echo_queue(inq, outq):
    while (obj := inq.get()) is not None:
        info = describe(obj)
        outq.put((info, transform(obj)))


def test_pipe_round_trips(ctx):
    parent, child = ctx.Pipe()
    p = ctx.Process(target=echo_pipe, args=(child,))
    p.start()
    child.close()
    try:
        for _label, obj in messages():
            parent.send(obj)
            assert parent.poll(60)
            info, back = parent.recv()
            check(obj, back, info)
            if isinstance(back, np.ndarray) and back.nbytes >= T:
                assert back.flags.writeable and mapped_from_shm(back)
        parent.send(None)
    finally:
        p.join(30)
        parent.close()
    assert p.exitcode == 0


@pytest.mark.parametrize("kind", ["Queue", "SimpleQueue", "JoinableQueue"])
def test_queue_round_trips(ctx, kind):
    inq, outq = getattr(ctx, kind)(), getattr(ctx, kind)()
    p = ctx.Process(target=echo_queue, args=(inq, outq))
    p.start()
    try:
        for _label, obj in messages():
            inq.put(obj)
            info, back = outq.get(timeout=60) if kind != "SimpleQueue" else outq.get()
            check(obj, back, info)
        inq.put(None)
    finally:
        p.join(30)
        for q in (inq, outq):
            q.close()
            if kind != "SimpleQueue":
                q.join_thread()
    assert p.exitcode == 0


# --------------------------------------------------------------------------- lifetime


def send_and_exit(conn, size):
    conn.send(np.full(size // 8, 3.0))


def put_and_exit(q, size):
    q.put(np.full(size // 8, 4.0))


@pytest.mark.parametrize("size", [T, 8 * T])
def test_a_message_outlives_its_sender(ctx, size):
    """The usual worker: send the result and return. It is read after the sender ended."""
    r, w = ctx.Pipe(duplex=False)
    p = ctx.Process(target=send_and_exit, args=(w, size))
    p.start()
    w.close()
    p.join(60)
    assert p.exitcode == 0
    time.sleep(0.2)  # give the tracker every chance to (wrongly) remove it
    with r:
        back = r.recv()
    assert back.shape == (size // 8,) and (back == 3.0).all()


def test_a_queued_message_outlives_its_sender(ctx):
    q = ctx.Queue()
    p = ctx.Process(target=put_and_exit, args=(q, 4 * T))
    p.start()
    p.join(60)
    assert p.exitcode == 0
    back = q.get(timeout=30)
    assert (back == 4.0).all()
    q.close()
    q.join_thread()


def send_then_hang(conn, size, sent):
    conn.send(np.full(size // 8, 5.0))
    sent.set()
    threading.Event().wait(120)


def test_a_message_survives_its_sender_being_killed(ctx):
    r, w = ctx.Pipe(duplex=False)
    sent = ctx.Event()
    p = ctx.Process(target=send_then_hang, args=(w, 4 * T, sent))
    p.start()
    w.close()
    try:
        assert sent.wait(60)
    finally:
        p.kill()
        p.join(30)
    assert p.exitcode == -signal.SIGKILL
    time.sleep(0.2)  # the tracker saw the sender die
    with r:
        back = r.recv()
    assert (back == 5.0).all()


ORPHAN_PROGRAM = """
    import os, signal, sys, threading
    import numpy as np
    import manyproc as mp
    from manyproc._os import shm

    def never_reads(conn, ready):
        ready.set()
        threading.Event().wait(120)

    def send_then_hang(conn, sent):
        conn.send(np.ones(1 << 20))
        sent.set()
        threading.Event().wait(120)

    if __name__ == "__main__":
        method, scenario = sys.argv[1], sys.argv[2]
        ctx = mp.get_context(method)
        print("family", shm.family_token(), flush=True)
        r, w = ctx.Pipe(duplex=False)
        event = ctx.Event()
        if scenario == "receiver-killed":
            # The root sends to a child that is killed before it reads.
            p = ctx.Process(target=never_reads, args=(r, event))
            p.start()
            assert event.wait(60)
            w.send(np.ones(1 << 20))
            p.kill()
        else:
            # A child sends to the root, is killed; the root never reads.
            p = ctx.Process(target=send_then_hang, args=(w, event))
            p.start()
            assert event.wait(60)
            p.kill()
        p.join(30)
        left = [e for e in shm.list_named_objects() if shm.BUFFER_KIND in e[3:]]
        print("left before exit", len(left), flush=True)
"""


@pytest.mark.parametrize("scenario", ["receiver-killed", "sender-killed"])
def test_orphaned_messages_are_removed_when_the_program_ends(tmp_path, start_method, scenario):
    result = run_script(tmp_path, ORPHAN_PROGRAM, start_method, scenario, timeout=90)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines()
                 if line.startswith("family"))
    family = lines["family"].strip()
    assert "left before exit 1" in result.stdout  # it existed, unread, until the end
    assert wait_until(lambda: not shm.list_named_objects(family), 20), \
        shm.list_named_objects(family)


# --------------------------------------------------------------------------- who uses it


def send_unless_off(conn, size):
    conn.send_bytes(b"threshold=" + repr(reduction.get_shm_threshold()).encode())
    conn.send(bytearray(size))


def test_spawned_children_follow_the_parents_threshold(ctx):
    reduction.set_shm_threshold(None)
    r, w = ctx.Pipe(duplex=False)
    p = ctx.Process(target=send_unless_off, args=(w, 2 * T))
    p.start()
    w.close()
    with r:
        assert r.recv_bytes() == b"threshold=None"
        raw = r.recv_bytes()
    p.join(30)
    assert len(raw) > 2 * T  # the whole pickle came through the pipe


def never_create(*args):
    raise AssertionError("a Listener/Client connection must not use shared memory")


def serve_echo_raw(listener):
    with listener.accept() as conn:
        conn.send_bytes(conn.recv_bytes())


@pytest.mark.parametrize("family", ["AF_INET", "AF_UNIX"])
@pytest.mark.parametrize("side", ["ours", "stdlib"])
def test_listener_client_connections_keep_the_plain_format(monkeypatch, family, side):
    monkeypatch.setattr(_bigdata, "_create", never_create)
    arr = np.arange(2 * T // 8, dtype=np.float64)
    Listener = connection.Listener if side == "ours" else std.Listener  # noqa: N806
    with Listener(family=family, authkey=b"key") as listener:
        server = threading.Thread(target=serve_echo_raw, args=(listener,), daemon=True)
        server.start()
        with connection.Client(listener.address, authkey=b"key") as conn:
            conn.send(arr)
            assert conn.poll(30)
            raw = conn.recv_bytes()
        server.join(30)
    assert len(raw) > arr.nbytes
    np.testing.assert_array_equal(reduction.loads(raw), arr)


def test_a_stdlib_client_and_our_listener_exchange_big_arrays():
    arr = np.arange(2 * T // 8, dtype=np.float64)

    def serve(listener):
        with listener.accept() as conn:
            conn.send(conn.recv())

    with connection.Listener(family="AF_UNIX", authkey=b"k") as listener:
        server = threading.Thread(target=serve, args=(listener,), daemon=True)
        server.start()
        with std.Client(listener.address, authkey=b"k") as conn:
            conn.send(arr)
            np.testing.assert_array_equal(conn.recv(), arr)
        server.join(30)


def test_a_stdlib_reader_on_our_pipe_still_gets_the_object():
    """The reference is a pickle: any reader that can import manyproc loads it."""
    a, b = connection.Pipe()
    theirs = std.Connection(os.dup(b.fileno()))
    b.close()
    with a, theirs:
        a.send(np.ones(T // 8))
        assert (theirs.recv() == 1).all()


# --------------------------------------------------------------------------- pools


def describe_and_transform(obj):
    return describe(obj), transform(obj)


def test_pool_tasks_and_results_go_through_shared_memory(ctx):
    sent = [obj for _, obj in messages()]
    with ctx.Pool(2) as pool:
        answers = pool.map(describe_and_transform, sent, chunksize=1)
    for obj, (info, received) in zip(sent, answers):
        check(obj, received, info)
        if isinstance(received, np.ndarray) and received.nbytes >= T:
            assert mapped_from_shm(received)  # the result came back without a copy too


def test_big_tasks_a_killed_worker_never_took_are_freed(ctx):
    """Big arguments queued behind a hung task are freed when its worker is killed."""
    big = np.ones(2 * T // 8)
    with ctx.Pool(1) as pool:
        hung = pool.apply_async(time.sleep, (60,), task_timeout=1.5)
        queued = [pool.apply_async(np.sum, (big,)) for _ in range(3)]
        with pytest.raises(mp.TaskTimeoutError):
            hung.get(30)
        # the queued tasks were sent to the killed worker's pipe: they run again elsewhere
        assert [r.get(30) for r in queued] == [big.sum()] * 3
