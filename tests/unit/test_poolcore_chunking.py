"""Pool core: chunk sizes, fixed and adaptive."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from manyproc._poolcore import ChunkSizer, JobKind, ResolveJob, SendTask, stdlib_chunksize
from manyproc._poolcore.chunking import DEFAULT_MAX_CHUNKSIZE, MAX_GROWTH

from .test_poolcore_harness import Harness, of, only


@given(n=st.integers(0, 10**7), workers=st.integers(1, 512))
def test_stdlib_formula(n: int, workers: int) -> None:
    expected = max(1, math.ceil(n / (4 * workers)))
    assert stdlib_chunksize(n, workers) == expected


def test_fixed_size_is_respected_whatever_is_measured() -> None:
    sizer = ChunkSizer(7, n_workers=4, length=10**6)
    sizer.observe(7, 100.0)
    assert sizer.next_size() == 7 and not sizer.adaptive


def test_adaptive_starts_with_one_item() -> None:
    assert ChunkSizer(None, n_workers=2).next_size() == 1


def test_adaptive_grows_by_measurement_and_bounded_steps() -> None:
    sizer = ChunkSizer(None, n_workers=2, target_seconds=0.05)
    sizes = []
    for _ in range(20):
        size = sizer.next_size()
        sizes.append(size)
        sizer.observe(size, size * 1e-6)  # 1 microsecond per item
    largest = 0
    for size in sizes:
        assert size <= max(1, MAX_GROWTH * largest)
        largest = max(largest, size)
    assert sizes[-1] == min(50_000, DEFAULT_MAX_CHUNKSIZE)


def test_adaptive_keeps_long_tasks_alone() -> None:
    sizer = ChunkSizer(None, n_workers=2, length=1000)
    for _ in range(5):
        sizer.observe(1, 2.0)
    assert sizer.next_size() == 1


def test_adaptive_never_exceeds_the_stdlib_size_for_a_known_length() -> None:
    sizer = ChunkSizer(None, n_workers=4, length=1000)
    for _ in range(30):
        sizer.observe(sizer.next_size(), 1e-9)
    assert sizer.next_size() == stdlib_chunksize(1000, 4) == 63


def test_adaptive_shrinks_when_items_get_slower() -> None:
    sizer = ChunkSizer(None, n_workers=1, target_seconds=0.05)
    for _ in range(20):
        sizer.observe(sizer.next_size(), sizer.next_size() * 1e-5)
    big = sizer.next_size()
    for _ in range(4):
        sizer.observe(big, big * 1e-2)
    assert sizer.next_size() < big / 10


def test_adaptive_map_chunks_grow_in_the_core() -> None:
    h = Harness(processes=1)
    h.boot()
    _, out = h.submit(JobKind.MAP, list(range(2000)), chunksize=None)
    sizes = []
    while not of(out, ResolveJob):
        send = only(out, SendTask)
        sizes.append(len(send.items))
        h.now += 1e-6 * len(send.items)  # the core measures the time itself
        out = h.finish(send)
    assert sizes[0] == 1 and max(sizes) == stdlib_chunksize(2000, 1) == 500
    assert sum(sizes) == 2000
    assert only(out, ResolveJob).value == [(i, "r") for i in range(2000)]


def test_worker_measured_duration_wins_over_the_core_clock() -> None:
    h = Harness(processes=1)
    h.boot()
    _, out = h.submit(JobKind.MAP, list(range(100)), chunksize=None)
    h.now += 10.0  # long round trip, but the worker says the item took a microsecond
    out = h.finish(only(out, SendTask), duration=1e-6)
    assert len(only(out, SendTask).items) == MAX_GROWTH


@pytest.mark.parametrize("bad", [0, -1])
def test_sizes_are_at_least_one(bad: int) -> None:
    sizer = ChunkSizer(None, n_workers=1, max_chunksize=1)
    sizer.observe(1, bad)
    assert sizer.next_size() == 1
