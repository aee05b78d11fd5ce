"""Connection, Pipe, Listener and Client behave like the standard library's, with clear errors."""

from __future__ import annotations

import array
import os
import pickle
import socket
import sys
import threading

import pytest

from manyproc import connection, reduction
from manyproc._errors import BufferTooShort
from manyproc.connection import Client, Connection, Listener, Pipe

pytestmark = pytest.mark.timeout(30)


def test_public_names():
    assert connection.__all__ == ["Client", "Listener", "Pipe", "wait"]
    for name in connection.__all__:
        assert callable(getattr(connection, name))


@pytest.mark.parametrize("obj", [None, 1, "text", b"\x00" * 10, [1, (2, 3)], {"a": {1, 2}},
                                 2**100, 1.5, lambda x: x + 1])
def test_send_recv_objects(obj):
    a, b = Pipe()
    with a, b:
        a.send(obj)
        got = b.recv()
        if callable(obj):
            assert got(1) == 2
        else:
            assert got == obj


def test_duplex_pipe_both_ways_and_one_way_pipe_directions():
    a, b = Pipe()
    with a, b:
        assert a.readable and a.writable and b.readable and b.writable
        b.send("back")
        assert a.recv() == "back"
    r, w = Pipe(duplex=False)
    with r, w:
        assert r.readable and not r.writable
        assert w.writable and not w.readable
        with pytest.raises(OSError, match="connection is read-only"):
            r.send(1)
        with pytest.raises(OSError, match="connection is write-only"):
            w.recv()
        with pytest.raises(OSError, match="connection is write-only"):
            w.poll()


def test_closed_connection_raises_handle_is_closed():
    a, b = Pipe()
    b.close()
    a.close()
    a.close()  # twice is fine
    assert a.closed
    for call in (lambda: a.send(1), a.recv, a.recv_bytes, a.poll, a.fileno,
                 lambda: a.send_bytes(b"x"), lambda: a.recv_bytes_into(bytearray(4))):
        with pytest.raises(OSError, match="handle is closed"):
            call()
    assert "closed" in repr(a)


def test_context_manager_closes():
    a, b = Pipe()
    with a as same:
        assert same is a
    assert a.closed
    b.close()


def test_eof_after_peer_closes():
    r, w = Pipe(duplex=False)
    w.send("last")
    w.close()
    assert r.poll()
    assert r.recv() == "last"
    assert r.poll()  # end of file is "ready"
    with pytest.raises(EOFError):
        r.recv()
    r.close()


def test_constructor_validation():
    with pytest.raises(ValueError, match="invalid handle -1"):
        Connection(-1)
    with pytest.raises(TypeError, match="file descriptor"):
        Connection("3")
    r, w = os.pipe()
    try:
        with pytest.raises(ValueError, match="readable.*writable"):
            Connection(r, readable=False, writable=False)
    finally:
        os.close(r)
        os.close(w)


def test_send_bytes_offsets_and_validation():
    a, b = Pipe()
    with a, b:
        a.send_bytes(b"0123456789", 2, 3)
        assert b.recv_bytes() == b"234"
        a.send_bytes(b"0123456789", 7)
        assert b.recv_bytes() == b"789"
        a.send_bytes(array.array("i", [1, 2]))
        assert b.recv_bytes() == array.array("i", [1, 2]).tobytes()
        a.send_bytes(b"")
        assert b.recv_bytes() == b""
        with pytest.raises(ValueError, match="offset is negative"):
            a.send_bytes(b"abc", -1)
        with pytest.raises(ValueError, match="buffer length < offset"):
            a.send_bytes(b"abc", 4)
        with pytest.raises(ValueError, match="size is negative"):
            a.send_bytes(b"abc", 0, -1)
        with pytest.raises(ValueError, match=r"buffer length < offset \+ size"):
            a.send_bytes(b"abc", 1, 3)
        with pytest.raises(ValueError, match="negative maxlength"):
            b.recv_bytes(-1)
        assert not b.poll()


def test_recv_bytes_into_with_offset_and_itemsize():
    a, b = Pipe()
    with a, b:
        buf = bytearray(10)
        a.send_bytes(b"abc")
        assert b.recv_bytes_into(buf) == 3
        assert buf[:3] == b"abc"
        a.send_bytes(b"xyz")
        assert b.recv_bytes_into(buf, 7) == 3
        assert buf == bytearray(b"abc\0\0\0\0xyz")
        arr = array.array("i", [0, 0, 0, 0])
        a.send_bytes(array.array("i", [7, 8]))
        assert b.recv_bytes_into(arr, arr.itemsize) == 2 * arr.itemsize
        assert arr.tolist() == [0, 7, 8, 0]
        a.send_bytes(b"")
        assert b.recv_bytes_into(buf, 10) == 0


def test_recv_bytes_into_buffer_too_short_holds_the_whole_message():
    a, b = Pipe()
    with a, b:
        a.send_bytes(b"0123456789")
        buf = bytearray(12)
        with pytest.raises(BufferTooShort) as info:
            b.recv_bytes_into(buf, 5)
        assert info.value.args[0] == b"0123456789"
        assert buf == bytearray(12)
        a.send("next")  # the stream stays in step
        assert b.recv() == "next"


