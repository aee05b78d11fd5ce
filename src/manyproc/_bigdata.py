"""Large buffers cross processes through shared memory instead of through the pipe.

A message whose big buffers -- ``bytes``, ``bytearray`` and arrays of 64 KiB or
more each -- add up to :func:`get_threshold` bytes (1 MiB by default) is not
written to the pipe.  Its bytes are copied once into a fresh POSIX shared-memory
segment, and the pipe carries only a small *reference* to it::

    sender                                          receiver
    ------                                          --------
    pickle (protocol 5, the usual per-thread        pickle.loads(reference)
    pickler); the big buffers arrive as their         -> _attach(name, layout):
    own parts, uncopied                                  open, unlink the name at once,
    tracker: DEFER removal until sender and              tracker: UNDEFER it; read the
      family root have ended                             pickle and the bytes/bytearray
    segment <- pickle + buffers (one pwritev)            copies, shrink the segment to its
    pipe    <- reference (~150 bytes)                    arrays, map it; pickle.loads(
                                                           stream, buffers=[views, copies])

What the receiver gets:

* a numpy array (anything that pickles through protocol-5 ``PickleBuffer``:
  pandas, Arrow, user classes) is built *on the mapping*, with no copy; it is
  writable if the sender's was, and the memory goes back to the system when the
  last object that uses it dies;
* ``bytes`` and ``bytearray`` keep their types, so they are copied out of the
  segment once (still cheaper than the pipe for big ones);
* everything else (the pickle stream itself) is read from the segment, not the pipe.

The reference is itself a pickle (of a call to :func:`_attach`), so *any* code that
unpickles the frame -- ``Connection.recv``, ``Queue.get``, ``pickle.loads`` on what
``recv_bytes`` returned -- gets the object, and no receiver needs a flag.  A
reference can be loaded once: loading it takes the segment.

Lifetime, without leaks:

* the receiver removes the segment's name as soon as it opens it (POSIX keeps an
  unlinked segment alive while it is mapped);
* before creating a segment the sender asks the family's resource tracker to remove
  it once both the sender and the family's first process (the "root") have ended.
  So a message outlives a sender that exits or is killed right after sending (the
  usual "put the result and return" worker), and a message that is never read
  (receiver killed, queue dropped) is removed when the program ends;
* the receiver tells the sender's tracker that it took the segment, which cancels
  the deferred removal; a tracker that nobody could tell (its socket went with the
  process that started it) notices the name is gone within two seconds.  So the
  tracker's books hold only messages in flight, and it can exit when idle;
* a send that fails because the reader is gone removes its segment, and those of
  earlier messages that reader never took;
* if shared memory cannot be used (no tracker, ``/dev/shm`` full or too small,
  too many open files), the message goes through the pipe as before.

Backpressure: a pipe holds 64 KiB, so a writer that outruns its reader blocks.
References are small, so ``Connection.send`` keeps a :class:`Backlog` and blocks
while more than ``max(64 MiB, 2 x the message)`` it sent is still unread.

Where it is used: connections made by :func:`manyproc.Pipe` (both ends are on this
host), and so queues.  Never on ``Listener``/``Client`` connections (the peer may be
on another host, or the standard library), nor on a ``Connection`` built around a
raw fd unless asked for with ``Connection(fd, shm_buffers=True)``.

API for channels that frame their own messages (the pool's worker pipes)::

    payload = _bigdata.dumps(obj)        # bytes, like reduction.dumps
    payload = _bigdata.dumps(obj, by_value=False)   # like pickle.dumps(obj, 5) (results)
    parts = _bigdata.dumps_parts(obj)    # bytes or list of parts, like reduction.dumps_parts
    obj = pickle.loads(payload)          # nothing special on the receiving side
    _bigdata.release(payload)            # a payload that will never be sent or read

Only use them where the reader is a process on this host that imports manyproc,
and load each payload exactly once (a payload that is loaded twice, or pickled
only to test that it can be, must come from ``reduction.dumps`` instead).
Thresholds: :func:`get_threshold` / :func:`set_threshold`, also reachable as
``manyproc.reduction.get_shm_threshold`` / ``set_shm_threshold``.
"""

from __future__ import annotations

import copyreg
import errno
import mmap
import os
import pickle
import re
import select
import sys
import time
from collections.abc import Iterable

