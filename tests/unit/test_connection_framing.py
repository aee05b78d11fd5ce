"""Framing over in-memory links: whole messages, truncated frames, lying headers, garbage."""

from __future__ import annotations

import os
import socket
import struct
import threading
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from manyproc import _wire
from manyproc.connection import Connection, Pipe

pytestmark = pytest.mark.timeout(30)


def raw_pair():
    """A Connection reading from a socket whose other end the test writes raw bytes to."""
    a, b = socket.socketpair()
    return Connection(a.detach()), b


def feed(sock, data, close=True):
    sock.sendall(data)
    if close:
        sock.close()


@pytest.mark.parametrize("size", [0, 1, 100, _wire.CONCAT_LIMIT - 1, _wire.CONCAT_LIMIT,
                                  _wire.CONCAT_LIMIT + 1, 3 * 2**20 + 7])
@pytest.mark.parametrize("duplex", [True, False])
def test_messages_of_every_size_arrive_whole(size, duplex):
    r, w = Pipe(duplex)
    payload = os.urandom(size)
    t = threading.Thread(target=w.send_bytes, args=(payload,))
    t.start()
    assert r.recv_bytes() == payload
    t.join()
    t = threading.Thread(target=w.send, args=(payload,))
    t.start()
    assert r.recv() == payload
    t.join()


def test_frame_layout_is_the_standard_librarys():
    conn, peer = raw_pair()
    with conn:
        conn.send_bytes(b"abc")
        assert peer.recv(100) == b"\x00\x00\x00\x03abc"
    peer.close()


def test_large_frame_escape_is_read():
    conn, peer = raw_pair()
    payload = b"0123456789"
    feed(peer, struct.pack("!i", -1) + struct.pack("!Q", len(payload)) + payload)
    with conn:
        assert conn.recv_bytes() == payload


def test_header_for_large_sizes_uses_the_escape():
    assert _wire.header_for(5) == b"\x00\x00\x00\x05"
    big = 2**31
    assert _wire.header_for(big) == b"\xff\xff\xff\xff" + struct.pack("!Q", big)


def test_clean_end_of_file_is_eoferror():
    conn, peer = raw_pair()
    peer.close()
    with conn, pytest.raises(EOFError):
        conn.recv()


@pytest.mark.parametrize("data, what", [
    (b"\x00\x00", "a message header"),
    (b"\x00\x00\x00\x10abc", "a message"),
    (b"\xff\xff\xff\xff\x00\x00", "a message header"),
    (b"\x00\x01\x00\x00" + b"x" * 1000, "a message"),
])
def test_truncated_frame_is_a_clear_oserror(data, what):
    conn, peer = raw_pair()
    feed(peer, data)
    with conn, pytest.raises(OSError, match=f"got end of file during {what}") as info:
        conn.recv_bytes()
    assert not isinstance(info.value, EOFError)
    assert "received" in str(info.value)


def test_negative_length_is_a_malformed_frame():
    conn, peer = raw_pair()
    feed(peer, struct.pack("!i", -7) + b"junk")
    with conn, pytest.raises(_wire.FrameError, match="negative length"):
        conn.recv_bytes()


def test_absurd_length_is_rejected_before_any_allocation():
    conn, peer = raw_pair()
    feed(peer, struct.pack("!i", -1) + struct.pack("!Q", 2**62))
    with conn, pytest.raises(_wire.FrameError, match="more than any real message"):
        conn.recv_bytes()


def test_lying_header_does_not_allocate_what_it_announces():
    conn, peer = raw_pair()
    feed(peer, struct.pack("!i", -1) + struct.pack("!Q", 2**40) + b"only a little")
    tracemalloc.start()
    try:
        with conn, pytest.raises(OSError, match="got end of file"):
            conn.recv_bytes()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= _wire.PREALLOCATE_LIMIT + (1 << 20)


def test_maxlength_refuses_a_long_message_and_stops_reading():
    r, w = Pipe(duplex=False)
    w.send_bytes(b"x" * 100)
    with pytest.raises(OSError, match="bad message length.*100 bytes.*maxlength=10"):
        r.recv_bytes(10)
    assert r.closed  # a read-only end cannot be resynchronised: it is closed
    a, b = Pipe()
    a.send_bytes(b"y" * 100)
    with pytest.raises(OSError, match="bad message length"):
        b.recv_bytes(10)
    assert not b.readable and b.writable  # duplex: still usable for sending


def test_max_message_size_guards_recv():
    conn, peer = raw_pair()
    conn._set_max_size(8)
    feed(peer, struct.pack("!i", 9) + b"123456789")
    with pytest.raises(OSError, match="max_message_size=8"):
        conn.recv()


def test_several_frames_in_one_write_are_read_one_by_one():
    r, w = Pipe(duplex=False)
    payloads = [b"", b"a", b"bb" * 1000, os.urandom(_wire.CONCAT_LIMIT + 5)]
    t = threading.Thread(target=_wire.write_frames, args=(w.fileno(), payloads))
    t.start()
    for p in payloads:
        assert r.recv_bytes() == p
    t.join()
    assert not r.poll()


def test_write_frames_batch_of_many_small_messages():
    r, w = Pipe(duplex=False)
    payloads = [str(i).encode() for i in range(600)]
    _wire.write_frames(w.fileno(), payloads)
    assert [r.recv_bytes() for _ in payloads] == payloads


def test_short_writes_are_resumed(monkeypatch):
    real_write = os.write

    def short_write(fd, data):
        return real_write(fd, bytes(memoryview(data)[:1000]))

    def short_writev(fd, buffers):
        return short_write(fd, bytes(memoryview(buffers[0])))

    r, w = Pipe(duplex=False)
    big = os.urandom(_wire.CONCAT_LIMIT + 10)
    received = []
    t = threading.Thread(target=lambda: received.extend(r.recv_bytes() for _ in range(3)))
    t.start()
    monkeypatch.setattr(os, "write", short_write)
    monkeypatch.setattr(os, "writev", short_writev)
    _wire.write_frames(w.fileno(), [b"hello", b"world!" * 300])
    _wire.write_frame(w.fileno(), big)
    monkeypatch.undo()
    t.join()
    assert received == [b"hello", b"world!" * 300, big]


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
def test_garbage_never_hangs_and_fails_cleanly(data):
    conn, peer = raw_pair()
    feed(peer, data)
    with conn:
        try:
            while True:
                conn.recv_bytes()
        except EOFError:
            pass
        except OSError as exc:
            assert "end of file" in str(exc) or isinstance(exc, _wire.FrameError)


def test_payloads_beyond_the_preallocation_limit_are_gathered_in_chunks(monkeypatch):
    monkeypatch.setattr(_wire, "PREALLOCATE_LIMIT", 100_000)
    r, w = Pipe()
    payload = os.urandom(350_001)
    t = threading.Thread(target=w.send_bytes, args=(payload,))
    t.start()
    assert r.recv_bytes() == payload
    t.join()
    r.close()
    w.close()


def test_payload_given_as_parts_is_one_frame():
    r, w = Pipe()
    parts = [b"abc", os.urandom(_wire.CONCAT_LIMIT), b"xyz"]
    t = threading.Thread(target=_wire.write_frame, args=(w.fileno(), parts))
    t.start()
    assert r.recv_bytes() == b"".join(parts)
    t.join()
    _wire.write_frame(w.fileno(), [b"small", b" parts"])
    assert r.recv_bytes() == b"small parts"
    _wire.write_frames(w.fileno(), [b"one", [b"t", b"wo"]])
    assert [r.recv_bytes(), r.recv_bytes()] == [b"one", b"two"]
    r.close()
    w.close()
