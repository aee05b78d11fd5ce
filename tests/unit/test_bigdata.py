"""Big buffers through shared memory, in one process: format, lifetime, errors, fallbacks."""

from __future__ import annotations

import errno
import os
import pickle
import socket
import sys

import pytest

from manyproc import _bigdata, connection, reduction, resource_tracker
from manyproc._bigdata import SharedBufferError
from manyproc._os import shm
from manyproc._os.tracker import Ledger

np = pytest.importorskip("numpy")

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20
T = _bigdata.DEFAULT_THRESHOLD
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


@pytest.fixture(autouse=True)
def default_threshold():
    saved = _bigdata._threshold, _bigdata._explicit
    _bigdata.set_threshold(T)
    yield
    _bigdata._threshold, _bigdata._explicit = saved


def segments():
    """This family's message segments that exist now."""
    return {e for e in shm.list_named_objects() if e[len(shm.NAME_PREFIX):].lstrip(
        "0123456789abcdef").startswith(shm.BUFFER_KIND)}


def through_shm(obj):
    """Pickle as a Pipe would; assert it became a reference; return it."""
    out = _bigdata.dumps_parts(obj)
    assert type(out) is _bigdata._Reference, "expected a shared-memory reference"
    assert len(out) < 4096  # a name, the tracker address and ~12 bytes per buffer
    return out


