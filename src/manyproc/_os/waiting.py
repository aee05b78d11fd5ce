"""Wait until file descriptors become readable, across platforms and interrupted calls."""

from __future__ import annotations

import math
import select
import selectors
import time
from collections.abc import Iterable

_Selector: type[selectors.BaseSelector] = getattr(
    selectors, "PollSelector", selectors.SelectSelector)
_poll = getattr(select, "poll", None)
_POLL_READABLE = (select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR
                  if _poll is not None else 0)


def wait_readable(fds: Iterable[int], timeout: float | None = None) -> list[int]:
    """Return those of ``fds`` that are readable (or at EOF), waiting up to ``timeout`` seconds.

    ``timeout=None`` waits for ever; ``0`` only polls.  A signal that interrupts the
    wait does not shorten it (PEP 475 restarts the call with the remaining time).
    """
    fds = list(fds)
    if not fds:
        if timeout:
            time.sleep(timeout)
        return []
    if len(fds) == 1 and _poll is not None:
        # The common case (one connection's poll), several times cheaper than a selector.
        poller = _poll()
        poller.register(fds[0], _POLL_READABLE)
        if timeout is None:
            return fds if poller.poll() else []
        return fds if poller.poll(max(0, math.ceil(timeout * 1000))) else []
    with _Selector() as sel:
        for fd in fds:
            sel.register(fd, selectors.EVENT_READ)
        ready = sel.select(timeout)
    return [key.fd for key, _ in ready]


def is_readable(fd: int) -> bool:
    """True if reading ``fd`` would not block right now."""
    return bool(wait_readable([fd], 0))
