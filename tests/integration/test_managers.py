"""Managers with real processes, under every start method: proxies cross processes."""

from __future__ import annotations

import errno
import functools
import gc
import os
import pickle
import ssl
import sys
import time

import pytest

import manyproc
from manyproc import ProcessError
from manyproc.managers import (
    ListProxy,
    RemoteError,
    SharedMemoryManager,
    SyncManager,
)

pytestmark = pytest.mark.timeout(120)

KEY = b"integration-key"


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def run_child(ctx, target, *args):
    p = ctx.Process(target=target, args=args)
    p.start()
    p.join(60)
    if p.is_alive():
        p.kill()
        p.join()
    return p.exitcode


# ----------------------------------------------------------------- children


def use_everything(d, lst, s, q, ns, lock, event, value, array, cond, barrier):
    assert d["parent"] == 1 and lst[0] == "first" and 1 in s
    d["child"] = os.getpid()
    lst.append("from child")
    s.add(2)
    q.put(("hello", os.getpid()))
    ns.answer = 42
    with lock:
        value.value += 1
    array[0] = 7
    assert barrier.parties == 1
    barrier.wait(5)
    with cond:
        cond.notify_all()
    event.set()


def receive_proxies(q, done):
    shared_list, shared_dict = q.get(timeout=20)
    shared_list.append("received")
    shared_dict["seen"] = isinstance(shared_list, ListProxy)
    done.set()


def use_nested(outer):
    outer[0]["inner"] = "written by child"
    outer[1].append("child")


def wait_then_use(started, go, shared, result):
    started.set()  # the inherited proxies took their references before this ran
    go.wait(20)
    shared.append("still here")
    result.put(shared[:])


def put_result(conn, value):
    conn.send(value)


def proxy_from_pipe(conn):
    shared = conn.recv()  # pickled outside of process start: carries its custom key
    shared.append("via pipe")
    conn.send(shared[:])


def write_marker(path):
    with open(path, "w") as f:
        f.write(str(os.getpid()))


def failing_initializer():
    raise LookupError("initializer failed on purpose")


# ----------------------------------------------------------------- tests


def test_shared_types_across_a_child(ctx):
    with SyncManager(ctx=ctx) as manager:
        d = manager.dict(parent=1)
        lst = manager.list(["first"])
        s = manager.set({1})
        q = manager.Queue()
        ns = manager.Namespace()
        lock = manager.Lock()
        event = manager.Event()
        value = manager.Value("i", 0)
        array = manager.Array("i", [0, 0])
        cond = manager.Condition()
        barrier = manager.Barrier(1)
        assert run_child(ctx, use_everything, d, lst, s, q, ns, lock, event, value, array,
                         cond, barrier) == 0
        assert d["child"] > 0 and lst[:] == ["first", "from child"] and s.copy() == {1, 2}
        assert q.get(timeout=5)[0] == "hello"
        assert ns.answer == 42 and value.value == 1 and array[0] == 7 and event.is_set()
        del d, lst, s, q, ns, lock, event, value, array, cond, barrier
        assert wait_until(lambda: manager._number_of_objects() == 0)
    assert manager._process is None or manager._process.exitcode == 0


def test_proxies_travel_through_a_shared_queue(ctx):
    with SyncManager(ctx=ctx) as manager:
        q = manager.Queue()
        done = manager.Event()
        shared_list = manager.list()
        shared_dict = manager.dict()
        p = ctx.Process(target=receive_proxies, args=(q, done))
        p.start()
        q.put((shared_list, shared_dict))
        assert done.wait(30)
        p.join(30)
        assert p.exitcode == 0
        assert shared_list[:] == ["received"] and shared_dict["seen"] is True


def test_nested_proxies_in_a_child(ctx):
    with SyncManager(ctx=ctx) as manager:
        outer = manager.list([manager.dict(), manager.list()])
        assert run_child(ctx, use_nested, outer) == 0
        assert outer[0]["inner"] == "written by child" and outer[1][:] == ["child"]
        assert manager._number_of_objects() == 3
        del outer
        assert wait_until(lambda: manager._number_of_objects() == 0)