from . import reduction, util
from ._os import shm

TYPE_CHECKING = False  # typing costs import time in every child; only checkers need it
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "DEFAULT_THRESHOLD", "SharedBufferError", "get_threshold", "set_threshold",
    "dumps", "dumps_parts", "release", "Backlog",
]

#: Messages whose big buffers add up to this many bytes travel through shared memory.
DEFAULT_THRESHOLD = 1 << 20
#: Environment variable overriding the default: bytes, with an optional K/M/G
#: suffix (powers of 1024), or ``off`` to always use the pipe.
THRESHOLD_ENV = "MANYPROC_SHM_THRESHOLD"
#: Buffers start at multiples of this in the segment (cache line; SIMD loads).
ALIGN = 64
#: The pickler hands over buffers of at least this size as parts of their own.
_PART_MIN = 64 << 10
#: Version of the reference format; a receiver refuses versions it does not know.
FORMAT = 1

_LINUX = sys.platform.startswith("linux")

# Pickle opcodes (see pickletools): what precedes an in-band buffer, what replaces it.
_BINBYTES = b"B"          # + uint32 length
_BINBYTES8 = b"\x8e"      # + uint64 length
_BYTEARRAY8 = b"\x96"     # + uint64 length
_FRAME = 0x95             # + uint64 length, first byte of each flushed frame
_NEXT_BUFFER = b"\x97"
_READONLY_BUFFER = b"\x98"

# How each buffer reaches the receiver (one letter in the reference):
_VIEW = "w"       # a writable view of the mapping (a PickleBuffer over writable memory)
_VIEW_RO = "r"    # a read-only view (READONLY_BUFFER follows NEXT_BUFFER in the stream)
_BYTES = "b"      # a bytes object, copied out
_BYTEARRAY = "a"  # a bytearray, copied out

_PickleBuffer = pickle.PickleBuffer
_ZEROS = bytes(ALIGN)
_IOV_MAX = 1024
try:
    _IOV_MAX = max(16, min(_IOV_MAX, os.sysconf("SC_IOV_MAX")))
except (AttributeError, ValueError, OSError):  # pragma: no cover - exotic platforms
    pass

_NAME_RE = re.compile(rf"/{shm.NAME_PREFIX}[0-9a-f]{{1,16}}{shm.BUFFER_KIND}[0-9a-f]{{12}}")


class SharedBufferError(pickle.UnpicklingError):
    """A message's shared-memory buffers cannot be attached (gone, truncated, malformed)."""


# --------------------------------------------------------------------------- threshold

_UNITS = {"": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}
_NOT_READ = object()
_threshold: Any = _NOT_READ   # int, None (off), or _NOT_READ (consult the environment)
_explicit = False             # set by set_threshold: passed on to spawned children


def _parse_threshold(text: str) -> int | None:
    value = text.strip().lower()
    if value in ("off", "none", "never", "no", "false"):
        return None
    match = re.fullmatch(r"(\d+)\s*([a-z]*)", value)
    if match is None or match.group(2) not in _UNITS:
        raise ValueError(
            f"{THRESHOLD_ENV}={text!r} is not a size: use a number of bytes with an optional "
            "K, M or G suffix (e.g. 1M, 262144), or 'off' to keep big data in the pipe")
    return int(match.group(1)) * _UNITS[match.group(2)]


def get_threshold() -> int | None:
    """How many bytes of big buffers send a message through shared memory (None: never).

    Raises:
        ValueError: the ``MANYPROC_SHM_THRESHOLD`` environment variable is malformed.
    """
    global _threshold
    value = _threshold
    if value is _NOT_READ:
        text = os.environ.get(THRESHOLD_ENV, "")
        value = _threshold = DEFAULT_THRESHOLD if not text.strip() else _parse_threshold(text)
    return value