def mapped_from_shm(arr) -> bool:
    """True if the array's memory lies in a (deleted) /dev/shm mapping of this process."""
    address = arr.__array_interface__["data"][0]
    with open("/proc/self/maps") as f:
        for line in f:
            span, *rest = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in span.split("-"))
            if lo <= address < hi:
                return "/dev/shm/" in line
    return False


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("make", [
    lambda: np.arange(T // 8, dtype=np.float64),
    lambda: np.arange(3 * T // 4, dtype=np.int32).reshape(3, -1),
    lambda: np.asfortranarray(np.arange(T // 4, dtype=np.float32).reshape(512, -1)),
    lambda: np.zeros(T, dtype=[("a", "i4"), ("b", "f4")]),
    lambda: np.ones(T // 16, dtype=np.complex128),
], ids=["f8", "i4-2d", "f4-fortran", "structured", "complex"])
def test_numpy_arrays_arrive_equal_writable_and_on_the_mapping(make):
    arr = make()
    back = pickle.loads(through_shm(arr))
    assert back.dtype == arr.dtype and back.shape == arr.shape
    assert back.flags.f_contiguous == arr.flags.f_contiguous
    np.testing.assert_array_equal(back, arr)
    assert back.flags.writeable
    back.reshape(-1)[:1] = back.reshape(-1)[1:2]  # the receiver owns it now
    if sys.platform.startswith("linux"):
        assert mapped_from_shm(back)
    assert not segments()


def test_read_only_arrays_stay_read_only():
    arr = np.arange(T // 4, dtype=np.float32)
    arr.flags.writeable = False
    back = pickle.loads(through_shm(arr))
    np.testing.assert_array_equal(back, arr)
    assert not back.flags.writeable


@pytest.mark.parametrize("kind", [bytes, bytearray])
def test_bytes_and_bytearray_keep_their_type(kind):
    data = kind(os.urandom(T + 1))
    back = pickle.loads(through_shm(data))
    assert type(back) is kind and back == data


def test_a_mixed_message_keeps_structure_identity_and_small_parts():
    arr = np.arange(T // 8, dtype=np.float64)
    blob = os.urandom(300_000)
    msg = {"a": arr, "again": arr, "blob": blob, "ba": bytearray(b"x" * 200_000),
           "text": "é" * 100_000, "n": [1, 2.5, None], "small": b"tiny"}
    back = pickle.loads(through_shm(msg))
    assert back["again"] is back["a"]
    np.testing.assert_array_equal(back["a"], arr)
    assert back["blob"] == blob and back["ba"] == bytearray(b"x" * 200_000)
    assert back["text"] == msg["text"] and back["n"] == [1, 2.5, None]
    assert back["small"] == b"tiny"


def test_many_arrays_share_one_segment_and_stay_aligned():
    arrays = [np.full(70_000 + i, i, dtype=np.uint8) for i in range(40)]
    back = pickle.loads(through_shm(arrays))
    for a, b in zip(arrays, back, strict=True):
        np.testing.assert_array_equal(a, b)
        assert b.__array_interface__["data"][0] % _bigdata.ALIGN == 0


def test_the_sender_can_change_its_data_after_sending():
    arr = np.zeros(T // 8)
    ref = through_shm(arr)
    arr[:] = 7
    assert not pickle.loads(ref).any()


def test_a_snapshot_is_taken_when_the_message_stays_in_the_pipe():
    data = bytearray(200_000)
    parts = _bigdata.dumps_parts(data)
    data[:4] = b"late"
    assert type(parts) is list
    assert pickle.loads(b"".join(parts)) == bytearray(200_000)


# --------------------------------------------------------------------------- threshold


@pytest.mark.parametrize(("size", "diverted"), [
    (T - 1, False), (T, True), (T + 1, True), (4 * T, True),
])
def test_threshold_counts_buffer_bytes(size, diverted):
    out = _bigdata.dumps_parts(bytearray(size))
    assert (type(out) is _bigdata._Reference) is diverted
    assert pickle.loads(out if type(out) is not list else b"".join(out)) == bytearray(size)


def test_buffers_of_one_message_add_up():
    half = [np.ones(T // 16), np.ones(T // 16)]  # two buffers of T/2 each
    assert len(pickle.loads(through_shm(half))) == 2
    assert type(_bigdata.dumps_parts(half[:1])) is not _bigdata._Reference


def test_big_pickles_without_buffers_stay_in_the_pipe():
    assert type(_bigdata.dumps_parts(list(range(T)))) is list
    assert type(_bigdata.dumps_parts("x" * 2 * T)) is list


def test_small_messages_are_plain_bytes():
    assert _bigdata.dumps_parts(("task", 1)) == reduction.dumps(("task", 1))


def test_threshold_none_turns_it_off_and_zero_takes_every_big_buffer():
    _bigdata.set_threshold(None)
    assert type(_bigdata.dumps_parts(bytearray(4 * T))) is list
    _bigdata.set_threshold(0)
    assert reduction.get_shm_threshold() == 0
    ref = _bigdata.dumps_parts(bytearray(70_000))
    assert type(ref) is _bigdata._Reference
    assert pickle.loads(ref) == bytearray(70_000)


@pytest.mark.parametrize(("value", "exc", "text"), [
    (-1, ValueError, ">= 0 bytes"), (1.5, TypeError, "float"), (True, TypeError, "bool"),
    ("1M", TypeError, "str"),
])
def test_bad_thresholds_are_refused(value, exc, text):
    with pytest.raises(exc, match=text):
        reduction.set_shm_threshold(value)


@pytest.mark.parametrize(("text", "value"), [
    ("", T), ("262144", 262144), ("4M", 4 * MiB), ("64kib", 64 << 10), (" 2 G ", 2 << 30),
    ("off", None), ("none", None),
])
def test_threshold_from_the_environment(monkeypatch, text, value):
    monkeypatch.setenv(_bigdata.THRESHOLD_ENV, text)
    monkeypatch.setattr(_bigdata, "_threshold", _bigdata._NOT_READ)
    assert _bigdata.get_threshold() == value


def test_a_malformed_environment_threshold_says_what_to_write(monkeypatch):
    monkeypatch.setenv(_bigdata.THRESHOLD_ENV, "lots")
    monkeypatch.setattr(_bigdata, "_threshold", _bigdata._NOT_READ)
    with pytest.raises(ValueError, match="MANYPROC_SHM_THRESHOLD='lots' is not a size.*1M"):
        _bigdata.get_threshold()


def test_spawned_children_learn_an_explicit_threshold_and_the_family():
    _bigdata.set_threshold(12345)
    state = _bigdata._get_spawn_state()
    assert state == {"family": shm.family_token(), "threshold": (12345,)}
    _bigdata.set_threshold(T)
    _bigdata._set_spawn_state(state)
    assert _bigdata.get_threshold() == 12345


# --------------------------------------------------------------------------- lifetime


def test_receiving_unlinks_at_once_and_cancels_the_deferred_removal():
    ref = through_shm(np.ones(T))
    name = ref.segment
    assert segments() == {name[1:]}
    assert any(r["name"] == name and r.get("after") for r in resource_tracker._tracked())
    back = pickle.loads(ref)
    assert not segments()
    assert _wait(lambda: all(r["name"] != name for r in resource_tracker._tracked()))
    del back


def _wait(predicate, timeout=10.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


@linux_only
def test_the_mapping_goes_when_the_last_array_dies():
    back = pickle.loads(through_shm(np.ones(T)))
    view = back[10:20]
    del back
    assert mapped_from_shm(view)
    address = view.__array_interface__["data"][0]
    del view

    def still_mapped():
        with open("/proc/self/maps") as f:
            for line in f:
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                if lo <= address < hi and "/dev/shm/" in line:
                    return True
        return False

    assert not still_mapped()


@linux_only
def test_the_receiver_keeps_only_the_arrays_region():
    msg = (np.ones(T // 8), os.urandom(8 * T))  # 1 MiB array, 8 MiB bytes
    back = pickle.loads(through_shm(msg))
    with open("/proc/self/maps") as f:
        spans = [line.split()[0] for line in f if "/dev/shm/" in line and "(deleted)" in line]
    sizes = [int(b, 16) - int(a, 16) for a, b in (s.split("-") for s in spans)]
    assert max(sizes) < 2 * T  # the 8 MiB of bytes were copied out and truncated away
    del back


def test_a_reference_loads_once():
    ref = through_shm(bytearray(T))
    pickle.loads(ref)
    with pytest.raises(SharedBufferError, match="no longer exists.*loaded only once"):
        pickle.loads(ref)


def test_release_frees_a_payload_never_sent():
    ref = through_shm(bytearray(T))
    assert segments()
    _bigdata.release(ref)
    assert not segments()
    _bigdata.release(b"plain")  # not a reference: nothing to do


def test_dumps_gives_bytes_or_a_reference():
    assert pickle.loads(_bigdata.dumps(bytearray(200_000))) == bytearray(200_000)
    ref = _bigdata.dumps(bytearray(T))
    assert isinstance(ref, bytes) and len(ref) < 400
    assert pickle.loads(ref) == bytearray(T)


# --------------------------------------------------------------------------- fallbacks


def test_a_full_dev_shm_falls_back_to_the_pipe(monkeypatch):
    def full(fd, iov, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_bigdata, "_fill", full)
    monkeypatch.setattr(_bigdata, "_fallback_said", set())
    out = _bigdata.dumps_parts(bytearray(T))
    assert type(out) is list and pickle.loads(b"".join(out)) == bytearray(T)
    assert not segments()


def test_no_tracker_falls_back_to_the_pipe(monkeypatch):
    monkeypatch.setattr(resource_tracker, "_defer_new", lambda *args: False)
    monkeypatch.setattr(_bigdata, "_fallback_said", set())
    out = _bigdata.dumps_parts(bytearray(T))
    assert type(out) is list
    assert not segments()


def test_an_interrupted_copy_leaves_nothing_behind(monkeypatch):
    def interrupted(fd, iov, size):
        raise KeyboardInterrupt

    monkeypatch.setattr(_bigdata, "_fill", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _bigdata.dumps_parts(bytearray(T))
    assert not segments()


# --------------------------------------------------------------------------- malformed references


def forged(*args):
    return pickle.dumps(_bigdata._Call(args), protocol=5)


@pytest.mark.parametrize(("args", "text"), [
    ((2, "/x", None, 1, 0, 1, ()), "format 2.*same manyproc version"),
    ((1, "/etc/passwd", None, 10, 0, 1, ()), "not the name of a manyproc message segment"),
    ((1, "/mpc1o" + "0" * 12, 5, 10, 0, 1, ()), "tracker address"),
    ((1, "/mpc1o" + "0" * 12, None, -1, 0, 1, ()), "size -1"),
    ((1, "/mpc1o" + "0" * 12, None, 10, 8, 8, ()), "runs past the end"),
    ((1, "/mpc1o" + "0" * 12, None, 10, 0, 1, [(0, 1, "w")]), "not a tuple"),
    ((1, "/mpc1o" + "0" * 12, None, 10, 4, 1, ((0, 8, "w"),)), "outside its region"),
    ((1, "/mpc1o" + "0" * 12, None, 10, 4, 1, ((0, 1, "z"),)), "not \\(offset, size, kind\\)"),
])
def test_malformed_references_are_refused_before_touching_anything(args, text):
    with pytest.raises(SharedBufferError, match=text):
        pickle.loads(forged(*args))


def test_a_missing_segment_says_why():
    name = shm.new_name(shm.BUFFER_KIND)
    with pytest.raises(SharedBufferError, match="no longer exists"):
        pickle.loads(forged(1, name, None, 100, 0, 10, ()))


def test_a_size_mismatch_is_refused_and_the_segment_removed():
    name = shm.new_name(shm.BUFFER_KIND)
    fd = shm.open_segment(name, os.O_CREAT | os.O_EXCL | os.O_RDWR)
    try:
        os.ftruncate(fd, 4096)
    finally:
        os.close(fd)
    with pytest.raises(SharedBufferError, match="holds 4096 bytes.*announces 100000"):
        pickle.loads(forged(1, name, None, 100_000, 0, 10, ()))
    assert not segments()


def test_an_error_is_an_unpickling_error():
    assert issubclass(SharedBufferError, pickle.UnpicklingError)


# --------------------------------------------------------------------------- connections


def test_pipe_ends_use_shared_memory_raw_connections_and_sockets_do_not():
    a, b = connection.Pipe()
    r, w = connection.Pipe(duplex=False)
    c, d = connection.Pipe(shm_buffers=False)
    s1, s2 = socket.socketpair()
    raw = connection.Connection(s1.detach())
    try:
        assert a._shm_buffers and b._shm_buffers and r._shm_buffers and w._shm_buffers
        assert not c._shm_buffers and not raw._shm_buffers
        assert connection.Connection(os.dup(a.fileno()), shm_buffers=True)._shm_buffers
    finally:
        for conn in (a, b, r, w, c, d, raw):
            conn.close()
        s2.close()


def test_pickled_connections_keep_the_setting():
    a, b = connection.Pipe()
    c, d = connection.Pipe(shm_buffers=False)
    try:
        assert connection._reduce_connection(a)[1][3:] == (True,)
        assert connection._reduce_connection(c)[1][3:] == ()
    finally:
        for conn in (a, b, c, d):
            conn.close()


def test_send_and_recv_through_a_pipe_in_one_process():
    r, w = connection.Pipe(duplex=False)
    with r, w:
        arr = np.arange(T // 8, dtype=np.float64)
        w.send(arr)
        assert r.poll(5)
        np.testing.assert_array_equal(r.recv(), arr)
        w.send(("small", 1))
        assert r.recv() == ("small", 1)


def test_recv_bytes_gives_the_reference_which_unpickles():
    r, w = connection.Pipe(duplex=False)
    with r, w:
        w.send(bytearray(T))
        raw = r.recv_bytes()
        assert len(raw) < 400
        assert pickle.loads(raw) == bytearray(T)


def test_send_bytes_never_uses_shared_memory():
    import threading

    r, w = connection.Pipe(duplex=False)
    got = []
    reader = threading.Thread(target=lambda: got.append(r.recv_bytes()))
    reader.start()
    with r, w:
        w.send_bytes(b"\x01" * (2 * T))
        reader.join(30)
        assert got == [b"\x01" * (2 * T)]


def test_a_failed_send_frees_its_segment():
    a, b = connection.Pipe()
    b.close()
    with a, pytest.raises(OSError):
        a.send(bytearray(T))
    assert not segments()


def test_a_malformed_reference_on_a_pipe_is_an_error_and_the_pipe_goes_on():
    r, w = connection.Pipe(duplex=False)
    with r, w:
        w.send_bytes(forged(1, shm.new_name(shm.BUFFER_KIND), None, 100, 0, 10, ()))
        w.send("next")
        with pytest.raises(SharedBufferError):
            r.recv()
        assert r.recv() == "next"


# --------------------------------------------------------------------------- tracker ledger


def test_ledger_undefer_after_defer_forgets_it():
    ledger = Ledger()
    ledger.connect(1, pid=10)
    key = ("shared_memory", "/n")
    assert ledger.defer(1, key, [10, 11]) == []
    ledger.undefer(key)
    assert ledger.process_ended(10) == [] and ledger.process_ended(11) == []
    assert ledger.idle() is False  # the connection is still there
    assert ledger.disconnect(1) == [] and ledger.idle()


def test_ledger_undefer_before_defer_drops_the_defer():
    ledger = Ledger()
    key = ("shared_memory", "/n")
    ledger.undefer(key)           # the receiver's line arrived first
    assert ledger.defer(1, key, [10]) == []
    assert ledger.waiting == [] and ledger.undeferred == {}


def test_ledger_remembers_a_bounded_number_of_early_undefers(monkeypatch):
    monkeypatch.setattr(Ledger, "MAX_UNDEFERRED", 3)
    ledger = Ledger()
    for i in range(5):
        ledger.undefer(("shared_memory", f"/n{i}"))
    assert list(ledger.undeferred) == [("shared_memory", f"/n{i}") for i in (2, 3, 4)]


def test_ledger_drops_a_deferral_whose_name_is_missing_twice():
    ledger = Ledger()
    created, consumed = ("shared_memory", "/a"), ("shared_memory", "/b")
    ledger.defer(1, created, [10])
    ledger.defer(1, consumed, [10])
    present = {created}
    ledger.drop_missing(lambda key: key in present)     # /b missing once: kept
    assert [key for key, _ in ledger.waiting] == [created, consumed]
    ledger.drop_missing(lambda key: key in present)     # missing twice: dropped
    assert [key for key, _ in ledger.waiting] == [created]


def test_ledger_keeps_a_deferral_made_just_before_its_name_was_created():
    ledger = Ledger()
    key = ("shared_memory", "/c")
    ledger.defer(1, key, [10])
    ledger.drop_missing(lambda k: False)   # deferred, not created yet
    ledger.drop_missing(lambda k: True)    # created now
    ledger.drop_missing(lambda k: True)
    assert [k for k, _ in ledger.waiting] == [key]


def test_by_reference_pickling_for_results():
    ref = _bigdata.dumps(np.ones(T // 8), by_value=False)
    assert type(ref) is _bigdata._Reference
    assert (pickle.loads(ref) == 1).all()
    assert pickle.loads(_bigdata.dumps(("small", 1), by_value=False)) == ("small", 1)
    with pytest.raises((pickle.PicklingError, AttributeError)):
        _bigdata.dumps(lambda: 1, by_value=False)  # the standard pickle's answer
    assert pickle.loads(_bigdata.dumps(lambda: 1))() == 1  # by value: cloudpickle



@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="statvfs of /dev/shm")
def test_too_little_room_in_dev_shm_uses_the_pipe_without_trying(monkeypatch):
    class Full:
        f_bavail, f_frsize = 10, 4096

    monkeypatch.setattr(_bigdata.os, "statvfs", lambda path: Full())
    monkeypatch.setattr(_bigdata, "_fallback_said", set())
    monkeypatch.setattr(_bigdata, "_fill", lambda *a: pytest.fail("should not copy"))
    out = _bigdata.dumps_parts(bytearray(T))
    assert type(out) is list
    assert not segments()


# --------------------------------------------------------------------------- backpressure


def test_a_lagging_reader_holds_the_sender_up(monkeypatch):
    import threading

    monkeypatch.setattr(_bigdata, "BACKLOG_MIN", 0)  # at most two messages in flight
    r, w = connection.Pipe(duplex=False)
    with r, w:
        w.send(np.full(T // 8, 1.0))
        w.send(np.full(T // 8, 2.0))
        third = threading.Thread(target=w.send, args=(np.full(T // 8, 3.0),), daemon=True)
        third.start()
        third.join(0.3)
        assert third.is_alive(), "the third message should wait for the reader"
        assert (r.recv() == 1.0).all()
        third.join(10)
        assert not third.is_alive()
        assert (r.recv() == 2.0).all() and (r.recv() == 3.0).all()
    assert not segments()


@pytest.mark.parametrize("duplex", [True, False])
def test_a_closed_reader_frees_what_it_never_read(monkeypatch, duplex):
    monkeypatch.setattr(_bigdata, "BACKLOG_MIN", 0)
    a, b = connection.Pipe(duplex=duplex)
    reader, writer = (b, a) if duplex else (a, b)
    with writer:
        writer.send(bytearray(T))
        writer.send(bytearray(T))
        assert len(segments()) == 2
        reader.close()
        with pytest.raises(BrokenPipeError):
            writer.send(bytearray(T))
    assert not segments()


def test_the_mapping_only_path_used_where_segments_take_no_read_write(monkeypatch):
    """macOS reaches shared memory only through mappings: that path, exercised here."""
    monkeypatch.setattr(_bigdata, "_LINUX", False)
    arr = np.arange(T // 8, dtype=np.float64)
    msg = {"a": arr, "b": os.urandom(200_000), "ba": bytearray(b"y" * 300_000)}
    ref = through_shm(msg)
    assert _bigdata._exists(ref.segment)
    back = pickle.loads(ref)
    assert not _bigdata._exists(ref.segment)
    np.testing.assert_array_equal(back["a"], arr)
    assert back["a"].flags.writeable
    assert back["b"] == msg["b"] and back["ba"] == msg["ba"]