def test_recv_bytes_into_validation():
    a, b = Pipe()
    with a, b:
        with pytest.raises(ValueError, match="negative offset"):
            b.recv_bytes_into(bytearray(4), -1)
        with pytest.raises(ValueError, match="offset too large"):
            b.recv_bytes_into(bytearray(4), 5)
        with pytest.raises(TypeError, match="writable buffer"):
            b.recv_bytes_into(b"read-only")


def test_poll_timeouts():
    a, b = Pipe()
    with a, b:
        assert not b.poll()
        assert not b.poll(0.01)
        a.send_bytes(b"x")
        assert b.poll(None)
        assert b.poll(-1)


def test_plain_pickle_of_a_connection_is_refused_with_advice():
    a, b = Pipe()
    with a, b:
        with pytest.raises(TypeError, match="cannot be pickled with plain pickle.*through manyproc"):
            pickle.dumps(a)


def test_connection_pickles_through_the_fd_sharer_within_one_process():
    from manyproc import resource_sharer

    a, b = Pipe()
    try:
        data = reduction.dumps(a)
        copy = reduction.loads(data)
        with copy:
            assert copy.fileno() != a.fileno()
            copy.send("through a duplicate")
            assert b.recv() == "through a duplicate"
    finally:
        a.close()
        b.close()
        resource_sharer.stop()


# --------------------------------------------------------------------------- addresses


def test_address_type():
    assert connection.address_type(("localhost", 0)) == "AF_INET"
    assert connection.address_type("/tmp/x") == "AF_UNIX"
    assert connection.address_type("\0abstract") == "AF_UNIX"
    assert connection.address_type(b"\0abstract") == "AF_UNIX"
    with pytest.raises(ValueError, match="unrecognized.*tuple for TCP"):
        connection.address_type(42)
    with pytest.raises(ValueError, match="unrecognized"):
        connection.address_type(b"/not/abstract")


def test_arbitrary_address():
    assert connection.arbitrary_address("AF_INET") == ("localhost", 0)
    a = connection.arbitrary_address("AF_UNIX")
    b = connection.arbitrary_address("AF_UNIX")
    assert a != b and isinstance(a, str)
    with pytest.raises(ValueError, match="unrecognized family"):
        connection.arbitrary_address("AF_BLUETOOTH")


def test_family_validation():
    with pytest.raises(ValueError, match="only on Windows"):
        Listener(family="AF_PIPE")
    with pytest.raises(ValueError, match="not recognized"):
        Client(("localhost", 1), family="AF_FOO")


def test_authkey_type_errors():
    with pytest.raises(TypeError, match="authkey should be a byte string"):
        Listener(authkey="text")
    with pytest.raises(TypeError, match="authkey should be a byte string"):
        Client("/nowhere", authkey="text")


def test_unix_listener_removes_its_socket_file():
    listener = Listener()
    path = listener.address
    assert connection.address_type(path) == "AF_UNIX"
    assert os.path.exists(path)
    listener.close()
    assert not os.path.exists(path)
    listener.close()
    with pytest.raises(OSError, match="listener is closed"):
        listener.accept()


def test_tcp_listener_reports_real_port_and_last_accepted():
    with Listener(("127.0.0.1", 0)) as listener:
        host, port = listener.address
        assert host == "127.0.0.1" and port > 0
        assert listener.last_accepted is None
        t = threading.Thread(target=lambda: listener.accept().send("hi"))
        t.start()
        with Client(listener.address) as c:
            assert c.recv() == "hi"
        t.join()
        assert listener.last_accepted[0] == "127.0.0.1"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract sockets are Linux's")
def test_abstract_unix_address():
    name = f"\0manyproc-test-{os.getpid()}"
    with Listener(name) as listener:
        t = threading.Thread(target=lambda: listener.accept().send("abstract"))
        t.start()
        with Client(name) as c:
            assert c.recv() == "abstract"
        t.join()


def test_client_to_nowhere_says_so():
    with pytest.raises(FileNotFoundError, match="cannot connect to.*Listener running"):
        Client("/nonexistent/manyproc.sock")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectionRefusedError, match="cannot connect"):
        Client(("127.0.0.1", port))


def test_listener_max_message_size():
    with Listener(max_message_size=100) as listener:
        t = threading.Thread(target=lambda: listener.accept().send_bytes(b"x" * 200))
        t.start()
        with Client(listener.address, max_message_size=10) as c:
            with pytest.raises(OSError, match="max_message_size=10"):
                c.recv_bytes()
        t.join()
    with pytest.raises(ValueError, match="max_message_size"):
        Listener(max_message_size=-1)


def test_tcp_connections_disable_nagle():
    with Listener(("127.0.0.1", 0)) as listener:
        box = []
        t = threading.Thread(target=lambda: box.append(listener.accept()))
        t.start()
        with Client(listener.address) as c:
            t.join()
            for conn in (c, box[0]):
                s = socket.socket(fileno=os.dup(conn.fileno()))
                with s:
                    assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        box[0].close()