def set_threshold(nbytes: int | None) -> None:
    """Send messages holding ``nbytes`` or more of big buffers through shared memory.

    Big buffers are ``bytes``, ``bytearray`` and protocol-5 buffers (numpy arrays)
    of 64 KiB or more each; a message without them always goes through the pipe.

    Applies to this process and to the children it starts afterwards (forked ones
    inherit it, spawned ones are told).

    Args:
        nbytes: a size in bytes (``0``: every message holding a big buffer);
            ``None`` keeps everything in the pipe.

    Raises:
        TypeError: ``nbytes`` is not an int or None.
        ValueError: ``nbytes`` is negative.
    """
    global _threshold, _explicit
    if nbytes is not None:
        if isinstance(nbytes, bool) or not isinstance(nbytes, int):
            raise TypeError(f"the shared-memory threshold must be an int (bytes) or None, not "
                            f"{type(nbytes).__name__} {nbytes!r}")
        if nbytes < 0:
            raise ValueError(f"the shared-memory threshold must be >= 0 bytes, not {nbytes}; "
                             "pass None to keep every message in the pipe")
    _threshold = nbytes
    _explicit = True


def _get_spawn_state() -> Any:
    return {"family": shm.family_token(), "threshold": (_threshold,) if _explicit else None}


def _set_spawn_state(state: Any) -> None:
    global _threshold, _explicit
    # The family's first process bounds the life of unread messages: a spawned child
    # must know it even if its parent never used the resource tracker.
    shm.set_family_token(state["family"])
    if state["threshold"] is not None:
        _threshold, _explicit = state["threshold"][0], True


util.register_spawn_state(__name__)
# Fix the family now, in the process that makes the pipes: children forked later
# inherit it (computed lazily in a child, it would name the child itself).
shm.family_token()


# --------------------------------------------------------------------------- sending


class _Reference(bytes):
    """The pickled reference to a message in shared memory (what goes into the pipe).

    A ``bytes`` that also knows its segment's name and size, so a failed send can
    free it and a sender can count what it has in flight.
    """

    segment: str = ""
    size: int = 0


class _Call:
    """Pickles as ``_attach(*args)``: the reference's content."""

    __slots__ = ("args",)

    def __init__(self, args: tuple[Any, ...]) -> None:
        self.args = args

    def __reduce__(self) -> Any:
        return _attach, self.args


def dumps_parts(obj: Any, *, by_value: bool = True) -> Any:
    """Pickle ``obj`` like :func:`manyproc.reduction.dumps_parts`, big ones via shared memory.

    Args:
        obj: what to send.
        by_value: as :func:`manyproc.reduction.dumps` (cloudpickle for lambdas and
            the like); ``False`` pickles by reference only, as the standard pickle
            does, plus manyproc's reducers (what a pool sends back as results).

    Returns:
        ``bytes`` (a small pickle, or the reference to a segment) or a list of
        parts to send back to back (a large pickle that stays in the pipe).

    Raises:
        pickle.PicklingError, TypeError, AttributeError: ``obj`` cannot be pickled.
    """
    out = reduction._dumps_uncopied(obj) if by_value else _dumps_by_reference(obj)
    if type(out) is bytes:
        return out
    threshold = get_threshold()
    if threshold is not None:
        ref = _divert(out, threshold)
        if ref is not None:
            return ref
    # A snapshot, as reduction.dumps_parts makes: mutable buffers are copied now.
    return [p if type(p) is bytes else bytes(p) for p in out]


def dumps(obj: Any, *, by_value: bool = True) -> bytes:
    """Pickle ``obj`` like :func:`manyproc.reduction.dumps`, big ones via shared memory.

    ``by_value`` is as for :func:`dumps_parts`.
    """
    out = dumps_parts(obj, by_value=by_value)
    return out if type(out) is bytes or type(out) is _Reference else b"".join(out)


def _dumps_by_reference(obj: Any) -> Any:
    """Pickle with the plain C pickler (no cloudpickle) and manyproc's reducers; raw parts."""
    sink = reduction._Sink()
    pickler = pickle.Pickler(sink, reduction.PROTOCOL)
    pickler.dispatch_table = {**copyreg.dispatch_table,
                              **reduction.ForkingPickler._extra_reducers}
    pickler.dump(obj)
    parts = sink.parts
    return parts[0] if len(parts) == 1 and type(parts[0]) is bytes else parts


def release(payload: Any) -> None:
    """Free the segment of a payload that will never be sent or read (nothing otherwise)."""
    name = getattr(payload, "segment", "")
    if name:
        _forget([name], unlink=True)


