"""Value, Array and their raw forms changed by real child processes."""

from __future__ import annotations

import ctypes

import pytest

pytestmark = pytest.mark.timeout(90)


class Point(ctypes.Structure):
    _fields_ = [("x", ctypes.c_int), ("y", ctypes.c_double), ("z", ctypes.c_longlong)]


def double_everything(x, y, point, arr, text, raw):
    x.value *= 2
    y.value *= 2
    point.x *= 2
    point.y *= 2
    for i in range(len(arr)):
        arr[i] *= 2
    text.value = text.value.upper()
    for i in range(len(raw)):
        raw[i] += 1


def add_many(total, times):
    for _ in range(times):
        with total.get_lock():
            total.value += 1


def run(ctx, target, *args):
    p = ctx.Process(target=target, args=args)
    p.start()
    p.join(60)
    if p.exitcode is None:
        p.kill()
        p.join()
    assert p.exitcode == 0


def test_child_changes_are_seen_by_parent(ctx):
    x = ctx.Value("i", 7)
    y = ctx.Value(ctypes.c_double, 1.0 / 3.0, lock=False)
    point = ctx.Value(Point, 3, 2.0, 2**33)
    arr = ctx.Array("d", list(range(10)))
    text = ctx.Array("c", 20)
    text.value = b"hello"
    raw = ctx.RawArray("i", [1, 2, 3])
    run(ctx, double_everything, x, y, point, arr, text, raw)
    assert x.value == 14
    assert y.value == pytest.approx(2.0 / 3.0)
    assert (point.x, point.y, point.z) == (6, 4.0, 2**33)
    assert arr[:] == [2.0 * i for i in range(10)]
    assert text.value == b"HELLO"
    assert list(raw) == [2, 3, 4]


def test_get_lock_makes_compound_updates_atomic(ctx):
    total = ctx.Value("i", 0)
    procs = [ctx.Process(target=add_many, args=(total, 300)) for _ in range(2)]
    for p in procs:
        p.start()
    add_many(total, 300)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert total.value == 900


def test_explicit_lock_is_shared_with_the_value(ctx):
    lock = ctx.Lock()
    total = ctx.Value("i", 0, lock=lock)
    assert total.get_lock() is lock
    run(ctx, add_many_raw, total, 50)
    assert total.value == 50


def add_many_raw(total, times):
    # with a plain Lock, .value would try to take the lock again: use the raw object
    for _ in range(times):
        with total.get_lock():
            total.get_obj().value += 1


def test_many_small_values_share_an_arena(ctx):
    values = [ctx.RawValue("q", i) for i in range(50)]
    run(ctx, bump_all, values)
    assert [v.value for v in values] == [i + 1 for i in range(50)]


def bump_all(values):
    for v in values:
        v.value += 1
