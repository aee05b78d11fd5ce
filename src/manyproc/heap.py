"""A heap of shared memory for ctypes objects (:mod:`manyproc.sharedctypes`).

Memory comes from *arenas*: shared mappings of an anonymous file (``memfd_create``
on Linux, elsewhere a temporary file unlinked at once).  Having no name, an arena
can never be left behind, whatever happens to the processes using it.  Forked
children inherit the mapping; spawned children receive a duplicate of its file
descriptor while starting and map it again.

Small blocks are carved out of arenas with a best-fit allocator that merges
neighbouring free blocks.  ``free()`` may be called by the garbage collector at
any moment -- even while this thread is inside ``malloc()`` -- so a free that
cannot take the lock at once is queued and applied by the next call that can.
"""

from __future__ import annotations

import bisect
import mmap
import os
import sys
import tempfile
import threading
import weakref
from collections import defaultdict
from typing import Any

from . import reduction, util

__all__ = ["Arena", "Heap", "BufferWrapper"]

_PAGE = mmap.PAGESIZE


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _anonymous_file(size: int) -> int:
    """An fd of ``size`` zeroed bytes that has no name anywhere in the filesystem."""
    memfd = getattr(os, "memfd_create", None)
    if memfd is not None:
        try:
            fd = memfd("manyproc-heap", os.MFD_CLOEXEC)
        except OSError:
            pass  # sandboxes may forbid it; fall back to a temporary file
        else:
            try:
                os.ftruncate(fd, size)
            except BaseException:
                os.close(fd)
                raise
            return fd
    directory = "/dev/shm" if sys.platform.startswith("linux") and os.path.isdir("/dev/shm") \
        else None
    fd, path = tempfile.mkstemp(prefix=f"manyproc-heap-{os.getpid()}-", dir=directory)
    try:
        os.unlink(path)
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


class Arena:
    """One shared mapping of ``size`` bytes, backed by an anonymous file descriptor."""

    def __init__(self, size: int, fd: int = -1) -> None:
        if fd == -1:
            fd = _anonymous_file(size)
        self.size = size
        self.fd = fd
        self._closer = util.Finalize(self, os.close, (fd,))
        self.buffer = mmap.mmap(fd, size)

    def __repr__(self) -> str:
        return f"<Arena size={self.size} fd={self.fd}>"


# Arenas already mapped in this process, by file identity, so that a spawned child
# receiving many objects from one arena maps it once.
_mapped: weakref.WeakValueDictionary[tuple[int, int], Arena] = weakref.WeakValueDictionary()


def _reduce_arena(arena: Arena) -> Any:
    return _rebuild_arena, (arena.size, reduction.DupFd(arena.fd))


def _rebuild_arena(size: int, dupfd: Any) -> Arena:
    fd = dupfd.detach()
    try:
        st = os.fstat(fd)
        identity = (st.st_dev, st.st_ino)
    except OSError:
        identity = None
    if identity is not None:
        known = _mapped.get(identity)
        if known is not None and known.size == size:
            os.close(fd)
            return known
    arena = Arena(size, fd)
    if identity is not None:
        _mapped[identity] = arena
    return arena


reduction.register(Arena, _reduce_arena)

Block = tuple[Arena, int, int]  # (arena, start, stop)