def _header_ok(head: Any, opcode: bytes, size: int) -> int:
    """Length of the in-band header at the end of ``head`` if it announces ``size``, else 0."""
    if opcode == _BINBYTES and size > 0xFFFFFFFF:
        opcode = _BINBYTES8
    if opcode == _BINBYTES:
        tail = opcode + size.to_bytes(4, "little")
    else:
        tail = opcode + size.to_bytes(8, "little")
    return len(tail) if type(head) is bytes and head.endswith(tail) else 0


def _plan(parts: list[Any]) -> tuple[list[Any], list[tuple[Any, str]]]:
    """Split the pickler's parts into a stream with NEXT_BUFFER opcodes and the buffers.

    The C pickler writes each buffer of 64 KiB or more as a part of its own, right
    after a part that ends with the buffer's in-band header (BINBYTES or
    BYTEARRAY8 and the length).  Each such buffer is replaced by NEXT_BUFFER (and
    READONLY_BUFFER for a read-only PickleBuffer), so the receiver can supply it.
    Anything that does not match exactly stays in the stream.
    """
    stream: list[Any] = []
    buffers: list[tuple[Any, str]] = []
    for part in parts:
        kind = ""
        t = type(part)
        if t is bytes:
            size = len(part)
            if size >= _PART_MIN and not (
                    part[0] == _FRAME and int.from_bytes(part[1:9], "little") == size - 9):
                kind, opcode, data = _BYTES, _BINBYTES, part
        elif t is _PickleBuffer:
            data = part.raw()
            size = data.nbytes
            kind, opcode = (_VIEW_RO, _BINBYTES) if data.readonly else (_VIEW, _BYTEARRAY8)
        elif t is bytearray:
            size = len(part)
            kind, opcode, data = _BYTEARRAY, _BYTEARRAY8, part
        if kind and stream:
            cut = _header_ok(stream[-1], opcode, size)
            if cut:
                op = _NEXT_BUFFER + _READONLY_BUFFER if kind == _VIEW_RO else _NEXT_BUFFER
                stream[-1] = stream[-1][:-cut] + op
                buffers.append((data, kind))
                continue
        stream.append(part if t is bytes else bytes(part))
    return stream, buffers


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


def _divert(parts: list[Any], threshold: int) -> _Reference | None:
    """Put a pickle with big buffers into a new segment; return the reference, or None.

    Only buffers count: a big pickle of many small objects (a long list, a long
    str) gains nothing from shared memory (measured: 0.8-1.1x), so it stays in
    the pipe; a message with big buffers puts all of its pickle in the segment.
    """
    stream, buffers = _plan(parts)
    if not buffers or sum(_len(data) for data, _ in buffers) < threshold:
        return None
    # Layout: views first (the receiver keeps only them mapped and truncates the rest
    # away), then the pickle stream, then the buffers the receiver copies out.
    iov: list[Any] = []
    slots: list[tuple[int, int, str]] = [(0, 0, "")] * len(buffers)
    pos = 0
    for i, (data, kind) in enumerate(buffers):
        if kind == _VIEW or kind == _VIEW_RO:
            pos = _place(iov, pos, data, kind, slots, i)
    views_end = pos
    iov.extend(stream)
    stream_size = sum(map(len, stream))
    pos += stream_size
    for i, (data, kind) in enumerate(buffers):
        if kind == _BYTES or kind == _BYTEARRAY:
            pos = _place(iov, pos, data, kind, slots, i)
    created = _create(iov, pos)
    if created is None:
        return None
    name, tracker = created
    # `slots` is in stream order: the order in which the unpickler asks for buffers.
    ref = _Reference(pickle.dumps(
        _Call((FORMAT, name, tracker, pos, views_end, stream_size, tuple(slots))),
        protocol=reduction.PROTOCOL))
    ref.segment = name
    ref.size = pos
    return ref


def _place(iov: list[Any], pos: int, data: Any, kind: str,
           slots: list[tuple[int, int, str]], index: int) -> int:
    """Append ``data`` to ``iov`` at the next aligned offset; record its slot; return the end."""
    pad = _aligned(pos) - pos
    if pad:
        iov.append(_ZEROS[:pad])
        pos += pad
    n = data.nbytes if type(data) is memoryview else len(data)
    slots[index] = (pos, n, kind)
    iov.append(data)
    return pos + n


