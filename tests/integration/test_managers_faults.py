"""Managers when processes die: a killed client leaks nothing, a killed server hangs nobody."""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest

import manyproc
from manyproc.managers import BaseManager, ManagerConnectionError, SyncManager

pytestmark = pytest.mark.timeout(120)

KEY = b"fault-test-key"


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def hold_objects_then_hang(address, shared, ready):
    """Create objects of our own, take a reference to ``shared``, then wait to be killed."""
    manager = SyncManager(address=address, authkey=KEY)
    manager.connect()
    mine = [manager.list([n]) for n in range(3)]  # noqa: F841 - held until killed
    shared.append("child was here")
    ready.set()
    time.sleep(60)


def test_a_killed_client_frees_what_only_it_held(ctx):
    with SyncManager(ctx=ctx, authkey=KEY) as manager:
        shared = manager.list()
        ready = manager.Event()
        base = manager._number_of_objects()
        p = ctx.Process(target=hold_objects_then_hang, args=(manager.address, shared, ready))
        p.start()
        try:
            assert ready.wait(30)
            assert manager._number_of_objects() == base + 3
            os.kill(p.pid, signal.SIGKILL)
            p.join(30)
            assert p.exitcode == -signal.SIGKILL
            # The child's session ends with its connections: its objects go, ours stay.
            assert wait_until(lambda: manager._number_of_objects() == base)
            assert shared[:] == ["child was here"]
        finally:
            if p.is_alive():
                p.kill()
                p.join()


def test_a_killed_server_gives_a_connection_error_naming_it(ctx):
    manager = SyncManager(ctx=ctx, address=("127.0.0.1", 0), authkey=KEY)
    manager.start()
    shared = manager.list([1])
    shared.append(2)
    os.kill(manager._process.pid, signal.SIGKILL)
    manager._process.join(30)
    started = time.monotonic()
    with pytest.raises(ManagerConnectionError) as info:
        shared.append(3)
    assert time.monotonic() - started < 10
    text = str(info.value)
    assert f"127.0.0.1:{manager.address[1]}" in text and "lost the connection" in text
    assert isinstance(info.value, ConnectionError) and isinstance(info.value, EOFError)
    # New connections say the same kind of thing.
    with pytest.raises(ConnectionError):
        manager.list()
    manager.shutdown()  # the server is gone already: no hang, no error


def test_a_client_blocked_in_a_call_wakes_when_the_server_dies(ctx):
    manager = SyncManager(ctx=ctx, authkey=KEY)
    manager.start()
    q = manager.Queue()
    errors = []

    def wait_forever():
        try:
            q.get()
        except Exception as exc:
            errors.append(exc)

    thread = threading.Thread(target=wait_forever)
    thread.start()
    time.sleep(0.2)  # let it block in get()
    os.kill(manager._process.pid, signal.SIGKILL)
    thread.join(20)
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], ManagerConnectionError)
    manager.shutdown()


def sleeper():
    time.sleep(60)


class Forker:
    """A shared object whose creation forks a child of the server process."""

    def __init__(self):
        self.child = manyproc.get_context("fork").Process(target=sleeper, daemon=True)
        self.child.start()

    def pid(self):
        return self.child.pid


class ForkingManager(BaseManager):
    pass


ForkingManager.register("Forker", Forker)


def test_children_of_the_server_do_not_keep_its_sockets_open():
    """A process forked by the server (a pool's worker) must not hold the server's end of
    the clients' connections, or the clients would never see the server die."""
    ctx = manyproc.get_context("fork")
    manager = ForkingManager(ctx=ctx, authkey=KEY)
    manager.start()
    first = manager.Forker()  # opens this thread's call connection...
    grandchildren = [first.pid()]
    second = manager.Forker()  # ...which this fork in the server would inherit
    grandchildren.append(second.pid())
    outcome = []

    def call_after_death():
        try:
            second.pid()
        except Exception as exc:
            outcome.append(exc)

    try:
        os.kill(manager._process.pid, signal.SIGKILL)
        manager._process.join(30)
        thread = threading.Thread(target=call_after_death, daemon=True)
        thread.start()
        thread.join(10)
        assert not thread.is_alive(), "the client hangs: a grandchild holds the server's socket"
        assert len(outcome) == 1 and isinstance(outcome[0], ManagerConnectionError)
    finally:
        for pid in grandchildren:
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
        manager.shutdown()


def make_objects_and_exit(address):
    manager = SyncManager(address=address, authkey=KEY)
    manager.connect()
    kept = [manager.dict(n=n) for n in range(5)]
    os._exit(0)  # no cleanup at all: the kernel closes the sockets
    return kept


def test_a_client_that_exits_without_cleanup_leaks_nothing(ctx):
    with SyncManager(ctx=ctx, authkey=KEY) as manager:
        p = ctx.Process(target=make_objects_and_exit, args=(manager.address,))
        p.start()
        p.join(30)
        assert p.exitcode == 0
        assert wait_until(lambda: manager._number_of_objects() == 0)
