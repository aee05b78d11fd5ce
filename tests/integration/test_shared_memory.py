"""SharedMemory and ShareableList between processes, and who removes a block when."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from manyproc import shared_memory
from manyproc.shared_memory import ShareableList, SharedMemory

pytestmark = pytest.mark.timeout(90)


def exists(name):
    try:
        SharedMemory(name).close()
    except FileNotFoundError:
        return False
    return True


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def run(ctx, target, *args):
    p = ctx.Process(target=target, args=args)
    p.start()
    p.join(60)
    return p.exitcode


# --------------------------------------------------------------------------- children


def write_by_name(name, data):
    sm = SharedMemory(name)
    sm.buf[:len(data)] = data
    sm.close()


def write_through_object(sm, data):
    sm.buf[:len(data)] = data
    sm.close()


def change_list(sl, name):
    sl[0] = "changed"
    other = ShareableList(name=name)
    other[1] = 99
    other.shm.close()
    sl.shm.close()


def attach_and_sleep(name, ready):
    sm = SharedMemory(name)
    ready.set()
    time.sleep(60)
    sm.close()


def create_and_report(box, track, fail):
    sm = SharedMemory(create=True, size=64, track=track)
    box.value = sm.name.encode()
    sm.close()
    if fail:
        raise RuntimeError("the creator fails after creating a block (expected in this test)")


# --------------------------------------------------------------------------- tests


def test_child_writes_by_name_and_through_pickled_object(ctx):
    sm = SharedMemory(create=True, size=512)
    try:
        assert run(ctx, write_by_name, sm.name, b"howdy") == 0
        assert bytes(sm.buf[:5]) == b"howdy"
        assert run(ctx, write_through_object, sm, b"HELLO") == 0
        assert bytes(sm.buf[:5]) == b"HELLO"
    finally:
        sm.close()
        sm.unlink()


def test_shareable_list_changed_by_child(ctx):
    sl = ShareableList(["a" * 10, 1, 2.5, None, True])
    try:
        assert run(ctx, change_list, sl, sl.shm.name) == 0
        assert list(sl) == ["changed", 99, 2.5, None, True]
    finally:
        sl.shm.close()
        sl.shm.unlink()


def test_attacher_exiting_normally_leaves_the_block(ctx):
    sm = SharedMemory(create=True, size=16)
    try:
        assert run(ctx, write_by_name, sm.name, b"x") == 0
        assert exists(sm.name)
    finally:
        sm.close()
        sm.unlink()


def test_attacher_killed_leaves_the_block(ctx):
    sm = SharedMemory(create=True, size=16)
    ready = ctx.Event()
    p = ctx.Process(target=attach_and_sleep, args=(sm.name, ready))
    p.start()
    try:
        assert ready.wait(30)
        os.kill(p.pid, signal.SIGKILL)
        p.join(30)
        assert p.exitcode == -signal.SIGKILL
        time.sleep(0.05)   # give a (wrong) cleanup the chance to happen
        assert exists(sm.name)
    finally:
        sm.close()
        sm.unlink()


@pytest.mark.parametrize("fail", [False, True], ids=["exits", "raises"])
def test_creator_exit_removes_its_block(ctx, fail):
    box = ctx.Array("c", 64)
    exitcode = run(ctx, create_and_report, box, True, fail)
    assert exitcode == (1 if fail else 0)
    name = box.value.decode()
    assert name
    # The child removed it on its way out (or its tracker did): gone right after join().
    assert wait_until(lambda: not exists(name), 5)


def test_untracked_block_outlives_its_creator(ctx):
    box = ctx.Array("c", 64)
    assert run(ctx, create_and_report, box, False, False) == 0
    name = box.value.decode()
    try:
        assert exists(name)
    finally:
        os_unlink(name)


def os_unlink(name):
    sm = SharedMemory(name)
    sm.close()
    sm.unlink()


# --------------------------------------------------------------------------- ShareableList (one process)


def test_shareable_list_basics():
    sl = ShareableList(["howdy", b"HoWdY", -273.154, 100, None, True, 42])
    try:
        assert sl.format == "8s8sdqxxxxxx?xxxxxxxx?q"
        assert len(sl) == 7
        assert sl.shm.name in repr(sl) and str(list(sl)) in repr(sl)
        assert sl[0] == "howdy" and sl[-2] is True and sl[4] is None
        with pytest.raises(IndexError, match="out of range"):
            sl[7]
        with pytest.raises(IndexError):
            sl[7] = 2
        sl[4] = "some"
        assert sl.format == "8s8sdq8sxxxxxxx?q"
        with pytest.raises(ValueError, match="exceeds available storage"):
            sl[4] = "far too many"
        sl[0] = "encodés"   # exactly 8 bytes of UTF-8
        assert sl[0] == "encodés" and sl[1] == b"HoWdY"
        with pytest.raises(ValueError, match="exceeds available storage"):
            sl[0] = "encodées"
        assert sl.count(42) == 1 and sl.index(100) == 3
        with pytest.raises(ValueError, match="not in this container"):
            sl.index("100")
        with pytest.raises(TypeError, match="cannot store list"):
            sl[3] = [1]
    finally:
        sl.shm.close()
        sl.shm.unlink()


def test_shareable_list_sizes_strings_by_their_encoded_length():
    sl = ShareableList(["ééééé"])   # 5 characters, 10 bytes of UTF-8
    try:
        assert sl[0] == "ééééé"
    finally:
        sl.shm.close()
        sl.shm.unlink()


def test_shareable_list_rejects_unsupported_items_with_both_error_types():
    with pytest.raises(TypeError, match="int, float, bool, str, bytes and None"):
        ShareableList([{"a": 1}])
    with pytest.raises(KeyError):
        ShareableList([object()])


def test_empty_shareable_list_and_named_copy():
    empty = ShareableList()
    try:
        assert len(empty) == 0 and empty.format == "" and empty.count("x") == 0
    finally:
        empty.shm.close()
        empty.shm.unlink()
    sl = ShareableList(range(5))
    name = f"mpc_copy_{os.getpid()}"
    copy = ShareableList(sl, name=name)
    try:
        assert copy.shm.name == name and list(copy) == [0, 1, 2, 3, 4]
        copy[-1] = 77
        assert sl[-1] == 4
    finally:
        for item in (sl, copy):
            item.shm.close()
            item.shm.unlink()


def test_shareable_list_pickles_by_name():
    import pickle

    sl = ShareableList(range(10))
    big = ShareableList(range(400))
    try:
        assert len(pickle.dumps(sl)) == len(pickle.dumps(big)) + (
            len(big.shm.name) - len(sl.shm.name))
        clone = pickle.loads(pickle.dumps(sl))
        clone[4] = "changed"
        assert sl[4] == "changed"
        clone.shm.close()
    finally:
        for item in (sl, big):
            item.shm.close()
            item.shm.unlink()


def test_module_exports():
    assert shared_memory.__all__ == ["SharedMemory", "ShareableList"]


@pytest.mark.skipif(sys.platform == "darwin", reason="Linux /dev/shm layout")
def test_shareable_list_layout_is_the_standard_librarys():
    import struct

    sl = ShareableList([1, "ab"])
    try:
        buf = sl.shm.buf
        assert struct.unpack_from("q", buf, 0) == (2,)
        assert struct.unpack_from("3q", buf, 8) == (0, 8, 16)
        assert struct.unpack_from("8s8s", buf, 4 * 8 + 16) == (b"q" + b"\0" * 7,
                                                               b"8s" + b"\0" * 6)
        assert struct.unpack_from("2b", buf, 4 * 8 + 16 + 16) == (0, 1)
    finally:
        sl.shm.close()
        sl.shm.unlink()
