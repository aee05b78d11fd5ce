"""sharedctypes in one process: construction, typecodes, locks, wrappers, bad input."""

from __future__ import annotations

import ctypes

import pytest

import manyproc
from manyproc import reduction, sharedctypes
from manyproc.sharedctypes import Array, RawArray, RawValue, Value, copy, synchronized

pytestmark = pytest.mark.timeout(30)

FORK = manyproc.get_context("fork")


class Point(ctypes.Structure):
    _fields_ = [("x", ctypes.c_int), ("y", ctypes.c_double), ("z", ctypes.c_longlong)]


@pytest.mark.parametrize("code, value", [
    ("i", -5), ("I", 5), ("b", -3), ("B", 250), ("h", -300), ("H", 300), ("l", -7), ("L", 7),
    ("q", 2**40), ("Q", 2**63), ("f", 1.5), ("d", 1 / 3), ("c", b"x"), ("u", "\u20ac"),
])
def test_raw_value_every_typecode(code, value):
    v = RawValue(code, value)
    assert v.value == value


def test_raw_value_ctypes_type_and_zero_default():
    assert RawValue(ctypes.c_int64).value == 0
    assert RawValue(ctypes.c_double, 2.5).value == 2.5


def test_reused_memory_starts_zeroed():
    for _ in range(50):
        v = RawValue("q", -1)
        del v
        assert RawValue("q").value == 0


def test_unknown_typecode_names_the_valid_ones():
    with pytest.raises(TypeError, match=r"unknown typecode 'z'.*'i', 'I'.*ctypes"):
        RawValue("z")
    with pytest.raises(TypeError, match="ctypes type"):
        RawArray(int, 3)


def test_raw_array_from_size_and_initializer():
    a = RawArray("i", 4)
    assert list(a) == [0, 0, 0, 0]
    b = RawArray("d", range(3))
    assert list(b) == [0.0, 1.0, 2.0]
    c = RawArray(ctypes.c_short, [1, 2])
    assert list(c) == [1, 2]


def test_raw_array_bad_size_and_initializer():
    with pytest.raises(ValueError, match=">= 0, got -2"):
        RawArray("i", -2)
    with pytest.raises(TypeError, match="int or a sequence"):
        RawArray("i", 2.5)


def test_char_array_value_and_raw_and_bytes_initializer():
    s = RawArray("c", b"hello")
    assert s.value == b"hello" and s.raw == b"hello"
    arr = Array("c", 10, ctx=FORK)
    arr.value = b"hi"
    assert arr.value == b"hi"
    assert arr.raw == b"hi" + b"\0" * 8
    arr.raw = b"0123456789"
    assert arr[:3] == b"012"
    assert type(arr).__name__ == "SynchronizedString"


def test_value_has_lock_and_wrapper_api():
    v = Value("i", 5, ctx=FORK)
    assert v.value == 5
    v.value += 1
    assert v.value == 6
    lock = v.get_lock()
    assert type(lock).__name__ == "RLock"
    assert isinstance(v.get_obj(), ctypes.c_int)
    with v:
        assert repr(lock) == "<RLock(MainProcess, 1)>"
    assert v.acquire()
    v.release()
    assert repr(v) == "<Synchronized wrapper for c_int(6)>"


def test_value_lock_choices():
    assert not hasattr(Value("i", 1, lock=False), "get_lock")
    assert Value("i", 1, lock=None, ctx=FORK).get_lock() is not None
    lock = FORK.Lock()
    assert Value("i", 1, lock=lock).get_lock() is lock
    with pytest.raises(AttributeError, match="has no method 'acquire'"):
        Value("i", 1, lock="navalue")


def test_array_indexing_and_slicing():
    arr = Array("i", range(10), ctx=FORK)
    assert len(arr) == 10
    assert arr[3] == 3 and arr[-1] == 9
    assert arr[2:5] == [2, 3, 4]
    arr[4:8] = [40, 50, 60, 70]
    arr[0] = -1
    assert arr[:] == [-1, 1, 2, 3, 40, 50, 60, 70, 8, 9]
    with pytest.raises(IndexError):
        arr[10]
    assert type(arr).__name__ == "SynchronizedArray"
    assert not hasattr(RawArray("i", 2), "get_lock")


def test_structure_value_gets_field_properties():
    p = Value(Point, 1, 2.5, 3, ctx=FORK)
    assert (p.x, p.y, p.z) == (1, 2.5, 3)
    p.x *= 2
    assert p.get_obj().x == 2
    assert type(p).__name__ == "SynchronizedPoint"
    assert type(Value(Point, ctx=FORK)) is type(p)   # one wrapper class per structure


def test_copy_makes_an_independent_shared_copy():
    foo = RawValue(Point, 2, 5.0, 2**33)
    bar = copy(foo)
    foo.x = foo.y = foo.z = 0
    assert (bar.x, bar.y, bar.z) == (2, 5.0, 2**33)
    arr = RawArray("i", [1, 2, 3])
    arr2 = copy(arr)
    arr[0] = 100
    assert list(arr2) == [1, 2, 3]


def test_synchronized_refuses_double_wrapping():
    v = Value("i", 1, ctx=FORK)
    with pytest.raises(TypeError, match="already synchronized"):
        synchronized(v)


def test_synchronized_wraps_raw_objects():
    s = synchronized(RawValue("d", 1.0), ctx=FORK)
    assert s.value == 1.0
    a = synchronized(RawArray("i", 2), FORK.Lock())
    a[1] = 5
    assert a[:] == [0, 5]


def test_shared_objects_travel_only_to_starting_children():
    with pytest.raises(RuntimeError, match="inheritance"):
        reduction.dumps(RawValue("i", 1))
    with pytest.raises(RuntimeError, match="inheritance"):
        reduction.dumps(Array("i", 2, ctx=FORK))


def test_module_exports():
    assert set(sharedctypes.__all__) == {"RawValue", "RawArray", "Value", "Array", "copy",
                                         "synchronized"}
