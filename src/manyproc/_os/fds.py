"""File-descriptor bookkeeping for the start methods.

Some descriptors belong to one process only: a parent's end of a child's
"parent is alive" pipe, a child's end of its own exit pipe.  A child created by
``fork`` inherits every descriptor, so each such fd is *marked private* and a new
fork child closes all of them first.  Otherwise a sibling or grandchild would keep
a pipe open and hide the death of the process it stands for.
"""

from __future__ import annotations

import os
import threading

_private: set[int] = set()
_private_lock = threading.Lock()


def mark_private(*fds: int) -> None:
    """Record fds that a fork child must close at once."""
    with _private_lock:
        _private.update(fds)


def unmark_private(*fds: int) -> None:
    """Forget fds recorded by :func:`mark_private` (call before closing them)."""
    with _private_lock:
        _private.difference_update(fds)


def close_private_fds_in_child(keep: tuple[int, ...] = ()) -> None:
    """In a fresh fork child: close the parent's private fds, except ``keep``."""
    for fd in list(_private):
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass
    _private.clear()


def close_quietly(*fds: int | None) -> None:
    """Close each fd that is not None, ignoring ones already closed."""
    unmark_private(*(fd for fd in fds if fd is not None))  # its number may be reused
    for fd in fds:
        if fd is not None and fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


_pidfd_ok: bool | None = None


def pidfd_supported() -> bool:
    """True if this kernel gives pollable process descriptors (Linux 5.3+)."""
    global _pidfd_ok
    if _pidfd_ok is None:
        fd = process_sentinel(os.getpid(), probe=True)
        _pidfd_ok = fd is not None
        close_quietly(fd)
    return _pidfd_ok


def process_sentinel(pid: int, probe: bool = False) -> int | None:
    """A descriptor readable once process ``pid`` ends (Linux pidfd), or None if unsupported."""
    opener = getattr(os, "pidfd_open", None)
    if opener is None or (not probe and _pidfd_ok is False):
        return None
    try:
        return opener(pid)
    except OSError:
        return None  # kernels before 5.3, or seccomp-restricted sandboxes
