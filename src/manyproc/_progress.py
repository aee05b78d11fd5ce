"""Progress bars for long maps (``progress=True`` on map, imap, starmap, executor.map).

A bar is a tqdm bar on stderr showing items done, rate and ETA. ``progress`` may be
``True`` or a dict of tqdm keyword arguments (``{"desc": "resize", "unit": "img"}``);
``False``/``None`` shows nothing. The pool reports progress as chunks finish; the bar
is updated from whichever thread handles the pool's events, outside the pool's lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["ProgressBar", "make_bar"]


class ProgressBar:
    """One job's bar: moves to the number of items done, closes when the job ends."""

    __slots__ = ("_bar", "_lock", "_closed")

    def __init__(self, bar: Any) -> None:
        self._bar = bar
        self._lock = threading.Lock()
        self._closed = False

    def update_to(self, done: int, total: int | None) -> None:
        """Show ``done`` items finished out of ``total`` (None while unknown)."""
        with self._lock:
            if self._closed:
                return
            bar = self._bar
            if total is not None and bar.total != total:
                bar.total = total
            step = done - bar.n
            if step > 0:
                bar.update(step)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._bar.close()

    def updater(self, done: int, total: int | None) -> Callable[[], None]:
        """An action that moves the bar (run outside the pool's lock)."""
        return lambda: self.update_to(done, total)


def make_bar(progress: Any, total: int | None, desc: str) -> ProgressBar | None:
    """Build the bar asked for by a ``progress=`` argument, or return None.

    Raises:
        TypeError: ``progress`` is neither a bool, None nor a dict of tqdm options.
    """
    if progress is None or progress is False:
        return None
    if progress is True:
        options: dict[str, Any] = {}
    elif isinstance(progress, Mapping):
        options = dict(progress)
    else:
        raise TypeError(f"progress must be True, False or a dict of tqdm options, not "
                        f"{progress!r} ({type(progress).__name__}); e.g. progress=True or "
                        "progress={'desc': 'work', 'unit': 'item'}")
    from tqdm.auto import tqdm

    options.setdefault("total", total)
    options.setdefault("desc", desc)
    options.setdefault("unit", "item")
    options.setdefault("dynamic_ncols", True)
    try:
        bar = tqdm(**options)
    except TypeError as exc:
        raise TypeError(f"progress={progress!r}: tqdm refused these options ({exc}); pass "
                        "keyword arguments that tqdm.tqdm() accepts") from None
    return ProgressBar(bar)
