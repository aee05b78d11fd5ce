"""Named blocks of shared memory that any process can attach to: SharedMemory and ShareableList.

Lifecycle, without surprises:

* The process that *creates* a block owns it.  The block's name is removed when
  the owner calls :meth:`SharedMemory.unlink`, or else when the owner exits --
  normally, by an exception, or killed with SIGKILL (the resource tracker does
  it then).  Pass ``track=False`` to keep a block after its creator has gone; then
  someone must call ``unlink()``.
* Processes that only *attach* (by name, or by receiving the object) never remove
  the block when they exit, and nothing is ever reported as "leaked".
* Removing a name never unmaps memory: processes still attached keep using it
  until they ``close()``.
"""

from __future__ import annotations

import mmap
import os
import struct
import types
from collections.abc import Iterable
from typing import Any

from ._os import shm as _shm

__all__ = ["SharedMemory", "ShareableList"]

_USE_POSIX = True
_SHM_NAME_PREFIX = "/" + _shm.NAME_PREFIX
_O_CREX = os.O_CREAT | os.O_EXCL


def _make_filename() -> str:
    """A fresh random segment name, with its leading slash."""
    return _shm.new_name(_shm.SHM_KIND)


class SharedMemory:
    """A block of memory shared between processes, found by name.

    Args:
        name: the block's name; ``None`` (with ``create=True``) picks a fresh one.
        create: make a new block (``FileExistsError`` if the name is taken) instead
            of attaching to an existing one (``FileNotFoundError`` if there is none).
        size: bytes to allocate when creating; ignored when attaching.
        track: (keyword-only) when creating, remove the block when this process
            exits if it has not been unlinked by then.  ``False`` leaves it to you.

    Raises:
        ValueError: a bad size, or ``name=None`` without ``create=True``.
        FileNotFoundError: attaching to a name that does not exist.
        FileExistsError: creating a name that exists.
    """

    # Read by subclasses that change how the segment is opened.
    _flags = os.O_RDWR
    _mode = 0o600

    _fd = -1
    _close_fd = staticmethod(os.close)  # still reachable from __del__ at interpreter exit
    _mmap: mmap.mmap | None = None
    _buf: memoryview | None = None
    _owner_pid: int | None = None

    def __init__(self, name: str | None = None, create: bool = False, size: int = 0, *,
                 track: bool = True) -> None:
        if not isinstance(size, int) or isinstance(size, bool):
            raise TypeError(f"size must be an int, not {type(size).__name__} ({size!r})")
        if size < 0:
            raise ValueError(f"'size' must be a positive integer, got {size}")
        if create:
            self._flags = _O_CREX | os.O_RDWR
            if size == 0:
                raise ValueError("'size' must be a positive number different from zero when "
                                 "create=True; pass size=<bytes>")
        if name is None and not self._flags & os.O_EXCL:
            raise ValueError("'name' can only be None if create=True: pass the name of the "
                             "block to attach to, or create=True to make a new one")
        self._track = bool(track)
        if name is None:
            self._fd, self._name = self._create_unnamed(size)
        else:
            if not isinstance(name, str):
                raise TypeError(f"name must be a str or None, not {type(name).__name__} "
                                f"({name!r})")
            self._name = _shm.check_name(name if name.startswith("/") else "/" + name)
            self._fd = self._open_named(self._name, create)
        try:
            if create:
                os.ftruncate(self._fd, size)
            stats = os.fstat(self._fd)
            self._size = stats.st_size
            if self._size == 0:
                raise ValueError(f"shared memory block {self.name!r} is empty (size 0) and cannot "
                                 "be mapped; its creator must give it a size")
            self._mmap = mmap.mmap(self._fd, self._size)
        except BaseException:
            self._abandon(create)
            raise
        self._buf = memoryview(self._mmap)

    # ----------------------------------------------------------------- opening

    def _register(self, name: str) -> None:
        from . import resource_tracker

        resource_tracker.register(name, "shared_memory")
        self._owner_pid = os.getpid()

    def _unregister(self) -> None:
        if self._owner_pid is not None and self._owner_pid == os.getpid():
            from . import resource_tracker

            resource_tracker.unregister(self._name, "shared_memory")
        self._owner_pid = None

    def _create_unnamed(self, size: int) -> tuple[int, str]:
        while True:
            name = _make_filename()
            if self._track:
                self._register(name)
            try:
                return _shm.open_segment(name, self._flags, self._mode), name
            except FileExistsError:
                self._name = name
                self._unregister()
            except BaseException:
                self._name = name
                self._unregister()
                raise

    def _open_named(self, name: str, create: bool) -> int:
        tracked = create and self._track
        if tracked:
            self._register(name)
        try:
            return _shm.open_segment(name, self._flags, self._mode)
        except FileNotFoundError:
            if tracked:
                self._unregister()
            raise FileNotFoundError(
                2, f"No shared memory block named {name[1:]!r}: it was never created, or its "
                "owner unlinked it or exited; pass create=True, size=... to make one",
                name) from None
        except BaseException:
            if tracked:
                self._unregister()
            raise

    def _abandon(self, created: bool) -> None:
        """Undo a half-made block (mapping failed)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if created:
            try:
                _shm.unlink_segment(self._name)
            except OSError:
                pass
            self._unregister()

    # ----------------------------------------------------------------- public

    def __del__(self) -> None:
        try:
            self.close()
        except (OSError, BufferError):
            pass

    def __reduce__(self) -> Any:
        return (type(self), (self.name, False, self.size))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, size={self.size})"

    @property
    def buf(self) -> memoryview | None:
        """A memoryview of the block's bytes (None once closed)."""
        return self._buf

    @property
    def name(self) -> str:
        """The name other processes attach with (no leading slash)."""
        return self._name[1:] if self._name.startswith("/") else self._name

    @property
    def size(self) -> int:
        """The block's size in bytes (the system may round it up to whole pages)."""
        return self._size

    def close(self) -> None:
        """Unmap the block from this process; it stays available to others.

        Raises:
            BufferError: views of ``buf`` (numpy arrays, memoryview slices, ctypes
                objects) still exist; delete them first.
        """
        if self._buf is not None:
            self._buf.release()
            self._buf = None
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                raise BufferError(
                    f"cannot close shared memory {self.name!r}: objects made from its buf "
                    "(numpy arrays, memoryview slices, ctypes.from_buffer objects) still "
                    "exist; delete them before close()") from None
            self._mmap = None
        if self._fd >= 0:
            self._close_fd(self._fd)
            self._fd = -1

    def unlink(self) -> None:
        """Remove the block's name, so no one else can attach; attached processes keep it.

        Call it once, from one process (usually the creator).

        Raises:
            FileNotFoundError: the name was already removed.
        """
        try:
            _shm.unlink_segment(self._name)
        finally:
            self._unregister()


