"""The pickler: by-value functions, our reducers, and the explanations of failures."""

from __future__ import annotations

import pickle
import socket
import threading

import pytest

from manyproc import reduction


def module_level(x):
    return x * 2


def test_plain_objects_round_trip():
    value = {"a": [1, 2.5, "x", b"y", None], "b": (True, frozenset({1}))}
    assert reduction.loads(reduction.dumps(value)) == value


def test_importable_functions_travel_by_reference():
    data = reduction.dumps(module_level)
    assert b"module_level" in data and len(data) < 200
    assert reduction.loads(data) is module_level


def test_lambdas_closures_and_local_classes_travel_by_value():
    offset = 10

    def closure(x):
        return x + offset

    class Local:
        def __init__(self):
            self.v = 3

    for fn, arg, expected in ((lambda x: x + 1, 1, 2), (closure, 1, 11)):
        assert reduction.loads(reduction.dumps(fn))(arg) == expected
    assert reduction.loads(reduction.dumps(Local())).v == 3


def test_forking_pickler_api():
    buf = reduction.ForkingPickler.dumps([1, 2])
    assert isinstance(buf, memoryview)
    assert reduction.ForkingPickler.loads(buf) == [1, 2]


class Holder:
    def __init__(self):
        self.items = [1, {"lock": threading.Lock()}]


def test_unpicklable_error_names_the_path_and_keeps_the_type():
    with pytest.raises(TypeError) as info:
        reduction.dumps({"job": Holder()})
    message = str(info.value)
    assert "['job'].items[1]['lock']" in message
    assert "manyproc.Lock" in message


def test_generator_hint():
    gen = (i for i in range(3))
    with pytest.raises(TypeError, match="generators cannot be pickled"):
        reduction.dumps([gen])


def test_out_of_band_buffers():
    big = pickle.PickleBuffer(bytearray(b"x" * 1000))
    buffers = []
    data = reduction.dumps(big, buffer_callback=buffers.append)
    assert len(buffers) == 1 and len(data) < 100
    assert bytes(reduction.loads(data, buffers=buffers)) == b"x" * 1000


def test_assert_spawning_outside_start_up():
    with pytest.raises(RuntimeError, match="only be shared between processes through inheritance"):
        reduction.assert_spawning(object())


def test_sendfds_recvfds_over_socketpair(tmp_path):
    a, b = socket.socketpair()
    path = tmp_path / "f"
    path.write_text("hello")
    with a, b, open(path) as f:
        reduction.sendfds(a, [f.fileno()])
        (fd,) = reduction.recvfds(b, 1)
        with open(fd) as g:
            assert g.read() == "hello"
