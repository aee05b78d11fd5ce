"""Length-prefixed message frames over a file descriptor (a pipe end or a socket).

The layout is the standard library's, so manyproc and ``multiprocessing`` peers read
each other's frames (all integers in network byte order)::

    small frame   | int32 n              | n payload bytes |      0 <= n <= 0x7fffffff
    large frame   | int32 -1 | uint64 n  | n payload bytes |      any n (sent for n > 2 GiB)

Reading never trusts the header further than the bytes that really arrive: a
payload larger than :data:`PREALLOCATE_LIMIT` is gathered in chunks as it comes,
so a lying or corrupt header costs an error, not a huge allocation.  Every
function works on a raw fd with ``os.read``/``os.readv``/``os.write``/``os.writev``
(one syscall per step, no intermediate buffers) and never reads past the end of
the frame it was asked for: a pipe shared by many readers (a queue) stays in step.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Sequence

from ._os.waiting import wait_readable

TYPE_CHECKING = False  # typing costs import time in every child; only checkers need it
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "FrameError", "header_for", "payload_size", "write_frame", "write_frames", "read_frame",
    "read_size", "read_payload", "read_payload_into", "read_exact", "MAX_SMALL_FRAME",
    "MAX_FRAME", "PREALLOCATE_LIMIT",
]

MAX_SMALL_FRAME = 0x7FFFFFFF
#: No real sender produces more than this (256 TiB); a larger length is corruption.
MAX_FRAME = 1 << 48
#: Payloads up to this size are received into one buffer allocated from the header.
PREALLOCATE_LIMIT = 64 << 20
#: Payloads up to this size are sent as one ``header + payload`` write.
CONCAT_LIMIT = 64 << 10

_int32 = struct.Struct("!i")
_uint64 = struct.Struct("!Q")
_pack_small = _int32.pack
_unpack_small = _int32.unpack
_LARGE_MARK = _int32.pack(-1)

_IOV_MAX = 1024
try:
    _IOV_MAX = max(16, min(_IOV_MAX, os.sysconf("SC_IOV_MAX")))
except (AttributeError, ValueError, OSError):  # pragma: no cover - exotic platforms
    pass


class FrameError(OSError):
    """The byte stream does not hold a well-formed frame (corruption or a foreign peer)."""


# --------------------------------------------------------------------------- writing


def header_for(size: int) -> bytes:
    """Return the header announcing a payload of ``size`` bytes."""
    if size <= MAX_SMALL_FRAME:
        return _pack_small(size)
    return _LARGE_MARK + _uint64.pack(size)


def payload_size(payload: Any) -> int:
    """Size of a payload: one bytes-like object, or a list of parts sent back to back."""
    if type(payload) is list:
        return sum(map(len, payload))
    return len(payload)


def _write_all(fd: int, buffers: list[Any]) -> None:
    """Write every byte of ``buffers`` (bytes-like objects), resuming after short writes."""
    while buffers:
        if len(buffers) == 1:
            done = os.write(fd, buffers[0])
        else:
            done = os.writev(fd, buffers[:_IOV_MAX])
        # Drop what was written; a short write leaves the rest of one buffer pending.
        i = 0
        while i < len(buffers):
            n = len(buffers[i])
            if done < n:
                break
            done -= n
            i += 1
        rest = buffers[i:]
        if done and rest:
            rest[0] = memoryview(rest[0])[done:]
        buffers = rest


def _append_frame(buffers: list[Any], payload: Any) -> None:
    if type(payload) is list:
        buffers.append(header_for(payload_size(payload)))
        buffers.extend(payload)
    else:
        buffers.append(header_for(len(payload)))
        buffers.append(payload)


def write_frame(fd: int, payload: Any) -> None:
    """Send ``payload`` as one frame on ``fd``.

    ``payload`` is a bytes-like object of unsigned bytes, or a list of them (the
    parts of one message, as a pickler produced them).  Small frames go out as a
    single ``write`` of header and payload together, so a TCP peer never waits for a
    header segment alone (Nagle) and a reader sharing the pipe never sees a header
    without its payload pending; large ones go out with ``writev``, never copied.
    """
    if type(payload) is list:
        if len(payload) != 1:
            size = payload_size(payload)
            if size <= CONCAT_LIMIT:
                payload = b"".join(payload)
            else:
                _write_all(fd, [header_for(size), *payload])
                return
        else:
            payload = payload[0]
    size = len(payload)
    if size <= CONCAT_LIMIT:
        data = _pack_small(size) + payload
        done = os.write(fd, data)
        if done != len(data):
            _write_all(fd, [memoryview(data)[done:]])
    else:
        _write_all(fd, [header_for(size), payload])


def write_frames(fd: int, payloads: Sequence[Any]) -> None:
    """Send several payloads (see :func:`write_frame`) as consecutive frames, few syscalls."""
    total = 0
    for p in payloads:
        if type(p) is list:
            total = CONCAT_LIMIT + 1
            break
        total += len(p)
    if total <= CONCAT_LIMIT:
        data = b"".join([_pack_small(len(p)) + p for p in payloads])
        done = os.write(fd, data)
        if done != len(data):
            _write_all(fd, [memoryview(data)[done:]])
        return
    buffers: list[Any] = []
    for p in payloads:
        _append_frame(buffers, p)
    _write_all(fd, buffers)


# --------------------------------------------------------------------------- reading


def _wait(fd: int, deadline: float | None) -> None:
    """Block until ``fd`` is readable, or raise TimeoutError once ``deadline`` passes."""
    if deadline is None:
        return
    remaining = deadline - time.monotonic()
    if remaining <= 0 or not wait_readable([fd], remaining):
        raise TimeoutError("timed out waiting for data from the peer")


def read_exact(fd: int, size: int, deadline: float | None = None,
               got: int = 0, what: str = "message") -> bytes:
    """Read exactly ``size`` bytes (``size`` small: headers and handshake messages).

    Raises:
        EOFError: the peer closed before sending anything and ``got`` is 0.
        OSError: the peer closed part-way through.
        TimeoutError: ``deadline`` (a ``time.monotonic()`` value) passed first.
    """
    _wait(fd, deadline)
    data = os.read(fd, size)
    if len(data) == size:
        return data
    parts = [data]
    have = len(data)
    while True:
        if not data:
            _raise_eof(got + have, got + size, what)
        if have == size:
            return b"".join(parts)
        _wait(fd, deadline)
        data = os.read(fd, size - have)
        parts.append(data)
        have += len(data)


def _raise_eof(have: int, expected: int, what: str) -> None:
    if have == 0:
        raise EOFError("the other end of the connection was closed (end of file)")
    raise OSError(
        f"got end of file during {what}: received {have} of {expected} bytes; the sender "
        "closed its end or died part-way through sending")


def read_size(fd: int, deadline: float | None = None, head: bytes | None = None) -> int:
    """Read a frame header and return the announced payload size.

    Raises:
        EOFError: the stream ended cleanly, before any byte of a new frame.
        FrameError: the header is malformed (negative length other than the
            large-frame mark, or a length beyond :data:`MAX_FRAME`).
    """
    if head is None:
        head = os.read(fd, 4) if deadline is None else b""
    if len(head) != 4:
        head += read_exact(fd, 4 - len(head), deadline, len(head), "a message header")
    size: int = _unpack_small(head)[0]
    if size < 0:
        if size != -1:
            raise FrameError(
                f"malformed message header {head.hex()}: it announces a negative length "
                f"({size}); the peer is not speaking manyproc's or multiprocessing's framing, "
                "or two writers interleaved on the same pipe without a lock")
        size = _uint64.unpack(read_exact(fd, 8, deadline, 4, "a message header"))[0]
        if size > MAX_FRAME:
            raise FrameError(
                f"malformed message header: it announces {size} bytes, more than any real "
                f"message ({MAX_FRAME} bytes); the stream is corrupt or the peer is foreign")
    return size


def read_frame(fd: int) -> Any:
    """Read one whole frame and return its payload (``bytes``, or ``bytearray`` if large).

    The common case -- a small message already in the pipe -- costs two ``read``
    calls and no copy.
    """
    head = os.read(fd, 4)
    if len(head) == 4:
        size: int = _unpack_small(head)[0]
        if 0 < size <= CONCAT_LIMIT:
            data = os.read(fd, size)
            if len(data) == size:
                return data
            if not data:
                _raise_eof(4, size + 4, "a message")
            buf = bytearray(size)
            buf[:len(data)] = data
            read_payload_into(fd, memoryview(buf), len(data))
            return buf
    return read_payload(fd, read_size(fd, head=head))


def read_payload(fd: int, size: int, deadline: float | None = None) -> Any:
    """Read a ``size``-byte payload; return ``bytes`` or, for large ones, a ``bytearray``.

    Small payloads usually arrive in one ``read`` that builds the result directly.
    """
    if size == 0:
        return b""
    if deadline is not None:
        return read_exact(fd, size, deadline, 0, "a handshake message")
    if size <= CONCAT_LIMIT:
        data = os.read(fd, size)
        n = len(data)
        if n == size:
            return data
        if n == 0:
            _raise_eof(4, size + 4, "a message")
        buf = bytearray(size)
        buf[:n] = data
        read_payload_into(fd, memoryview(buf), n)
        return buf
    if size <= PREALLOCATE_LIMIT:
        buf = bytearray(size)
        read_payload_into(fd, memoryview(buf))
        return buf
    # Huge: collect chunks as they arrive so a false header cannot allocate for nothing.
    chunks = []
    have = 0
    while have < size:
        chunk = bytearray(min(PREALLOCATE_LIMIT, size - have))
        read_payload_into(fd, memoryview(chunk), 0, have, size)
        chunks.append(chunk)
        have += len(chunk)
    return b"".join(chunks)


def read_payload_into(fd: int, view: memoryview, start: int = 0,
                      before: int = 0, total: int | None = None) -> None:
    """Fill ``view[start:]`` (a writable byte view) with the next payload bytes from ``fd``.

    ``before`` and ``total`` only describe where ``view`` sits inside a larger
    payload, for the error message when the stream ends early.
    """
    stop = len(view)
    readv = os.readv
    while start < stop:
        n = readv(fd, [view[start:]])
        if n == 0:
            _raise_eof(4 + before + start, 4 + (total if total is not None else stop),
                       "a message")
        start += n
