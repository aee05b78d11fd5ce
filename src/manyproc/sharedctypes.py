"""ctypes objects in shared memory: ``Value``, ``Array`` and their lock-free ``Raw`` forms.

The objects live in :mod:`manyproc.heap`, so a child started with them (as a
``Process`` argument or a pool initializer argument) sees and changes the very same
bytes.  ``Value`` and ``Array`` wrap the object with a lock; each access to
``.value`` or to one item takes it, but a compound update such as ``v.value += 1``
is two accesses -- hold ``with v.get_lock():`` around it.
"""

from __future__ import annotations

import ctypes
from typing import Any

from . import heap, reduction

__all__ = ["RawValue", "RawArray", "Value", "Array", "copy", "synchronized"]

typecode_to_type: dict[str, Any] = {
    "c": ctypes.c_char, "u": ctypes.c_wchar,
    "b": ctypes.c_byte, "B": ctypes.c_ubyte,
    "h": ctypes.c_short, "H": ctypes.c_ushort,
    "i": ctypes.c_int, "I": ctypes.c_uint,
    "l": ctypes.c_long, "L": ctypes.c_ulong,
    "q": ctypes.c_longlong, "Q": ctypes.c_ulonglong,
    "f": ctypes.c_float, "d": ctypes.c_double,
}

_CTYPES_BASES = (ctypes._SimpleCData, ctypes.Structure, ctypes.Union, ctypes.Array)


def _resolve_type(typecode_or_type: Any) -> Any:
    """The ctypes type for an array-module typecode or a ctypes type.

    Raises:
        TypeError: neither a known typecode nor a ctypes type with a size.
    """
    if isinstance(typecode_or_type, str):
        try:
            return typecode_to_type[typecode_or_type]
        except KeyError:
            raise TypeError(
                f"unknown typecode {typecode_or_type!r}: use one of "
                f"{', '.join(repr(c) for c in typecode_to_type)} (as in the array module) "
                "or a ctypes type such as ctypes.c_int") from None
    if isinstance(typecode_or_type, type) and issubclass(typecode_or_type, _CTYPES_BASES):
        try:
            ctypes.sizeof(typecode_or_type)
        except TypeError:
            pass
        else:
            return typecode_or_type
    raise TypeError(
        f"expected a typecode string such as 'i' or 'd', or a ctypes type such as "
        f"ctypes.c_double, got {typecode_or_type!r}")


def _share(type_: Any, wrapper: heap.BufferWrapper, length: int | None) -> Any:
    """Build a ``type_`` (or an array of ``length`` of them) on top of ``wrapper``'s memory."""
    if length is not None:
        type_ = type_ * length
    reduction.register(type_, _reduce_shared)
    obj: Any = type_.from_buffer(wrapper.create_memoryview())
    obj._wrapper = wrapper  # keeps the memory alive as long as the object
    return obj


def _reduce_shared(obj: Any) -> Any:
    reduction.assert_spawning(obj)
    wrapper = obj._wrapper
    if isinstance(obj, ctypes.Array):
        return _share, (obj._type_, wrapper, obj._length_)
    return _share, (type(obj), wrapper, None)


def _allocate(type_: Any) -> Any:
    """A zero-filled ``type_`` object in shared memory."""
    size = ctypes.sizeof(type_)
    obj = _share(type_, heap.BufferWrapper(size), None)
    ctypes.memset(ctypes.addressof(obj), 0, size)  # blocks are reused: clear them
    return obj


def RawValue(typecode_or_type: Any, *args: Any) -> Any:  # noqa: N802 - the stdlib's name
    """A ctypes object in shared memory, initialised with ``args``; no lock.

    Raises:
        TypeError: unknown typecode or a type that is not a ctypes type.
    """
    type_ = _resolve_type(typecode_or_type)
    obj = _allocate(type_)
    if args:
        obj.__init__(*args)
    return obj


def RawArray(typecode_or_type: Any, size_or_initializer: Any) -> Any:  # noqa: N802
    """A ctypes array in shared memory: ``size`` zeros, or a copy of an initializer; no lock.

    A ``'c'`` array also accepts ``bytes`` as its initializer.

    Raises:
        TypeError: unknown typecode, or an initializer that is not a sequence.
        ValueError: a negative size.
    """
    type_ = _resolve_type(typecode_or_type)
    if isinstance(size_or_initializer, int) and not isinstance(size_or_initializer, bool):
        if size_or_initializer < 0:
            raise ValueError(f"array size must be >= 0, got {size_or_initializer}")
        return _allocate(type_ * size_or_initializer)
    init = size_or_initializer
    if type_ is ctypes.c_char and isinstance(init, (bytes, bytearray)):
        result = _allocate(type_ * len(init))
        result.raw = bytes(init)
        return result
    try:
        init = list(init)
    except TypeError:
        raise TypeError(
            f"size_or_initializer must be an int or a sequence, got "
            f"{type(size_or_initializer).__name__} ({size_or_initializer!r})") from None
    result = _allocate(type_ * len(init))
    result.__init__(*init)
    return result


def _default_lock(lock: Any, ctx: Any) -> Any:
    if lock is True or lock is None:
        if ctx is None:
            from .context import _default_context

            ctx = _default_context.get_context()
        return ctx.RLock()
    if not hasattr(lock, "acquire"):
        raise AttributeError(
            f"{lock!r} has no method 'acquire': pass lock=True (a new RLock), lock=False "
            "(no lock), or a lock object such as manyproc.Lock()")
    return lock


