"""The worker wire protocol and remote exceptions, without processes."""

from __future__ import annotations

import pickle
import sys
import threading

import pytest

from manyproc._backends import worker as wire
from manyproc._backends.base import JobRecord
from manyproc._backends.local import FunctionCache
from manyproc._backends.remote import (
    MaybeEncodingError,
    RemoteTaskError,
    RemoteTraceback,
    add_note,
    rebuild_error,
)


def frames(*messages):
    return b"".join(wire.frame(pickle.dumps(m)) for m in messages)


def test_frame_buffer_cuts_whole_messages_from_any_split():
    data = frames((1, "a"), (2, list(range(100))), (3, b"x" * 70000))
    for step in (1, 7, 100, 4096, len(data)):
        buffer = wire.FrameBuffer()
        out = []
        for i in range(0, len(data), step):
            buffer.feed(data[i:i + step], out)
        assert out == [(1, "a"), (2, list(range(100))), (3, b"x" * 70000)]
        assert not buffer.data


def test_frame_buffer_asks_for_the_rest_of_a_big_message():
    data = frames(b"y" * 1_000_000)
    buffer = wire.FrameBuffer()
    out = []
    buffer.feed(data[:100], out)
    assert out == [] and buffer.wanted() >= len(data) - 100


def raise_and_payload(exc):
    try:
        raise exc
    except BaseException as caught:  # noqa: BLE001
        return wire._error_payload(caught, 3)


def test_a_picklable_exception_comes_back_as_itself():
    payload = raise_and_payload(KeyError("k"))
    assert payload[0] == wire.ERR_PICKLED and payload[5] == 3
    error = rebuild_error(payload, "raised in worker pid 1 while running f on item 3")
    assert type(error) is KeyError and error.args == ("k",)
    assert isinstance(error.__cause__, RemoteTraceback)
    assert "raise exc" in error.__cause__.tb and "KeyError" in str(error.__cause__)
    if sys.version_info >= (3, 11):
        assert error.__notes__ == ["raised in worker pid 1 while running f on item 3"]


class TwoArgs(Exception):
    def __init__(self, a, b):
        super().__init__(a)


class Locked(Exception):
    def __init__(self):
        super().__init__("locked")
        self.lock = threading.Lock()


@pytest.mark.parametrize("exc, name", [(TwoArgs(1, 2), "TwoArgs"), (Locked(), "Locked"),
                                       (SystemExit(3), "SystemExit")])
def test_exceptions_that_cannot_travel_become_text(exc, name):
    payload = raise_and_payload(exc)
    assert payload[0] == wire.ERR_TEXT
    error = rebuild_error(payload, "note")
    assert isinstance(error, RemoteTaskError)
    assert name in error.type_name and name in str(error)
    assert isinstance(error.__cause__, RemoteTraceback)
    assert pickle.loads(pickle.dumps(error)).type_name == error.type_name


def test_an_exception_the_parent_cannot_load_becomes_text():
    payload = list(raise_and_payload(ValueError("v")))
    payload[1] = b"not a pickle"
    error = rebuild_error(tuple(payload), "note")
    assert isinstance(error, RemoteTaskError) and "ValueError" in str(error)


def test_results_travel_by_reference_only():
    assert pickle.loads(wire.dumps_result((1, [2, 3]))) == (1, [2, 3])
    with pytest.raises(Exception):
        wire.dumps_result(lambda: 42)
    error = MaybeEncodingError(TypeError("cannot pickle"), "<function <lambda>>")
    assert "cannot pickle" in str(error) and "<lambda>" in str(error)
    assert error.exc and error.value


def test_add_note_falls_back_to_the_message():
    error = ValueError("text")
    add_note(error, "where")
    if sys.version_info >= (3, 11):
        assert error.__notes__ == ["where"]
    else:  # pragma: no cover
        assert str(error) == "text\nwhere"


def test_function_cache_pickles_each_function_once():
    cache = FunctionCache(size=2)
    first = JobRecord(len, wire.CALL_ONE, "len", "map")
    again = JobRecord(len, wire.CALL_ONE, "len", "map")
    starred = JobRecord(len, wire.CALL_STAR, "len", "map")
    for record in (first, again, starred):
        cache.prepare(record)
    assert first.fkey == again.fkey != starred.fkey
    assert pickle.loads(first.fblob) == (len, wire.CALL_ONE)
    local = JobRecord(lambda x: x + 1, wire.CALL_ONE, "<lambda>", "map")
    cache.prepare(local)  # by value, through cloudpickle
    func, _ = pickle.loads(local.fblob)
    assert func(1) == 2
    bad = JobRecord(threading.Lock().acquire, wire.CALL_ONE, "acquire", "map")
    with pytest.raises(TypeError, match="cannot be sent to the worker"):
        cache.prepare(bad)