class Heap:
    """Allocate blocks of shared memory from arenas; thread-safe, fork-aware.

    The attribute names of the bookkeeping below are the ones CPython's own test
    suite inspects, so that suite can check this heap too.
    """

    _ALIGNMENT = 8
    _FIRST_ARENA_SIZE = 4 * _PAGE
    _ARENA_GROWTH_LIMIT = 4 * 1024 * 1024    # arenas double in size until this
    # A wholly free arena larger than this is given back to the system.
    _DISCARD_FREE_SPACE_LARGER_THAN = 4 * 1024 * 1024

    def __init__(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._arenas: list[Arena] = []
        self._next_arena_size = self._FIRST_ARENA_SIZE
        # Free blocks, by length, with the sorted lengths for best-fit search.
        self._len_to_seq: dict[int, list[Block]] = {}
        self._lengths: list[int] = []
        # Free blocks by their two ends, to merge neighbours on free.
        self._start_to_block: dict[tuple[Arena, int], Block] = {}
        self._stop_to_block: dict[tuple[Arena, int], Block] = {}
        # Allocated (start, stop) pairs of each arena that has any.
        self._allocated_blocks: defaultdict[Arena, set[tuple[int, int]]] = defaultdict(set)
        self._pending_free_blocks: list[Block] = []
        self._n_mallocs = 0
        self._n_frees = 0

    # ----------------------------------------------------------------- public

    def malloc(self, size: int) -> Block:
        """Return a block ``(arena, start, stop)`` of at least ``size`` bytes.

        Raises:
            ValueError: ``size`` is negative or absurdly large.
        """
        if not isinstance(size, int) or isinstance(size, bool):
            raise TypeError(f"size must be an int, not {type(size).__name__}")
        if not 0 <= size < sys.maxsize:
            raise ValueError(f"size {size} out of range: a block needs 0 <= size < sys.maxsize")
        if os.getpid() != self._pid:
            self.__init__()  # type: ignore[misc]  # forked: the parent's bookkeeping is not ours
        with self._lock:
            self._n_mallocs += 1
            self._apply_pending_frees()
            length = _round_up(max(size, 1), self._ALIGNMENT)
            arena, start, stop = self._take_free_block(length)
            if start + length < stop:
                self._add_free_block((arena, start + length, stop))
            self._allocated_blocks[arena].add((start, start + length))
            return arena, start, start + length

    def free(self, block: Block) -> None:
        """Give ``block`` back (safe to call from a finalizer at any moment)."""
        if os.getpid() != self._pid:
            return  # a forked child never manages its parent's heap
        self._pending_free_blocks.append(block)
        if self._lock.acquire(False):
            try:
                self._apply_pending_frees()
            finally:
                self._lock.release()
        # Otherwise this thread (in malloc, interrupted by the GC) or another holds
        # the lock; the block is applied by the next malloc or free.

    # ----------------------------------------------------------------- internals

    def _apply_pending_frees(self) -> None:
        pending = self._pending_free_blocks
        while pending:
            arena, start, stop = pending.pop()
            self._n_frees += 1
            owned = self._allocated_blocks[arena]
            owned.discard((start, stop))
            if not owned:
                del self._allocated_blocks[arena]
            self._add_free_block((arena, start, stop))

    def _take_free_block(self, length: int) -> Block:
        """Remove and return the smallest free block of at least ``length`` bytes."""
        i = bisect.bisect_left(self._lengths, length)
        if i == len(self._lengths):
            return self._new_arena(length)
        size = self._lengths[i]
        candidates = self._len_to_seq[size]
        block = candidates.pop()
        if not candidates:
            del self._len_to_seq[size]
            del self._lengths[i]
        arena, start, stop = block
        del self._start_to_block[(arena, start)]
        del self._stop_to_block[(arena, stop)]
        return block

    def _forget_free_block(self, block: Block) -> None:
        arena, start, stop = block
        size = stop - start
        candidates = self._len_to_seq[size]
        candidates.remove(block)
        if not candidates:
            del self._len_to_seq[size]
            self._lengths.remove(size)

    def _add_free_block(self, block: Block) -> None:
        """File ``block`` as free, merged with free neighbours; drop arenas left empty."""
        arena, start, stop = block
        before = self._stop_to_block.pop((arena, start), None)
        if before is not None:
            del self._start_to_block[(arena, before[1])]
            self._forget_free_block(before)
            start = before[1]
        after = self._start_to_block.pop((arena, stop), None)
        if after is not None:
            del self._stop_to_block[(arena, after[2])]
            self._forget_free_block(after)
            stop = after[2]
        if start == 0 and stop == arena.size and arena not in self._allocated_blocks \
                and arena.size > self._DISCARD_FREE_SPACE_LARGER_THAN:
            self._arenas.remove(arena)  # unmapped once the last view of it is gone
            return
        merged = (arena, start, stop)
        size = stop - start
        if size not in self._len_to_seq:
            bisect.insort(self._lengths, size)
            self._len_to_seq[size] = []
        self._len_to_seq[size].append(merged)
        self._start_to_block[(arena, start)] = merged
        self._stop_to_block[(arena, stop)] = merged

    def _new_arena(self, length: int) -> Block:
        size = max(_round_up(length, _PAGE), self._next_arena_size)
        if self._next_arena_size < self._ARENA_GROWTH_LIMIT:
            self._next_arena_size *= 2
        util.info("allocating a new shared arena of %d bytes", size)
        arena = Arena(size)
        self._arenas.append(arena)
        return arena, 0, size


class BufferWrapper:
    """A block of the shared heap, freed when this object is collected."""

    _heap = Heap()

    def __init__(self, size: int) -> None:
        if not isinstance(size, int) or isinstance(size, bool):
            raise TypeError(f"size must be an int, not {type(size).__name__}")
        if not 0 <= size < sys.maxsize:
            raise ValueError(f"size {size} out of range: a buffer needs 0 <= size < sys.maxsize")
        heap = BufferWrapper._heap
        block = heap.malloc(size)
        self._state = (block, size)
        util.Finalize(self, heap.free, args=(block,))

    def create_memoryview(self) -> memoryview:
        """A writable view of exactly the requested bytes."""
        (arena, start, _stop), size = self._state
        return memoryview(arena.buffer)[start:start + size]