def test_a_proxy_with_a_custom_key_crosses_a_pipe(ctx):
    """gh-139801: a proxy pickled after start-up keeps a custom authkey."""
    with SyncManager(ctx=ctx, authkey=KEY) as manager:
        shared = manager.list()
        parent_end, child_end = manyproc.Pipe()
        p = ctx.Process(target=proxy_from_pipe, args=(child_end,))
        p.start()
        parent_end.send(shared)
        assert parent_end.poll(30)
        assert parent_end.recv() == ["via pipe"]
        p.join(30)
        assert p.exitcode == 0


def test_the_default_key_never_appears_in_a_pickle(ctx):
    with SyncManager(ctx=ctx) as manager:
        shared = manager.list()
        data = pickle.dumps(shared)
        assert bytes(manyproc.current_process().authkey) not in data


def test_inherited_proxies_take_their_own_reference():
    ctx = manyproc.get_context("fork")
    with SyncManager(ctx=ctx) as manager:
        started = manager.Event()
        go = manager.Event()
        result = manager.Queue()
        holder = [manager.list(["made by parent"])]
        p = ctx.Process(target=wait_then_use, args=(started, go, holder[0], result))
        p.start()
        assert started.wait(30)
        holder.clear()  # the parent's proxy is gone...
        go.set()  # ...but the forked child's reference keeps the list alive
        assert result.get(timeout=30) == ["made by parent", "still here"]
        p.join(30)
        assert p.exitcode == 0
        assert wait_until(lambda: manager._number_of_objects() == 3)


def test_initializer_runs_first_in_the_server(ctx, tmp_path):
    marker = tmp_path / "initialized"
    manager = SyncManager(ctx=ctx)
    manager.start(write_marker, (str(marker),))
    try:
        assert marker.read_text() == str(manager._process.pid)
    finally:
        manager.shutdown()
    assert manager._process.exitcode == 0


def test_initializer_failure_is_raised_here(ctx):
    manager = SyncManager(ctx=ctx)
    with pytest.raises(LookupError, match="on purpose") as info:
        manager.start(failing_initializer)
    assert "failing_initializer" in str(info.value.__cause__)
    assert manager._state.value == 0  # never started


def test_address_in_use(ctx):
    with SyncManager(ctx=ctx, address=("127.0.0.1", 0), authkey=KEY) as first:
        second = SyncManager(ctx=ctx, address=first.address, authkey=KEY)
        with pytest.raises(OSError) as info:
            second.start()
        assert info.value.errno == errno.EADDRINUSE
        assert "cannot listen" in str(info.value)


def test_shutdown_join_and_second_start(ctx):
    manager = SyncManager(ctx=ctx)
    manager.start()
    process = manager._process
    with pytest.raises(ProcessError, match="already started"):
        manager.start()
    shared = manager.list([1])
    manager.shutdown()
    manager.join(10)
    assert process.exitcode == 0
    assert manager._process is None
    manager.shutdown()  # twice is harmless
    with pytest.raises(ProcessError, match="shut down"):
        manager.start()
    with pytest.raises(ConnectionError):
        shared.append(2)


def test_manager_function_of_the_context(ctx):
    manager = ctx.Manager()
    try:
        assert isinstance(manager, SyncManager)
        assert manager._ctx is ctx or manager._ctx.get_start_method() == ctx.get_start_method()
        assert manager.list([3])[:] == [3]
    finally:
        manager.shutdown()


def test_remote_style_connect_from_another_process(ctx):
    with SyncManager(ctx=ctx, address=("127.0.0.1", 0), authkey=KEY) as manager:
        shared = manager.dict()
        parent_end, child_end = manyproc.Pipe()
        p = ctx.Process(target=connect_and_count, args=(manager.address, child_end))
        p.start()
        assert parent_end.poll(30)
        assert parent_end.recv() == 1
        p.join(30)
        del shared


def connect_and_count(address, conn):
    manager = SyncManager(address=address, authkey=KEY)
    manager.connect()
    conn.send(manager._number_of_objects())


def test_pool_through_the_manager(ctx):
    pytest.importorskip("manyproc.pool")
    with SyncManager(ctx=ctx) as manager:
        pool = manager.Pool(2)
        assert pool.map(abs, [-1, -2, 3]) == [1, 2, 3]
        assert pool.apply_async(abs, (-4,)).get(timeout=30) == 4
        assert sorted(pool.imap_unordered(abs, [-5, 6])) == [5, 6]
        with pytest.raises(RemoteError):
            manager.Pool(0)
        pool.terminate()


