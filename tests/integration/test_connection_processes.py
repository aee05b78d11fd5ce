"""Connections between real processes, for every start method."""

from __future__ import annotations

import os
import socket

import pytest

import manyproc as mp
from manyproc import reduction
from manyproc.connection import Client, Listener, wait

pytestmark = pytest.mark.timeout(90)


def echo_twice(conn):
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        conn.send((msg, msg))


def write_one_way(writer, count):
    for i in range(count):
        writer.send(i)
    writer.send_bytes(b"x" * (3 << 20))
    writer.close()


def receive_handles(conn):
    """Receive a connection, a socket and a raw fd through ``conn``; use each of them."""
    inner = conn.recv()
    inner.send(("inner", os.getpid()))
    sock = conn.recv()
    sock.sendall(b"through a socket")
    fd = conn.recv().detach()
    os.write(fd, b"through an fd")
    os.close(fd)
    conn.send("done")


def connect_back(address, authkey, family):
    with Client(address, family=family, authkey=authkey) as c:
        c.send(("hello", os.getpid()))
        c.send(c.recv() + 1)


def exit_after_sending(conn):
    conn.send("bye")


@pytest.fixture
def ctx(start_method):
    return mp.get_context(start_method)


def test_duplex_pipe_round_trips(ctx):
    parent, child = ctx.Pipe()
    p = ctx.Process(target=echo_twice, args=(child,))
    p.start()
    child.close()
    try:
        for msg in (1, "two", [3] * 1000, b"\0" * 100_000):
            parent.send(msg)
            assert parent.recv() == (msg, msg)
        parent.send(None)
    finally:
        p.join(30)
    assert p.exitcode == 0
    parent.close()


def test_one_way_pipe_and_eof_after_the_child_exits(ctx):
    reader, writer = ctx.Pipe(duplex=False)
    p = ctx.Process(target=write_one_way, args=(writer, 500))
    p.start()
    writer.close()
    assert [reader.recv() for _ in range(500)] == list(range(500))
    assert reader.recv_bytes() == b"x" * (3 << 20)
    with pytest.raises(EOFError):
        reader.recv()
    p.join(30)
    assert p.exitcode == 0
    reader.close()


def test_connections_sockets_and_fds_travel_after_start(ctx):
    from manyproc import resource_sharer

    parent, child = ctx.Pipe()
    p = ctx.Process(target=receive_handles, args=(child,))
    p.start()
    child.close()
    inner_here, inner_there = ctx.Pipe()
    s_here, s_there = socket.socketpair()
    r, w = os.pipe()
    try:
        parent.send(inner_there)
        inner_there.close()
        assert inner_here.recv() == ("inner", p.pid)
        parent.send(s_there)
        s_there.close()
        assert s_here.recv(100) == b"through a socket"
        parent.send(reduction.DupFd(w))
        os.close(w)
        assert parent.recv() == "done"
        assert os.read(r, 100) == b"through an fd"
    finally:
        p.join(30)
        for c in (parent, inner_here, s_here):
            c.close()
        os.close(r)
        resource_sharer.stop()
    assert p.exitcode == 0


@pytest.mark.parametrize("family", ["AF_UNIX", "AF_INET"])
def test_listener_and_client_between_processes(ctx, family):
    authkey = os.urandom(16)
    with Listener(family=family, authkey=authkey) as listener:
        p = ctx.Process(target=connect_back, args=(listener.address, authkey, family))
        p.start()
        try:
            with listener.accept() as conn:
                assert conn.recv() == ("hello", p.pid)
                conn.send(41)
                assert conn.recv() == 42
        finally:
            p.join(30)
    assert p.exitcode == 0


def test_wait_on_sentinels_and_connections(ctx):
    parent, child = ctx.Pipe()
    p = ctx.Process(target=exit_after_sending, args=(child,))
    p.start()
    child.close()
    try:
        ready = wait([parent, p.sentinel], timeout=30)
        assert parent in ready
        assert parent.recv() == "bye"
        assert wait([p.sentinel], timeout=30) == [p.sentinel]
    finally:
        p.join(30)
        parent.close()


def connect_with_inherited_key(address):
    # A child holds its parent's authkey, so it can talk to the parent's Listener.
    with Client(address, authkey=mp.current_process().authkey) as c:
        c.send(bytes(mp.current_process().authkey).hex())


def test_child_authenticates_with_the_inherited_authkey(ctx):
    key = mp.current_process().authkey
    with Listener(authkey=key) as listener:
        p = ctx.Process(target=connect_with_inherited_key, args=(listener.address,))
        p.start()
        try:
            with listener.accept() as conn:
                assert conn.recv() == bytes(key).hex()
        finally:
            p.join(30)
    assert p.exitcode == 0