# --------------------------------------------------------------------------- backpressure

#: A sender may have this many bytes (or two messages, if more) sent and not yet taken.
BACKLOG_MIN = 64 << 20


class Backlog:
    """What one sending end has in shared memory and its reader has not taken yet.

    A pipe holds 64 KiB: a writer that runs ahead of its reader blocks.  References
    are small, so without this a writer could park hundreds of big messages in
    ``/dev/shm``.  :meth:`admit` blocks while more than ``max(BACKLOG_MIN, 2 x the
    new message)`` is in flight, as a full pipe would, and raises BrokenPipeError
    if the reading end is closed meanwhile.  Once the reader is known to be gone,
    :meth:`abandon` frees what it never took.
    """

    __slots__ = ("entries", "total")

    def __init__(self) -> None:
        self.entries: list[tuple[str, int]] = []
        self.total = 0

    def admit(self, ref: _Reference, fd: int) -> None:
        """Wait until ``ref`` fits (``fd``: the sending end, to notice a closed reader)."""
        limit = max(BACKLOG_MIN, 2 * ref.size)
        if self.total + ref.size <= limit:
            return
        delay = 0.0002
        while True:
            self.prune()
            if self.total + ref.size <= limit:
                return
            if _peer_gone(fd):
                unread = len(self.entries)
                self.abandon()
                raise BrokenPipeError(errno.EPIPE, "the reading end of the pipe is closed; "
                                      f"{unread} message(s) sent earlier were never read")
            time.sleep(delay)  # the reader takes a message: seconds at most, as a pipe
            delay = min(2 * delay, 0.005)

    def sent(self, ref: _Reference) -> None:
        self.entries.append((ref.segment, ref.size))
        self.total += ref.size

    def abandon(self) -> None:
        """The reader is gone for good: free the messages it never took."""
        entries, self.entries, self.total = self.entries, [], 0
        if entries:
            _forget([name for name, _ in entries], unlink=True)

    def prune(self) -> None:
        """Forget the messages the reader has taken."""
        kept = [(name, n) for name, n in self.entries if _exists(name)]
        self.entries = kept
        self.total = sum(n for _, n in kept)


def _exists(name: str) -> bool:
    """False once a receiver took (unlinked) the segment."""
    if _LINUX:
        return os.path.exists(shm.SHM_DIR + name)
    try:
        fd = shm.open_segment(name, os.O_RDONLY)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    os.close(fd)
    return True


def _peer_gone(fd: int) -> bool:
    """True if nobody can read what ``fd`` (a pipe or socket end) writes any more."""
    if not hasattr(select, "poll"):  # pragma: no cover - every POSIX build has it
        return False
    poller = select.poll()
    poller.register(fd, 0)  # only errors and hang-ups are reported
    return any(events & (select.POLLERR | select.POLLHUP | select.POLLNVAL)
               for _, events in poller.poll(0))


# --------------------------------------------------------------------------- segments

_RTYPE = "shared_memory"
_fallback_said: set[str] = set()


def _tracker() -> Any:
    """The resource tracker module (layer 5, imported when first needed)."""
    from . import resource_tracker

    return resource_tracker


def _use_pipe(why: str, detail: Any) -> None:
    """Say (once per reason) that big messages go through the pipe after all."""
    if why not in _fallback_said:
        _fallback_said.add(why)
        util.sub_warning("sending large messages through the pipe: %s (%s)", why, detail)


def _lifetime_pids() -> list[int]:
    """The processes whose end a message may not outlive unread: this one and the root."""
    me = os.getpid()
    try:
        root = int(shm.family_token(), 16)
    except ValueError:  # pragma: no cover - the token is always a hex pid
        return [me]
    return [me] if root == me else [me, root]