def test_shared_memory_manager_unlinks_its_blocks(ctx):
    shared_memory = pytest.importorskip("manyproc.shared_memory")
    with SharedMemoryManager(ctx=ctx) as smm:
        block = smm.SharedMemory(size=64)
        block.buf[:3] = b"abc"
        items = smm.ShareableList([1, "two", 3.0])
        names = [block.name, items.shm.name]
        again = shared_memory.SharedMemory(name=block.name)
        assert bytes(again.buf[:3]) == b"abc"
        again.close()
        block.close()
        items.shm.close()
    for name in names:
        with pytest.raises(FileNotFoundError):
            shared_memory.SharedMemory(name=name)


def test_shared_memory_manager_needs_start():
    smm = SharedMemoryManager()
    with pytest.raises(ValueError, match="start"):
        smm.SharedMemory(size=9)


@pytest.mark.skipif(sys.platform != "linux", reason="uses /proc")
def test_the_server_process_ignores_ctrl_c(ctx):
    import signal

    with SyncManager(ctx=ctx) as manager:
        shared = manager.list()
        os.kill(manager._process.pid, signal.SIGINT)
        time.sleep(0.1)
        shared.append(1)
        assert shared[:] == [1]


def create_through_the_manager(manager, conn):
    shared = manager.list(["made in the child"])
    conn.send((type(manager).__name__, shared[:], manager.address))
    manager.shutdown()  # the child does not own the server: nothing happens


def test_the_manager_itself_can_be_passed_to_a_child(ctx):
    with SyncManager(ctx=ctx, authkey=KEY) as manager:
        parent_end, child_end = manyproc.Pipe()
        p = ctx.Process(target=create_through_the_manager, args=(manager, child_end))
        p.start()
        assert parent_end.poll(30)
        assert parent_end.recv() == ("SyncManager", ["made in the child"], manager.address)
        p.join(30)
        assert p.exitcode == 0
        assert manager.list([1])[:] == [1]  # the server is still up


def server_context(pem):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pem)
    return context


def client_context(pem):
    return ssl.create_default_context(cafile=pem)


def append_over_tls(shared):
    shared.append(os.getpid())


def test_tls_manager_under_every_start_method(ctx, tmp_path):
    from tests.unit.test_managers_fixtures import make_certificate

    pem = make_certificate(tmp_path)
    if pem is None:
        pytest.skip("needs the openssl command to make a test certificate")
    # Functions building the contexts travel to the server and to spawned children.
    manager = SyncManager(ctx=ctx, address=("127.0.0.1", 0), authkey=KEY,
                          ssl_context=functools.partial(server_context, str(pem)),
                          client_ssl_context=functools.partial(client_context, str(pem)))
    with manager:
        shared = manager.list()
        assert run_child(ctx, append_over_tls, shared) == 0
        assert len(shared) == 1
        assert manager._client()._session.channel.sock.version().startswith("TLS")


def test_a_child_without_a_way_to_reach_a_tls_manager_is_told_so(tmp_path, capfd):
    from tests.unit.test_managers_fixtures import make_certificate

    pem = make_certificate(tmp_path)
    if pem is None:
        pytest.skip("needs the openssl command to make a test certificate")
    ctx = manyproc.get_context("spawn")
    manager = SyncManager(ctx=ctx, address=("127.0.0.1", 0), authkey=KEY,
                          ssl_context=functools.partial(server_context, str(pem)),
                          client_ssl_context=client_context(str(pem)))  # does not travel
    with manager:
        shared = manager.list()
        assert run_child(ctx, append_over_tls, shared) != 0
    err = capfd.readouterr().err
    assert "uses TLS, but this process has no ssl context for it" in err


def fill(shared, result):
    shared.append("child")
    result.put(shared[:])


def test_a_proxy_passed_to_a_starting_child_outlives_the_parents_copy(ctx):
    if ctx.get_start_method() == "fork":
        pytest.skip("a forked child copies the proxy rather than unpickling it; the parent "
                    "must keep its proxy until the child started (as with the stdlib)")
    with SyncManager(ctx=ctx) as manager:
        result = manager.Queue()
        p = ctx.Process(target=fill, args=(manager.list(["temporary"]), result))
        p.start()
        gc.collect()  # the parent's temporary proxy is certainly gone now
        assert result.get(timeout=60) == ["temporary", "child"]
        p.join(30)
        assert p.exitcode == 0
        assert wait_until(lambda: manager._number_of_objects() == 1)  # the result queue
