"""connection.wait(): readiness of connections, sockets, fds and fileno() objects."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from manyproc.connection import Pipe, wait

pytestmark = pytest.mark.timeout(30)


class HasFileno:
    def __init__(self, fd):
        self.fd = fd

    def fileno(self):
        return self.fd


def test_nothing_ready_returns_empty_after_timeout():
    a, b = Pipe()
    with a, b:
        start = time.monotonic()
        assert wait([a, b], timeout=0.05) == []
        assert time.monotonic() - start >= 0.04
        assert wait([a, b], timeout=0) == []
        assert wait([a, b], timeout=-1) == []


def test_returns_exactly_the_ready_objects_in_given_order():
    pairs = [Pipe() for _ in range(4)]
    try:
        pairs[2][0].send(1)
        pairs[0][0].send(2)
        ends = [b for _, b in pairs]
        assert wait(ends, timeout=1) == [ends[0], ends[2]]
        assert wait(reversed(ends), timeout=1) == [ends[2], ends[0]]
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_mixed_kinds_of_objects():
    a, b = Pipe()
    r, w = os.pipe()
    s1, s2 = socket.socketpair()
    r2, w2 = os.pipe()
    try:
        os.write(w, b"x")
        s2.send(b"y")
        a.send("z")
        other = HasFileno(r2)
        ready = wait([b, r, s1, other], timeout=1)
        assert ready == [b, r, s1]
        os.write(w2, b"!")
        assert wait([other], timeout=1) == [other]
    finally:
        for fd in (r, w, r2, w2):
            os.close(fd)
        s1.close()
        s2.close()
        a.close()
        b.close()


def test_end_of_file_counts_as_ready():
    r, w = Pipe(duplex=False)
    w.close()
    with r:
        assert wait([r], timeout=1) == [r]


def test_wakes_up_when_data_arrives_later():
    a, b = Pipe()
    with a, b:
        timer = threading.Timer(0.05, a.send, args=("late",))
        timer.start()
        assert wait([b]) == [b]
        assert b.recv() == "late"
        timer.join()


def test_same_object_twice_and_duplicate_fds():
    a, b = Pipe()
    with a, b:
        a.send(1)
        assert wait([b, b, b.fileno()], timeout=1) == [b, b, b.fileno()]


def test_bad_objects_are_rejected_clearly():
    with pytest.raises(ValueError, match="cannot wait on 'text'.*Connections, sockets"):
        wait(["text"])
    with pytest.raises(ValueError, match="invalid file descriptor -1"):
        wait([-1])
    a, b = Pipe()
    a.close()
    with pytest.raises(OSError, match="handle is closed"):
        wait([a, b], timeout=0)
    b.close()


def test_empty_list_with_timeout():
    assert wait([], timeout=0.01) == []
