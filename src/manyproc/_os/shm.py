"""POSIX shared-memory segments, and the names manyproc gives its named kernel objects.

Every segment and semaphore manyproc names itself is called

    /mpc<family><kind><random>      e.g.  /mpc1f3a2bm5c0d9e8f7a6b

``<family>`` is the process id (hex) of the first process of the family, inherited by
every child, so that a test harness can tell this run's objects from those of other
programs (see :func:`list_named_objects`); ``<kind>`` is ``m`` for shared memory,
``s`` for a semaphore and ``o`` for the out-of-band buffers of one message
(:mod:`manyproc._bigdata`).  The whole name stays under the 31 characters macOS allows.
On Linux, segments appear in ``/dev/shm`` as ``mpc...`` and semaphores as ``sem.mpc...``.
"""

from __future__ import annotations

import os
import secrets
import sys

try:
    import _posixshmem
except ImportError:  # pragma: no cover - every POSIX CPython build has it
    _posixshmem = None

__all__ = [
    "NAME_PREFIX", "MAX_NAME_LENGTH", "family_token", "new_name", "check_name",
    "open_segment", "unlink_segment", "list_named_objects",
]

NAME_PREFIX = "mpc"
SHM_KIND = "m"
SEMAPHORE_KIND = "s"
BUFFER_KIND = "o"

# macOS limits shm and semaphore names to 31 bytes, leading slash included.
MAX_NAME_LENGTH = 31 if sys.platform == "darwin" else 255

SHM_DIR = "/dev/shm"  # Linux only; elsewhere named objects cannot be listed

_family: dict[str, str | None] = {"token": None}


def family_token() -> str:
    """The family part of generated names: the first process's pid, in hex."""
    token = _family["token"]
    if token is None:
        token = _family["token"] = f"{os.getpid():x}"
    return token


def set_family_token(token: str | None) -> None:
    """Adopt the parent's family token (called in a spawned child)."""
    _family["token"] = token


def new_name(kind: str) -> str:
    """A fresh random name with a leading slash for a segment (``"m"``) or semaphore (``"s"``)."""
    return f"/{NAME_PREFIX}{family_token()}{kind}{secrets.token_hex(6)}"


def check_name(name: object, what: str = "shared memory name") -> str:
    """Return ``name`` if the kernel can use it as a segment name, else raise.

    Raises:
        TypeError: ``name`` is not a string.
        ValueError: it is empty, contains a NUL or a slash after the first
            character, or is longer than this platform allows.
    """
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, not {type(name).__name__} ({name!r})")
    bare = name[1:] if name.startswith("/") else name
    if not bare:
        raise ValueError(f"{what} must not be empty (got {name!r}); pass a name like 'my_block' "
                         "or leave it out to get a fresh one")
    if "\0" in name:
        raise ValueError(f"{what} must not contain a NUL character: {name!r}")
    if "/" in bare:
        raise ValueError(f"{what} may not contain '/' except as its first character: {name!r}")
    if len(bare.encode()) + 1 > MAX_NAME_LENGTH:
        raise ValueError(
            f"{what} {name!r} is too long: this platform allows {MAX_NAME_LENGTH - 1} bytes "
            "(plus a leading slash); use a shorter name")
    return name


def _require_posixshmem() -> None:
    if _posixshmem is None:
        raise OSError("POSIX shared memory (_posixshmem) is not available in this Python build")


def open_segment(name: str, flags: int, mode: int = 0o600) -> int:
    """``shm_open`` a segment; ``name`` carries its leading slash. Returns a new fd."""
    _require_posixshmem()
    return int(_posixshmem.shm_open(name, flags, mode=mode))


def unlink_segment(name: str) -> None:
    """``shm_unlink`` a segment; FileNotFoundError if it is already gone."""
    _require_posixshmem()
    _posixshmem.shm_unlink(name)


def list_named_objects(family: str | None = "") -> list[str]:
    """List manyproc's segments and semaphores that exist right now (Linux; else ``[]``).

    Args:
        family: ``""`` (the default) lists this process family's objects only;
            ``None`` lists those of every manyproc program on the machine; another
            string lists the family with that token.

    Returns:
        Entry names as they appear in ``/dev/shm``: ``mpc...`` for segments and
        ``sem.mpc...`` for semaphores, sorted.
    """
    try:
        entries = os.listdir(SHM_DIR)
    except OSError:
        return []
    stem = NAME_PREFIX + (family_token() if family == "" else (family or ""))
    found = []
    for entry in entries:
        bare = entry[4:] if entry.startswith("sem.") else entry
        if bare.startswith(stem):
            if family is None or bare[len(stem):len(stem) + 1] in (SHM_KIND, SEMAPHORE_KIND,
                                                                   BUFFER_KIND):
                found.append(entry)
    return sorted(found)
