"""Named POSIX semaphores, through CPython's C helper ``_multiprocessing.SemLock``.

The C object does the real work (``sem_open``/``sem_wait`` with timeouts, recursion
counting for recursive mutexes, ownership checks); this module only names, opens,
re-opens and unlinks them, and says clearly when the platform lacks them.
"""

from __future__ import annotations

import sys

from . import shm

TYPE_CHECKING = False  # typing costs import time in every child; only checkers need it
if TYPE_CHECKING:
    from typing import Any

try:
    from _multiprocessing import SemLock as _CSemLock
    from _multiprocessing import sem_unlink as _sem_unlink
except ImportError:  # pragma: no cover - platforms without a working sem_open
    _CSemLock = None
    _sem_unlink = None

__all__ = [
    "RECURSIVE_MUTEX", "SEMAPHORE", "SEM_VALUE_MAX", "HAVE_GET_VALUE",
    "require", "create", "reopen", "unlink",
]

# The two kinds the C type knows.
RECURSIVE_MUTEX = 0
SEMAPHORE = 1

SEM_VALUE_MAX: int = getattr(_CSemLock, "SEM_VALUE_MAX", 2**31 - 1)

# macOS has no sem_getvalue(): a semaphore's value cannot be read there.
HAVE_GET_VALUE = sys.platform != "darwin"

_MAX_NAME_ATTEMPTS = 100


def require() -> None:
    """Raise ImportError with an explanation if this Python cannot make named semaphores."""
    if _CSemLock is None:
        raise ImportError(
            "this platform lacks a working sem_open(), so manyproc's locks and semaphores "
            "are unavailable; use threading primitives with manyproc.dummy, or a Manager")


def create(kind: int, value: int, maxvalue: int, *, unlink_now: bool,
           before: Any = None, failed: Any = None) -> Any:
    """Create a semaphore under a fresh name and return the C object.

    Args:
        kind: :data:`SEMAPHORE` or :data:`RECURSIVE_MUTEX`.
        value: initial value.
        maxvalue: the value ``release()`` may not exceed.
        unlink_now: remove the name at once (the object lives on; only processes
            forked from this one can use it).
        before: called with the name before the kernel object exists, so it can be
            registered for cleanup before there is anything to leak.
        failed: called with the name if creating under that name failed.
    """
    require()
    for _ in range(_MAX_NAME_ATTEMPTS):
        name = shm.new_name(shm.SEMAPHORE_KIND)
        if before is not None:
            before(name)
        try:
            return _CSemLock(kind, value, maxvalue, name, unlink_now)
        except FileExistsError:
            if failed is not None:
                failed(name)
        except BaseException:
            if failed is not None:
                failed(name)
            raise
    raise FileExistsError(f"could not find a free semaphore name after {_MAX_NAME_ATTEMPTS} "
                          "attempts; is /dev/shm full of stale 'sem.mpc*' entries?")


def reopen(handle: int, kind: int, maxvalue: int, name: str | None) -> Any:
    """Open in this process a semaphore created elsewhere (by name, or by inherited handle)."""
    require()
    return _CSemLock._rebuild(handle, kind, maxvalue, name)


def unlink(name: str) -> None:
    """Remove a semaphore's name; FileNotFoundError if it is already gone."""
    require()
    _sem_unlink(name)
