"""How many input items go into one task.

A task is the unit the core sends to a worker; grouping items into chunks pays the
per-message cost once per chunk instead of once per item. Too small and tiny functions
drown in dispatch overhead; too large and the last chunks leave workers idle, progress
moves in jumps, and a timeout or a crash takes many items with it.

* An explicit ``chunksize`` is respected as given.
* ``chunksize=None`` adapts: the first chunks hold one item; every finished chunk
  reports its duration, and the next size aims at ``target_seconds`` of work per chunk
  (a few tens of milliseconds), growing at most ``MAX_GROWTH`` times the largest chunk
  measured so far, never above a cap. With a known length the cap is the standard
  library's ``map`` formula (about four chunks per worker), so chunks are never larger
  than ``Pool.map`` would make them; long tasks stay one per chunk.

Chunks are cut when a worker is about to receive one, so every cut uses the newest
measurements.
"""

from __future__ import annotations

from typing import final

__all__ = ["ChunkSizer", "stdlib_chunksize", "TARGET_SECONDS", "MAX_GROWTH",
           "DEFAULT_MAX_CHUNKSIZE"]

TARGET_SECONDS = 0.05
"""Aim for this much work per chunk: well above per-message overhead (tens of
microseconds), well below what a user notices in a progress bar or a final straggler."""

MAX_GROWTH = 4
"""A chunk is at most this many times the largest chunk already measured, so one lucky
measurement cannot make the next chunk enormous."""

DEFAULT_MAX_CHUNKSIZE = 65536
"""Cap for adaptive chunks of an input of unknown length."""

_DECAY = 0.5  # weight kept by older measurements at each new one


def stdlib_chunksize(n_items: int, n_workers: int) -> int:
    """The chunk size ``Pool.map`` picks: ``n_items`` spread over four chunks per worker.

    Args:
        n_items: length of the input.
        n_workers: number of workers in the pool.

    Returns:
        ``ceil(n_items / (4 * n_workers))``, and at least 1.
    """
    slices = 4 * max(1, n_workers)
    return max(1, -(-n_items // slices))


@final
class ChunkSizer:
    """Chooses the size of each next chunk of one job and learns from finished ones."""

    __slots__ = ("fixed", "limit", "target", "_seconds", "_items", "_largest")

    def __init__(self, chunksize: int | None, *, n_workers: int, length: int | None = None,
                 target_seconds: float = TARGET_SECONDS,
                 max_chunksize: int | None = None) -> None:
        """Set the policy of one job.

        Args:
            chunksize: a fixed size, or ``None`` to adapt.
            n_workers: workers in the pool (for the standard library's cap).
            length: the input's length when known.
            target_seconds: work to aim for in one adaptive chunk.
            max_chunksize: cap for adaptive chunks (default ``DEFAULT_MAX_CHUNKSIZE``).
        """
        self.fixed = chunksize
        limit = DEFAULT_MAX_CHUNKSIZE if max_chunksize is None else max_chunksize
        if length is not None:
            limit = min(limit, stdlib_chunksize(length, n_workers))
        self.limit = max(1, limit)
        self.target = target_seconds
        self._seconds = 0.0
        self._items = 0.0
        self._largest = 0

    @property
    def adaptive(self) -> bool:
        """Whether sizes follow measurements."""
        return self.fixed is None

    def per_item_seconds(self) -> float | None:
        """The smoothed measured time of one item, or ``None`` before any measurement."""
        if self._items <= 0:
            return None
        return self._seconds / self._items

    def next_size(self) -> int:
        """Size of the next chunk to cut."""
        if self.fixed is not None:
            return self.fixed
        per_item = self.per_item_seconds()
        if per_item is None:
            return 1
        ideal = self.limit if per_item <= 0 else int(self.target / per_item)
        return max(1, min(ideal, self.limit, MAX_GROWTH * self._largest))

    def observe(self, n_items: int, seconds: float) -> None:
        """Learn that a chunk of ``n_items`` took ``seconds`` to run."""
        if self.fixed is not None or n_items <= 0:
            return
        self._seconds = self._seconds * _DECAY + max(0.0, seconds)
        self._items = self._items * _DECAY + n_items
        if n_items > self._largest:
            self._largest = n_items
