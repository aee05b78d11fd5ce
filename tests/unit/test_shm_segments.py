"""Named segments without processes: names, SharedMemory(track=False), the tracker's ledger."""

from __future__ import annotations

import os
import pickle
import sys

import pytest

from manyproc import resource_tracker, shared_memory
from manyproc._os import shm
from manyproc._os.tracker import Ledger
from manyproc.shared_memory import SharedMemory

pytestmark = pytest.mark.timeout(30)

LINUX = sys.platform.startswith("linux")


@pytest.fixture
def segment():
    """An untracked segment (no tracker process needed), unlinked afterwards."""
    made = []

    def make(**kwargs):
        sm = SharedMemory(create=True, track=False, **kwargs)
        made.append(sm)
        return sm

    yield make
    for sm in made:
        sm.close()
        try:
            sm.unlink()
        except FileNotFoundError:
            pass


# --------------------------------------------------------------------------- names


def test_generated_names_carry_prefix_family_and_kind():
    name = shm.new_name("m")
    assert name.startswith("/mpc" + shm.family_token() + "m")
    assert len(name) <= 31   # macOS's limit, leading slash included
    assert shm.new_name("s") != shm.new_name("s")


@pytest.mark.parametrize("bad, exc, text", [
    ("", ValueError, "must not be empty"),
    ("/", ValueError, "must not be empty"),
    ("a/b", ValueError, "may not contain '/'"),
    ("a\0b", ValueError, "NUL"),
    ("x" * 300, ValueError, "too long"),
    (b"bytes", TypeError, "must be a str"),
])
def test_check_name_refuses_bad_names(bad, exc, text):
    with pytest.raises(exc, match=text):
        shm.check_name(bad)


@pytest.mark.skipif(not LINUX, reason="named objects are listed from /dev/shm")
def test_list_named_objects_finds_only_this_family(segment):
    sm = segment(size=16)
    mine = shm.list_named_objects()
    assert sm.name in mine
    assert sm.name in shm.list_named_objects(None)
    assert sm.name not in shm.list_named_objects("ffffffff")
    assert resource_tracker._named_objects() == mine


# --------------------------------------------------------------------------- SharedMemory


def test_create_write_attach_read(segment):
    sm = segment(size=100)
    assert sm.size >= 100 and len(sm.buf) == sm.size
    assert sm.name in repr(sm) and str(sm.size) in repr(sm)
    sm.buf[:5] = b"howdy"
    other = SharedMemory(sm.name)
    assert bytes(other.buf[:5]) == b"howdy"
    other.buf[0:1] = b"H"
    assert bytes(sm.buf[:5]) == b"Howdy"
    other.close()
    assert other.buf is None


def test_attaching_ignores_size(segment):
    sm = segment(size=64)
    other = SharedMemory(sm.name, size=10 * sm.size)
    assert other.size == sm.size
    other.close()


def test_named_creation_and_leading_slash(segment):
    name = f"mpc_unit_{os.getpid()}"
    sm = segment(name=name, size=8)
    assert sm.name == name and sm._name == "/" + name
    again = SharedMemory("/" + name)
    assert again.name == name
    again.close()
    with pytest.raises(FileExistsError):
        SharedMemory(name, create=True, size=8, track=False)


@pytest.mark.parametrize("kwargs, exc, text", [
    ({"create": True, "size": -1}, ValueError, "positive integer"),
    ({"create": True, "size": 0}, ValueError, "different from zero"),
    ({"create": True}, ValueError, "different from zero"),
    ({}, ValueError, "can only be None if create=True"),
    ({"create": True, "size": 1.5}, TypeError, "size must be an int"),
    ({"name": 5}, TypeError, "name must be a str"),
    ({"name": "a/b"}, ValueError, "may not contain"),
])
def test_bad_arguments(kwargs, exc, text):
    with pytest.raises(exc, match=text):
        SharedMemory(**kwargs)


def test_attaching_to_a_missing_name_says_what_to_do():
    with pytest.raises(FileNotFoundError, match="create=True"):
        SharedMemory(f"mpc_missing_{os.getpid()}")


def test_unlink_twice_raises_file_not_found(segment):
    sm = segment(size=8)
    sm.unlink()
    with pytest.raises(FileNotFoundError):
        sm.unlink()


def test_close_with_live_views_explains(segment):
    sm = segment(size=8)
    view = sm.buf[:4]
    with pytest.raises(BufferError, match="delete them before close"):
        sm.close()
    view.release()
    sm.close()