def Value(typecode_or_type: Any, *args: Any, lock: Any = True,  # noqa: N802
          ctx: Any = None) -> Any:
    """A shared ctypes object, with a lock unless ``lock=False``.

    Args:
        typecode_or_type: an array-module typecode (``'i'``, ``'d'``...) or a ctypes type.
        *args: the initial value (or a Structure's fields).
        lock: ``True`` for a new RLock, ``False`` for the raw object, or a lock to use.
        ctx: the context that makes the lock (default: the default context).

    Raises:
        TypeError: unknown typecode.
        AttributeError: ``lock`` is not a lock.
    """
    obj = RawValue(typecode_or_type, *args)
    if lock is False:
        return obj
    return synchronized(obj, _default_lock(lock, ctx), ctx=ctx)


def Array(typecode_or_type: Any, size_or_initializer: Any, *, lock: Any = True,  # noqa: N802
          ctx: Any = None) -> Any:
    """A shared ctypes array, with a lock unless ``lock=False`` (see :func:`Value`)."""
    obj = RawArray(typecode_or_type, size_or_initializer)
    if lock is False:
        return obj
    return synchronized(obj, _default_lock(lock, ctx), ctx=ctx)


def copy(obj: Any) -> Any:
    """A new shared object holding a copy of ``obj``'s bytes."""
    new = _allocate(type(obj))
    ctypes.pointer(new)[0] = obj
    return new


def synchronized(obj: Any, lock: Any = None, ctx: Any = None) -> Any:
    """Wrap the shared ctypes object ``obj`` so each access holds ``lock``.

    Raises:
        TypeError: ``obj`` is already synchronized.
    """
    if isinstance(obj, SynchronizedBase):
        raise TypeError(f"object already synchronized: {obj!r}")
    if isinstance(obj, ctypes._SimpleCData):
        return Synchronized(obj, lock, ctx)
    if isinstance(obj, ctypes.Array):
        if obj._type_ is ctypes.c_char:
            return SynchronizedString(obj, lock, ctx)
        return SynchronizedArray(obj, lock, ctx)
    return _structure_wrapper(type(obj))(obj, lock, ctx)


# --------------------------------------------------------------------------- wrappers


class SynchronizedBase:
    """A shared ctypes object with the lock that guards it."""

    def __init__(self, obj: Any, lock: Any = None, ctx: Any = None) -> None:
        self._obj = obj
        self._lock = lock if lock else _default_lock(True, ctx)
        self.acquire = self._lock.acquire
        self.release = self._lock.release

    def __enter__(self) -> Any:
        return self._lock.__enter__()

    def __exit__(self, *exc: Any) -> Any:
        return self._lock.__exit__(*exc)

    def __reduce__(self) -> Any:
        reduction.assert_spawning(self)
        return synchronized, (self._obj, self._lock)

    def get_obj(self) -> Any:
        """The raw shared ctypes object (access it holding the lock)."""
        return self._obj

    def get_lock(self) -> Any:
        """The lock guarding the object."""
        return self._lock

    def __repr__(self) -> str:
        return f"<{type(self).__name__} wrapper for {self._obj!r}>"


def _guarded(field: str) -> property:
    """A property reading and writing ``self._obj.<field>`` while holding the lock."""

    # acquire/release are the lock's own (C) methods bound on the instance: cheaper than
    # a with-statement, which goes through the lock class's __enter__/__exit__.
    def get(self: SynchronizedBase) -> Any:
        self.acquire()
        try:
            return getattr(self._obj, field)
        finally:
            self.release()

    def set_(self: SynchronizedBase, value: Any) -> None:
        self.acquire()
        try:
            setattr(self._obj, field, value)
        finally:
            self.release()

    return property(get, set_, doc=f"``{field}``, read and written under the lock")


class Synchronized(SynchronizedBase):
    """A shared simple value; ``.value`` holds the lock for each read or write."""

    value = _guarded("value")


class SynchronizedArray(SynchronizedBase):
    """A shared array; indexing and slicing hold the lock for each access."""

    def __len__(self) -> int:
        return len(self._obj)

    def __getitem__(self, i: Any) -> Any:
        self.acquire()
        try:
            return self._obj[i]
        finally:
            self.release()

    def __setitem__(self, i: Any, value: Any) -> None:
        self.acquire()
        try:
            self._obj[i] = value
        finally:
            self.release()

    def __getslice__(self, start: int, stop: int) -> Any:
        with self._lock:
            return self._obj[start:stop]

    def __setslice__(self, start: int, stop: int, values: Any) -> None:
        with self._lock:
            self._obj[start:stop] = values


class SynchronizedString(SynchronizedArray):
    """A shared ``'c'`` array; ``.value`` is the bytes up to the first NUL, ``.raw`` all of them."""

    value = _guarded("value")
    raw = _guarded("raw")


_structure_wrappers: dict[type, type] = {}


def _structure_wrapper(type_: type) -> type:
    """A Synchronized subclass with one guarded property per field of a Structure/Union."""
    wrapper = _structure_wrappers.get(type_)
    if wrapper is None:
        fields = [f[0] for f in getattr(type_, "_fields_", ())]
        namespace: dict[str, Any] = {name: _guarded(name) for name in fields}
        namespace["__doc__"] = f"A shared {type_.__name__} whose fields hold the lock."
        wrapper = type("Synchronized" + type_.__name__, (SynchronizedBase,), namespace)
        _structure_wrappers[type_] = wrapper
    return wrapper
