"""The shared heap's allocator, checked through its bookkeeping (no processes)."""

from __future__ import annotations

import gc
import os
import random

import pytest

from manyproc import heap

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def fresh_heap(monkeypatch):
    h = heap.Heap()
    monkeypatch.setattr(heap.BufferWrapper, "_heap", h)
    return h


def check_consistent(h):
    """Free and allocated blocks tile every arena exactly, with no overlap or gap."""
    pieces = []
    for seq in h._len_to_seq.values():
        for arena, start, stop in seq:
            pieces.append((h._arenas.index(arena), start, stop, "free"))
    for arena, blocks in h._allocated_blocks.items():
        for start, stop in blocks:
            pieces.append((h._arenas.index(arena), start, stop, "used"))
    pieces.sort()
    covered = sum(stop - start for _, start, stop, _ in pieces)
    assert covered == sum(a.size for a in h._arenas)
    for (a1, _, stop1, kind1), (a2, start2, _, kind2) in zip(pieces, pieces[1:]):
        if a1 == a2:
            assert stop1 == start2
            assert not (kind1 == kind2 == "free"), "neighbouring free blocks were not merged"
        else:
            assert stop1 == h._arenas[a1].size and start2 == 0
    assert sorted(h._lengths) == h._lengths == sorted(h._len_to_seq)


def test_blocks_are_aligned_and_disjoint(fresh_heap):
    blocks = [fresh_heap.malloc(n) for n in (1, 7, 8, 9, 100, 0)]
    for _, start, stop in blocks:
        assert start % 8 == 0 and stop % 8 == 0 and stop > start
    check_consistent(fresh_heap)


def test_random_churn_keeps_heap_consistent_and_returns_everything(fresh_heap):
    rng = random.Random(1234)
    fresh_heap._DISCARD_FREE_SPACE_LARGER_THAN = 0
    live = []
    for _ in range(2000):
        live.append(heap.BufferWrapper(int(rng.lognormvariate(0, 1) * 1000)))
        if len(live) > 40:
            del live[rng.randrange(len(live))]
    check_consistent(fresh_heap)
    rng.shuffle(live)
    live.clear()
    assert fresh_heap._n_frees == fresh_heap._n_mallocs
    assert not fresh_heap._pending_free_blocks
    assert not fresh_heap._arenas
    assert not fresh_heap._allocated_blocks
    assert not fresh_heap._len_to_seq


def test_small_empty_arenas_are_kept_for_reuse(fresh_heap):
    w = heap.BufferWrapper(100)
    del w
    assert len(fresh_heap._arenas) == 1
    w2 = heap.BufferWrapper(100)
    assert len(fresh_heap._arenas) == 1
    del w2


def test_large_blocks_get_their_own_arena_and_are_returned(fresh_heap):
    big = 8 * 1024 * 1024
    w = heap.BufferWrapper(big)
    assert any(a.size >= big for a in fresh_heap._arenas)
    del w
    assert all(a.size < big for a in fresh_heap._arenas)


def test_best_fit_reuses_freed_hole(fresh_heap):
    a, b, c = fresh_heap.malloc(64), fresh_heap.malloc(256), fresh_heap.malloc(64)
    fresh_heap.free(b)
    d = fresh_heap.malloc(200)
    assert d[:2] == b[:2]
    for block in (a, c, d):
        fresh_heap.free(block)
    check_consistent(fresh_heap)


def test_free_while_lock_is_held_is_deferred(fresh_heap):
    block = fresh_heap.malloc(10)
    with fresh_heap._lock:   # as if the GC freed a block in the middle of malloc()
        fresh_heap.free(block)
        assert fresh_heap._pending_free_blocks == [block]
    fresh_heap.malloc(10)
    assert fresh_heap._pending_free_blocks == []


def test_free_from_garbage_collector_does_not_deadlock(fresh_heap):
    old = gc.get_threshold()
    gc.set_threshold(10)
    try:
        for _ in range(3000):
            a = heap.BufferWrapper(1)
            b = heap.BufferWrapper(1)
            a.buddy, b.buddy = b, a   # cycles: freed by the collector, at random moments
    finally:
        gc.set_threshold(*old)
    gc.collect()


def test_memoryview_has_requested_size_and_is_shared(fresh_heap):
    w = heap.BufferWrapper(10)
    view = w.create_memoryview()
    assert len(view) == 10
    view[:3] = b"abc"
    assert bytes(w.create_memoryview()[:3]) == b"abc"


@pytest.mark.parametrize("bad, exc", [(-1, ValueError), (1.5, TypeError), (True, TypeError)])
def test_bad_sizes_are_refused(fresh_heap, bad, exc):
    with pytest.raises(exc, match="size"):
        heap.BufferWrapper(bad)


def test_arena_has_no_name_anywhere():
    arena = heap.Arena(4096)
    assert os.fstat(arena.fd).st_nlink == 0   # memfd or an unlinked file
    arena.buffer[:2] = b"hi"


def test_rebuilt_arena_is_mapped_once_per_process():
    arena = heap.Arena(4096)

    class Dup:
        def __init__(self, fd):
            self.fd = os.dup(fd)

        def detach(self):
            return self.fd

    first = heap._rebuild_arena(4096, Dup(arena.fd))
    second = heap._rebuild_arena(4096, Dup(arena.fd))
    assert first is second
    first.buffer[0] = 9
    assert arena.buffer[0] == 9


def test_forked_heap_state_is_discarded_on_next_malloc(fresh_heap, monkeypatch):
    fresh_heap.malloc(10)
    monkeypatch.setattr(fresh_heap, "_pid", -1)   # as seen from a forked child
    fresh_heap.free((fresh_heap._arenas[0], 0, 16))  # ignored: not this process's heap
    fresh_heap.malloc(10)
    assert fresh_heap._pid == os.getpid()
    assert fresh_heap._n_mallocs == 1