def test_pickle_attaches_by_name(segment):
    sm = segment(size=32)
    sm.buf[:6] = b"pickle"
    clone = pickle.loads(pickle.dumps(sm))
    assert clone.name == sm.name and bytes(clone.buf[:6]) == b"pickle"
    clone.buf[:3] = b"new"
    assert bytes(sm.buf[:3]) == b"new"
    clone.close()
    sm.close()
    sm.unlink()
    with pytest.raises(FileNotFoundError):
        pickle.loads(pickle.dumps(sm))


def test_subclass_may_attach_or_create_with_its_own_flags(segment):
    sm = segment(size=16)

    class OptionalAttach(SharedMemory):
        _flags = os.O_CREAT | os.O_RDWR

    other = OptionalAttach(sm.name)
    assert other.size == sm.size
    other.close()


def test_make_filename_is_the_hook_for_fresh_names(monkeypatch, segment):
    taken = segment(size=8)
    fresh = f"{shared_memory._SHM_NAME_PREFIX}unit{os.getpid()}"
    names = iter(["/" + taken.name, fresh])
    monkeypatch.setattr(shared_memory, "_make_filename", lambda: next(names))
    sm = SharedMemory(create=True, size=8, track=False)
    try:
        assert sm._name == fresh
    finally:
        sm.close()
        sm.unlink()


def test_untracked_segment_does_not_touch_the_tracker(segment):
    before = resource_tracker._state.conn
    segment(size=8)
    assert resource_tracker._state.conn is before


# --------------------------------------------------------------------------- tracker ledger


def key(name, rtype="shared_memory"):
    return (rtype, name)


def test_ledger_removes_what_a_dead_connection_owned():
    ledger = Ledger()
    ledger.connect(1, pid=100)
    ledger.register(1, key("a"))
    ledger.register(1, key("b"))
    ledger.unregister(1, key("b"))
    assert ledger.listing() == [{"rtype": "shared_memory", "name": "a", "pid": 100}]
    assert ledger.disconnect(1) == [key("a")]
    assert ledger.idle()


def test_ledger_never_removes_a_name_another_connection_owns():
    ledger = Ledger()
    ledger.register(1, key("shared"))
    ledger.register(2, key("shared"))
    assert ledger.disconnect(1) == []
    assert ledger.disconnect(2) == [key("shared")]


def test_ledger_unregister_of_unknown_names_is_harmless():
    ledger = Ledger()
    ledger.register(1, key("a"))
    ledger.unregister(2, key("a"))
    ledger.unregister(1, key("zzz"))
    assert ledger.disconnect(1) == [key("a")]


def test_ledger_deferred_removal_waits_for_all_pids():
    ledger = Ledger()
    ledger.register(1, key("s", "semaphore"))
    assert ledger.defer(1, key("s", "semaphore"), [10, 11]) == []
    assert ledger.disconnect(1) == []          # no longer the connection's to remove
    assert not ledger.idle()
    assert ledger.watched_pids() == {10, 11}
    assert ledger.process_ended(10) == []
    assert ledger.process_ended(11) == [key("s", "semaphore")]
    assert ledger.idle()


def test_ledger_deferral_without_pids_is_immediate():
    ledger = Ledger()
    ledger.register(1, key("s", "semaphore"))
    assert ledger.defer(1, key("s", "semaphore"), []) == [key("s", "semaphore")]


def test_register_refuses_unknown_types_and_bad_names():
    with pytest.raises(ValueError, match="unknown resource type 'gadget'.*'semaphore'"):
        resource_tracker.register("/x", "gadget")
    with pytest.raises(ValueError, match="without newlines"):
        resource_tracker.register("/x\ny", "shared_memory")


def test_unregister_without_a_connection_starts_nothing():
    if resource_tracker._state.conn is not None:
        pytest.skip("a tracker connection already exists in this process")
    resource_tracker.unregister("/never-registered", "shared_memory")
    assert resource_tracker._state.conn is None


def test_register_refuses_names_longer_than_the_kernel_allows():
    with pytest.raises(ValueError, match="at most 255 bytes"):
        resource_tracker.register("a" * 499, "shared_memory")


def test_stdlib_style_tracker_object_is_available():
    tracker = resource_tracker._resource_tracker
    assert tracker.register is resource_tracker.register
    assert callable(tracker._check_alive) and callable(tracker.ensure_running)