# --------------------------------------------------------------------------- ShareableList

_ENCODING = "utf-8"
_SLOT = 8  # every stored item takes a multiple of 8 bytes

# Packing format of each storable type (str and bytes get "<n>s", n a multiple of 8);
# the layout is the standard library's, so either can attach to the other's lists.
_FORMAT_OF: dict[type, str] = {
    int: "q",
    float: "d",
    bool: "xxxxxxx?",
    type(None): "xxxxxx?x",
}
_AS_IS, _AS_STR, _AS_BYTES, _AS_NONE = 0, 1, 2, 3


class _UnsupportedItem(TypeError, KeyError):
    """A ShareableList item of a type it cannot store (also a KeyError, as in the stdlib)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _item_layout(item: Any) -> tuple[str, int, Any]:
    """``(format, decode code, value to pack)`` for one item."""
    if isinstance(item, str):
        data = item.encode(_ENCODING)
        # The standard library sizes by characters (so lists made by either look the
        # same); non-ASCII text may need more bytes than that, and gets them.
        room = max(_SLOT * (len(item) // _SLOT + 1), -(-len(data) // _SLOT) * _SLOT)
        return f"{room}s", _AS_STR, data
    if isinstance(item, bytes):
        return f"{_SLOT * (len(item) // _SLOT + 1)}s", _AS_BYTES, item
    fmt = _FORMAT_OF.get(type(item))
    if fmt is None:
        raise _UnsupportedItem(
            f"ShareableList cannot store {type(item).__name__} values ({item!r}); it holds "
            "int, float, bool, str, bytes and None only")
    return fmt, (_AS_NONE if item is None else _AS_IS), item


def _decode(code: int, value: Any) -> Any:
    if code == _AS_STR:
        return value.rstrip(b"\x00").decode(_ENCODING)
    if code == _AS_BYTES:
        return value.rstrip(b"\x00")
    if code == _AS_NONE:
        return None
    return value


class ShareableList:
    """A fixed-length list of int, float, bool, str, bytes and None in one shared block.

    Items can be replaced but the length cannot change; a str or bytes item may be
    replaced by one that fits the space given to the original.

    Layout of the block (8-byte little fields, as in the standard library)::

        [n] [offset_0 .. offset_n] [item data ...] [n formats, 8 bytes each] [n codes]
    """

    def __init__(self, sequence: Iterable[Any] | None = None, *, name: str | None = None) -> None:
        if name is not None and sequence is None:
            self.shm = SharedMemory(name)
            self._read_header()
            return
        items = list(sequence or ())
        layouts = [_item_layout(item) for item in items]
        offsets = [0]
        for fmt, _, _ in layouts:
            offsets.append(offsets[-1] + (int(fmt[:-1]) if fmt.endswith("s") else _SLOT))
        n = len(items)
        total = (n + 2) * 8 + offsets[-1] + n * 8 + n
        self.shm = SharedMemory(name, create=True, size=total)
        buf = self._writable()
        struct.pack_into(f"q{n + 1}q", buf, 0, n, *offsets)
        self._length = n
        self._offsets = offsets
        data_start = self._data_start
        for i, (fmt, code, value) in enumerate(layouts):
            struct.pack_into(fmt, buf, data_start + offsets[i], value)
            self._write_meta(i, fmt, code)

    # ----------------------------------------------------------------- layout

    def _writable(self) -> memoryview:
        buf = self.shm.buf
        if buf is None:
            raise ValueError(f"the shared memory of this ShareableList ({self.shm.name!r}) "
                             "is closed")
        return buf

    def _read_header(self) -> None:
        buf = self._writable()
        (n,) = struct.unpack_from("q", buf, 0)
        self._length = n
        self._offsets = list(struct.unpack_from(f"{n + 1}q", buf, 8))

    @property
    def _data_start(self) -> int:
        return (self._length + 2) * 8

    @property
    def _formats_start(self) -> int:
        return self._data_start + self._offsets[-1]

    @property
    def _codes_start(self) -> int:
        return self._formats_start + self._length * 8

    def _write_meta(self, i: int, fmt: str, code: int) -> None:
        buf = self._writable()
        struct.pack_into("8s", buf, self._formats_start + i * 8, fmt.encode(_ENCODING))
        struct.pack_into("b", buf, self._codes_start + i, code)

    def _get_packing_format(self, position: int) -> str:
        """The struct format of the item at ``position``."""
        raw = struct.unpack_from("8s", self._writable(), self._formats_start + position * 8)[0]
        return str(raw.rstrip(b"\x00").decode(_ENCODING))

    def _index(self, position: int) -> int:
        if not isinstance(position, int):
            raise TypeError(f"ShareableList indices must be integers, not "
                            f"{type(position).__name__}")
        i = position + self._length if position < 0 else position
        if not 0 <= i < self._length:
            raise IndexError(f"ShareableList index {position} out of range "
                             f"(length {self._length})")
        return i

    # ----------------------------------------------------------------- sequence

    def __getitem__(self, position: int) -> Any:
        i = self._index(position)
        buf = self._writable()
        fmt = self._get_packing_format(i)
        (value,) = struct.unpack_from(fmt, buf, self._data_start + self._offsets[i])
        (code,) = struct.unpack_from("b", buf, self._codes_start + i)
        return _decode(code, value)

    def __setitem__(self, position: int, value: Any) -> None:
        i = self._index(position)
        fmt, code, packed = _item_layout(value)
        room = self._offsets[i + 1] - self._offsets[i]
        if code in (_AS_STR, _AS_BYTES):
            if len(packed) > room:
                raise ValueError(
                    f"bytes/str item exceeds available storage: {len(packed)} bytes given, "
                    f"position {position} has room for {room}")
            fmt = f"{room}s"
        elif struct.calcsize(fmt) > room:  # pragma: no cover - every slot is >= 8 bytes
            raise ValueError(f"item exceeds available storage at position {position}")
        struct.pack_into(fmt, self._writable(), self._data_start + self._offsets[i], packed)
        self._write_meta(i, fmt, code)

    def __len__(self) -> int:
        return int(struct.unpack_from("q", self._writable(), 0)[0])

    def __iter__(self) -> Any:
        return (self[i] for i in range(self._length))

    def __reduce__(self) -> Any:
        return (_attach_list, (type(self), self.shm.name))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({list(self)}, name={self.shm.name!r})"

    @property
    def format(self) -> str:
        """The struct format of all items, concatenated."""
        return "".join(self._get_packing_format(i) for i in range(self._length))

    def count(self, value: Any) -> int:
        """How many items equal ``value``."""
        return sum(1 for item in self if item == value)

    def index(self, value: Any) -> int:
        """The position of the first item equal to ``value``.

        Raises:
            ValueError: no item equals ``value``.
        """
        for position, item in enumerate(self):
            if item == value:
                return position
        raise ValueError(f"{value!r} not in this container")

    __class_getitem__: Any = classmethod(types.GenericAlias)


def _attach_list(cls: type[ShareableList], name: str) -> ShareableList:
    return cls(name=name)