def _create(iov: list[Any], size: int) -> tuple[str, str | None] | None:
    """Create a segment holding ``iov``; None (and nothing left behind) if impossible.

    Returns the segment's name and the address of the tracker that will remove it.
    """
    if _LINUX:
        try:
            room = os.statvfs(shm.SHM_DIR)
        except OSError:
            room = None
        if room is not None and room.f_bavail * room.f_frsize < size:
            # Checked first: a copy that stops at ENOSPC half-way would cost twice.
            _use_pipe(f"{shm.SHM_DIR} has no room for {size} bytes", room.f_bavail * room.f_frsize)
            return None
    tracker = _tracker()
    name = shm.new_name(shm.BUFFER_KIND)
    if not tracker._defer_new(name, _RTYPE, _lifetime_pids()):
        _use_pipe("no resource tracker could be reached to clean up after it", name)
        return None
    try:
        fd = shm.open_segment(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    except OSError as exc:
        tracker._cancel_deferred([name], _RTYPE)
        _use_pipe("cannot create shared memory", exc)
        return None
    try:
        _fill(fd, iov, size)
    except BaseException as exc:
        os.close(fd)
        _remove(name)
        tracker._cancel_deferred([name], _RTYPE)
        if isinstance(exc, OSError):  # ENOSPC: /dev/shm is full (64 MiB in Docker)
            _use_pipe("cannot fill shared memory", exc)
            return None
        raise
    os.close(fd)
    return name, tracker._state.address


def _fill(fd: int, iov: list[Any], size: int) -> None:
    """Write the buffers of ``iov`` back to back from offset 0 of the segment ``fd``."""
    if _LINUX:
        # tmpfs takes write(): one copy, no page faults, and a full /dev/shm is a
        # clean ENOSPC instead of a SIGBUS on a mapping.
        pos = i = 0
        while i < len(iov):
            done = os.pwritev(fd, iov[i:i + _IOV_MAX], pos)
            pos += done
            while i < len(iov) and done >= _len(iov[i]):
                done -= _len(iov[i])
                i += 1
            if done:  # a short write: resume inside this buffer
                iov[i] = memoryview(iov[i]).cast("B")[done:]
        if pos != size:  # pragma: no cover - the layout adds up by construction
            raise RuntimeError(f"wrote {pos} bytes of a {size}-byte shared-memory message")
        return
    # Elsewhere (macOS) shared memory is only reachable through a mapping.
    os.ftruncate(fd, size)
    with mmap.mmap(fd, size) as mm:
        pos = 0
        for item in iov:
            n = _len(item)
            mm[pos:pos + n] = item
            pos += n


def _len(item: Any) -> int:
    return item.nbytes if type(item) is memoryview else len(item)


def _remove(name: str) -> None:
    try:
        shm.unlink_segment(name)
    except FileNotFoundError:
        pass


def _forget(names: Iterable[str], unlink: bool, tracker: str | None = None) -> None:
    """Cancel the deferred removal of ``names`` (removing the segments first if ``unlink``).

    ``tracker`` is the address of the tracker that holds them (default: ours).
    """
    names = sorted(names)
    if unlink:
        for name in names:
            _remove(name)
    _tracker()._cancel_deferred(names, _RTYPE, tracker)


# --------------------------------------------------------------------------- receiving


def _bad(detail: str) -> SharedBufferError:
    return SharedBufferError(
        f"malformed shared-memory message reference: {detail}; the frame was corrupted, or "
        "was not made by manyproc's sender")


def _check_layout(name: Any, tracker: Any, size: Any, views_end: Any, stream_size: Any,
                  slots: Any) -> None:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise _bad(f"{name!r} is not the name of a manyproc message segment")
    if tracker is not None and not isinstance(tracker, str):
        raise _bad(f"tracker address {tracker!r:.80} is not a str")
    for what, value in (("size", size), ("views_end", views_end),
                        ("stream size", stream_size)):
        if type(value) is not int or value < 0:
            raise _bad(f"{what} {value!r} is not a byte count")
    if views_end + stream_size > size:
        raise _bad(f"the pickle ({stream_size} bytes at {views_end}) runs past the end of the "
                   f"{size}-byte segment")
    if type(slots) is not tuple:
        raise _bad(f"buffer table {slots!r:.80} is not a tuple")
    for slot in slots:
        if (type(slot) is not tuple or len(slot) != 3 or type(slot[0]) is not int
                or type(slot[1]) is not int or slot[2] not in (_VIEW, _VIEW_RO, _BYTES,
                                                               _BYTEARRAY)):
            raise _bad(f"buffer entry {slot!r:.80} is not (offset, size, kind)")
        offset, n, kind = slot
        end = views_end if kind in (_VIEW, _VIEW_RO) else size
        start = 0 if kind in (_VIEW, _VIEW_RO) else views_end + stream_size
        if offset < start or n < 0 or offset + n > end:
            raise _bad(f"buffer ({n} bytes at {offset}, kind {kind!r}) lies outside its region "
                       f"[{start}, {end}) of the {size}-byte segment")


def _attach(fmt: Any, *args: Any) -> Any:
    """Rebuild a message from its segment (called by the unpickler on a reference).

    Takes the segment: its name is removed at once, the memory goes when the last
    object built on it dies.

    Raises:
        SharedBufferError: the reference is malformed, the segment is gone or has
            the wrong size.
    """
    if fmt != FORMAT or len(args) != 6:
        raise SharedBufferError(
            f"this message was sent through shared memory in format {fmt!r}, but this "
            f"manyproc reads format {FORMAT}: run the same manyproc version on both ends")
    name, tracker, size, views_end, stream_size, slots = args
    _check_layout(name, tracker, size, views_end, stream_size, slots)
    try:
        fd = shm.open_segment(name, os.O_RDWR)
    except FileNotFoundError:
        raise SharedBufferError(
            f"the shared memory {name!r} holding this {size}-byte message no longer exists: "
            "it was received already (a message can be loaded only once), or the sender and "
            "the program's first process both ended before it was read") from None
    try:
        try:
            shm.unlink_segment(name)
        except FileNotFoundError:
            raise SharedBufferError(
                f"the shared memory {name!r} of this message was taken by another receiver "
                "at the same moment: the same message was loaded twice") from None
        # Ours now: the sender's tracker need not remove it when the sender and root end.
        _forget([name], unlink=False, tracker=tracker)
        have = os.fstat(fd).st_size
        if have < size or (_LINUX and have != size):
            raise SharedBufferError(
                f"the shared memory {name!r} holds {have} bytes, but its message reference "
                f"announces {size}: the segment was changed or the reference is corrupt")
        if _LINUX:
            stream, buffers = _read_linux(fd, size, views_end, stream_size, slots)
        else:
            stream, buffers = _read_mapped(fd, size, views_end, stream_size, slots)
    finally:
        os.close(fd)
    return pickle.loads(stream, buffers=buffers)


def _read_linux(fd: int, size: int, views_end: int, stream_size: int,
                slots: tuple[Any, ...]) -> tuple[Any, list[Any]]:
    stream = _pread(fd, stream_size, views_end)
    buffers: list[Any] = []
    views = False
    for offset, n, kind in slots:
        if kind == _BYTES:
            buffers.append(_pread(fd, n, offset))
        elif kind == _BYTEARRAY:
            data = bytearray(n)
            _pread_into(fd, memoryview(data), offset)
            buffers.append(data)
        else:
            buffers.append(None)
            views = True
    if views:
        # Keep only the arrays' region, the rest is read: the truncated pages are freed.
        os.ftruncate(fd, views_end)
        with memoryview(mmap.mmap(fd, views_end)) as base:
            for i, (offset, n, _kind) in enumerate(slots):
                if buffers[i] is None:
                    buffers[i] = base[offset:offset + n]  # these keep the mapping alive
    return stream, buffers


def _read_mapped(fd: int, size: int, views_end: int, stream_size: int,
                 slots: tuple[Any, ...]) -> tuple[Any, list[Any]]:
    base = memoryview(mmap.mmap(fd, size))
    stream = bytes(base[views_end:views_end + stream_size])
    buffers: list[Any] = []
    for offset, n, kind in slots:
        view = base[offset:offset + n]
        if kind == _BYTES:
            buffers.append(bytes(view))
        elif kind == _BYTEARRAY:
            buffers.append(bytearray(view))
        else:
            buffers.append(view)
    base.release()
    return stream, buffers


def _pread(fd: int, n: int, offset: int) -> bytes:
    data = os.pread(fd, n, offset)
    if len(data) == n:
        return data
    whole = bytearray(n)
    whole[:len(data)] = data
    _pread_into(fd, memoryview(whole), offset, len(data))
    return bytes(whole)


def _pread_into(fd: int, view: memoryview, offset: int, got: int = 0) -> None:
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise SharedBufferError(f"the shared memory of this message ends {len(view) - got} "
                                    "bytes early: it was truncated")
        got += n
