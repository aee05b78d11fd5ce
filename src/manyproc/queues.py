"""Queues between processes (DESIGN.md layer 5).

A queue is a one-way pipe shared by every process that holds it, plus
cross-process locks so that whole messages never interleave::

    put(obj)                                                   get()
      | pickle now: an unpicklable object fails        any process holding the queue
      | here, in the caller, with a clear error          | read lock, one frame, pickle.loads
      v                                                  ^
    buffer (deque of bytes) --feeder thread--> write lock --> pipe
                              batches waiting frames into one write

``put`` returns at once: a daemon *feeder thread* writes the buffered messages
to the pipe.  A process that exits waits for its feeder to flush (as with
``multiprocessing``), but when nobody reads the pipe it says so on stderr, naming
the queue, instead of hanging silently.  :class:`SimpleQueue` has no feeder
(``put`` writes directly); :class:`JoinableQueue` adds ``task_done``/``join``.

Queues reach children only by inheritance (``Process(args=...)``); after a fork,
each child starts with its own empty buffer and no feeder thread.
"""

from __future__ import annotations

import _multiprocessing
import array
import collections
import errno
import functools
import math
import os
import select
import sys
import threading
import time
import types
import weakref
from collections.abc import Callable
from queue import Empty, Full
from typing import Any

from . import _wire, connection, reduction, util

try:
    import fcntl
    import termios
except ImportError:  # pragma: no cover - not POSIX: writers hold the lock while they write
    fcntl = termios = None  # type: ignore[assignment]

__all__ = ["Queue", "SimpleQueue", "JoinableQueue"]

SEM_VALUE_MAX: int = _multiprocessing.SemLock.SEM_VALUE_MAX

#: Seconds an exiting process waits for its feeder before saying why it cannot exit.
FLUSH_REPORT_DELAY = 2.0
#: Most messages, and bytes, written by one feeder write.
_BATCH_MESSAGES = 256
_BATCH_BYTES = 1 << 20

#: After putting a message this large, let the feeder thread take the GIL: a loop of
#: big puts would otherwise hold it while the feeder waits to write (a GIL convoy).
_HANDOFF_SIZE = 64 << 10
_yield_gil = functools.partial(time.sleep, 0)

_pickle = connection._pickle
_payload_size = _wire.payload_size
_loads = reduction.loads
_write_frames = _wire.write_frames


class _Sentinel:
    def __repr__(self) -> str:
        return "<end of queue>"


_SENTINEL: Any = _Sentinel()


def _check_maxsize(maxsize: Any) -> int:
    try:
        size = maxsize.__index__()
    except AttributeError:
        raise TypeError(f"maxsize must be an int, not {type(maxsize).__name__} "
                        f"({maxsize!r:.40})") from None
    if size > SEM_VALUE_MAX:
        raise ValueError(f"maxsize {size} is larger than this platform's semaphores allow "
                         f"({SEM_VALUE_MAX}); use 0 for an unbounded queue")
    return SEM_VALUE_MAX if size <= 0 else size


def _semlock(sem: Any) -> Any:
    """The ``_multiprocessing.SemLock`` inside a ``synchronize`` semaphore."""
    return getattr(sem, "_semlock", sem)


def _report(message: str) -> None:
    """Tell the user about data that cannot be flushed (stderr and manyproc's logger)."""
    util.sub_warning(message)
    try:
        sys.stderr.write(f"manyproc: {message}\n")
        sys.stderr.flush()
    except (AttributeError, OSError, ValueError):
        pass


def _process_label() -> str:
    from .process import current_process  # layer 4, only when reporting

    return f"process {current_process().name} (pid {os.getpid()})"


_ioctl: Any = getattr(fcntl, "ioctl", None)
_FIONREAD: int = getattr(termios, "FIONREAD", 0)
#: bytes of frame headers counted per message when checking that a write fits
_HEADER_ALLOWANCE = 12


class _WriteSide:
    """A queue's writing end and its lock, written so that a dead writer never holds the lock.

    A writer takes the lock only for a write that the pipe can take whole at once,
    so the write cannot block: a writer killed at any moment (SIGKILL while the reader
    is slow and the pipe full) neither keeps the lock from the other writers nor leaves
    half a message that would stall the reader. Linux tells how much room a pipe has
    (``F_GETPIPE_SZ`` less ``FIONREAD``); elsewhere, and for a message bigger than the
    pipe, the writer holds the lock across a blocking write, as the standard library
    always does.
    """

    __slots__ = ("fd", "lock", "capacity", "_count")

    def __init__(self, fd: int, lock: Any) -> None:
        self.fd = fd
        self.lock = lock
        self.capacity = 0
        self._count = array.array("i", [0])
        get_size = getattr(fcntl, "F_GETPIPE_SZ", None)
        if get_size is not None and hasattr(termios, "FIONREAD"):
            try:
                self.capacity = fcntl.fcntl(fd, get_size)
            except OSError:
                pass

    def _room(self) -> int:
        count = self._count
        _ioctl(self.fd, _FIONREAD, count, True)
        return self.capacity - count[0]

    def write(self, payloads: list[Any]) -> None:
        """Write ``payloads`` as consecutive frames, as few writes as the pipe allows."""
        capacity = self.capacity
        if len(payloads) == 1:  # the common case, SimpleQueue.put: no chunking
            self._write_chunk(payloads, _payload_size(payloads[0]) + _HEADER_ALLOWANCE)
            return
        chunk: list[Any] = []
        chunk_size = 0
        for payload in payloads:
            size = _payload_size(payload) + _HEADER_ALLOWANCE
            if chunk and chunk_size + size > capacity:
                self._write_chunk(chunk, chunk_size)
                chunk, chunk_size = [], 0
            chunk.append(payload)
            chunk_size += size
        if chunk:
            self._write_chunk(chunk, chunk_size)

    def _write_chunk(self, payloads: list[Any], size: int) -> None:
        lock, fd = self.lock, self.fd
        if size <= self.capacity:
            poller: Any = None
            delay = 0.0002
            while True:
                with lock:
                    if self._room() >= size:
                        _write_frames(fd, payloads)
                        return
                # Wait for the reader without the lock: until there is some room (then a
                # little longer if it is not enough), or the reader is gone.
                if poller is None:
                    poller = select.poll()
                    poller.register(fd, select.POLLOUT)
                ready = poller.poll(1000)
                if ready and ready[0][1] & (select.POLLERR | select.POLLHUP):
                    break  # the write below raises BrokenPipeError at once
                if ready:
                    time.sleep(delay)
                    delay = min(2 * delay, 0.005)
        with lock:  # bigger than the pipe, or no way to tell its room: a blocking write
            _write_frames(fd, payloads)


class _ReadSide:
    """A queue's reading end and its lock, read so that a dead reader never holds the lock.

    Readers wait for data *without* the lock and take it only to read a message that
    is already there: a reader killed while it waits (SIGKILL, a crash) holds nothing,
    so the others go on. (Holding the lock across the wait, as the standard library
    does, leaves the queue locked for good when a waiting reader dies.)
    """

    __slots__ = ("lock", "conn", "_ready")

    def __init__(self, lock: Any, conn: Any) -> None:
        self.lock = lock
        self.conn = conn
        poll = getattr(select, "poll", None)
        if poll is None:
            self._ready = conn.poll
        else:  # a poll object made once: several times cheaper than Connection.poll
            poller = poll()
            poller.register(conn.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)

            def ready(timeout: float | None = 0.0) -> bool:
                conn._check_readable()
                ms = None if timeout is None else max(0, math.ceil(timeout * 1000))
                return bool(poller.poll(ms))

            self._ready = ready

    def take(self, block: bool, timeout: float | None = None) -> Any:
        """Read the message waiting under the lock; None if there is none, or if the lock
        could not be had (``block=False``, or not within ``timeout``)."""
        if not self.lock.acquire(block, timeout):
            return None
        try:
            return self.conn._read_message() if self._ready() else None
        finally:
            self.lock.release()

    def next(self, deadline: float | None) -> Any:
        """Read the next message, waiting until ``deadline`` (None: for ever); None if
        none came in time."""
        ready = self._ready
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            data = self.take(True, remaining)
            if data is not None:
                return data
            if deadline is None:
                ready(None)
            elif not ready(max(0.0, deadline - time.monotonic())):
                return None
            # something came (or another reader takes it first): try again


class Queue:
    """A FIFO queue of picklable objects shared between processes.

    Args:
        maxsize: the most items held at once (``put`` blocks or raises Full beyond
            it); 0 or less means unbounded.
        ctx: the context whose locks and semaphores the queue uses.
    """

    def __init__(self, maxsize: int = 0, *, ctx: Any) -> None:
        self._maxsize = _check_maxsize(maxsize)
        self._reader, self._writer = connection.Pipe(duplex=False)
        self._rlock = ctx.Lock()
        self._wlock = ctx.Lock()
        self._sem = ctx.BoundedSemaphore(self._maxsize)
        self._opid = os.getpid()
        self._ignore_epipe = False  # concurrent.futures-style users set it
        self._reset()
        util.register_after_fork(self, Queue._after_fork)

    def __getstate__(self) -> Any:
        reduction.assert_spawning(self)
        return (self._ignore_epipe, self._maxsize, self._reader, self._writer,
                self._rlock, self._wlock, self._sem, self._opid)

    def __setstate__(self, state: Any) -> None:
        (self._ignore_epipe, self._maxsize, self._reader, self._writer,
         self._rlock, self._wlock, self._sem, self._opid) = state
        self._reset()
        util.register_after_fork(self, Queue._after_fork)  # for this child's own fork children

    def _after_fork(self) -> None:
        util.debug("Queue._after_fork()")
        self._reset()

    def _reset(self) -> None:
        self._notempty = threading.Condition(threading.Lock())
        self._buffer: collections.deque[Any] = collections.deque()
        self._in_flight = [0, 0]  # messages and bytes the feeder is writing right now
        self._thread: threading.Thread | None = None
        self._jointhread: util.Finalize | None = None
        self._joincancelled = False
        self._closed = False
        self._close: util.Finalize | None = None
        self._poll = self._reader.poll
        self._read_side = _ReadSide(self._rlock, self._reader)

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<{type(self).__name__} object at {id(self):#x} maxsize={self._maxsize}{state}>"

    # ----------------------------------------------------------------- put

    def _serialize(self, obj: Any) -> Any:
        """Pickle ``obj`` now, so a failure is raised in the caller's ``put``.

        Returns the payload for the feeder: one ``bytes``, or a list of parts for a
        large pickle (big ``bytes`` inside ``obj`` are not copied).
        """
        try:
            return _pickle(obj)
        except Exception as exc:
            hook = type(self)._on_queue_feeder_error
            if hook is Queue._on_queue_feeder_error:
                raise
            # A subclass that overrides the hook (as concurrent.futures does) handles it.
            self._on_queue_feeder_error(exc, obj)
            return None

    def put(self, obj: Any, block: bool = True, timeout: float | None = None) -> None:
        """Put ``obj`` on the queue; it is pickled now and written by the feeder thread.

        Raises:
            queue.Full: the queue stayed full (``block=False``, or past ``timeout``).
            ValueError: the queue is closed.
            pickle.PicklingError, TypeError, AttributeError: ``obj`` cannot be
                pickled; nothing was queued and the message names the culprit.
        """
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")
        data = self._serialize(obj)
        if data is None:
            return
        if not self._sem.acquire(block, timeout):
            raise Full
        with self._notempty:
            if self._thread is None:
                self._start_thread()
            self._buffer.append(data)
            self._notempty.notify()
        if type(data) is list or len(data) >= _HANDOFF_SIZE:
            _yield_gil()

    def put_nowait(self, obj: Any) -> None:
        """Put ``obj`` without blocking; raise queue.Full if there is no room."""
        return self.put(obj, False)

    # ----------------------------------------------------------------- get

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """Remove and return the oldest item.

        Raises:
            queue.Empty: nothing arrived (``block=False``, or within ``timeout``).
            ValueError: the queue is closed.
        """
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")
        if not block:
            data = self._read_side.take(False)
        else:
            data = self._read_side.next(None if timeout is None else time.monotonic() + timeout)
        if data is None:
            raise Empty
        self._sem.release()
        # Unpickle outside the lock, so other readers are not held up by it.
        return _loads(data)

    def get_nowait(self) -> Any:
        """Return an item if one is waiting, else raise queue.Empty."""
        return self.get(False)

    # ----------------------------------------------------------------- size

    def qsize(self) -> int:
        """Return the approximate number of items in the queue.

        Raises:
            NotImplementedError: on macOS, which has no ``sem_getvalue()``.
        """
        try:
            value = _semlock(self._sem)._get_value()
        except NotImplementedError:
            raise NotImplementedError(
                "Queue.qsize() needs sem_getvalue(), which macOS does not provide; use "
                "empty(), or count the items you put and get yourself") from None
        return self._maxsize - int(value)

    def empty(self) -> bool:
        """Return True if no item is waiting in the pipe (approximate, like qsize)."""
        return not self._poll()

    def full(self) -> bool:
        """Return True if the queue holds ``maxsize`` items."""
        return bool(_semlock(self._sem)._is_zero())

    # ----------------------------------------------------------------- closing

    def close(self) -> None:
        """Put nothing more from this process; the feeder flushes what is buffered, then stops."""
        self._closed = True
        close, self._close = self._close, None
        if close is not None:
            close()
        elif self._thread is None:
            self._reader.close()
            self._writer.close()

    def join_thread(self) -> None:
        """Wait until the feeder thread has flushed everything (only after ``close()``)."""
        util.debug("Queue.join_thread()")
        if not self._closed:
            raise AssertionError(f"Queue {self!r} not closed: call close() before join_thread()")
        if self._jointhread is not None:
            self._jointhread()

    def cancel_join_thread(self) -> None:
        """Let this process exit without flushing; unflushed items are lost (and reported)."""
        util.debug("Queue.cancel_join_thread()")
        self._joincancelled = True
        joiner, self._jointhread = self._jointhread, None
        if joiner is not None:
            joiner.cancel()
            self._watch_discards()

    def _watch_discards(self) -> None:
        if self._thread is not None:
            util.Finalize(self._thread, Queue._report_discarded,
                          [self._buffer, self._in_flight, repr(self)], exitpriority=-5)

    # ----------------------------------------------------------------- feeder

    def _start_thread(self) -> None:
        util.debug("Queue._start_thread()")
        thread = threading.Thread(
            target=Queue._feed,
            args=(self._buffer, self._notempty, self._in_flight, self._writer, self._wlock,
                  self._reader.close, self._ignore_epipe, self._on_queue_feeder_error,
                  self._sem),
            name="QueueFeederThread", daemon=True)
        thread.start()
        self._thread = thread
        if self._joincancelled:
            self._watch_discards()
        else:
            self._jointhread = util.Finalize(
                thread, Queue._finalize_join,
                [weakref.ref(thread), self._buffer, self._in_flight, repr(self)],
                exitpriority=-5)
        # When the queue is collected or the process exits, tell the feeder to stop.
        self._close = util.Finalize(self, Queue._finalize_close,
                                    [self._buffer, self._notempty], exitpriority=10)

    @staticmethod
    def _finalize_close(buffer: collections.deque[Any], notempty: threading.Condition) -> None:
        util.debug("telling queue thread to quit")
        with notempty:
            buffer.append(_SENTINEL)
            notempty.notify()

    @staticmethod
    def _finalize_join(thread_ref: Callable[[], threading.Thread | None],
                       buffer: collections.deque[Any], in_flight: list[int],
                       name: str) -> None:
        thread = thread_ref()
        if thread is None:
            return
        util.debug("joining queue thread")
        thread.join(FLUSH_REPORT_DELAY)
        if thread.is_alive():
            count, size = _pending(buffer, in_flight)
            _report(
                f"{_process_label()} cannot exit yet: {count} message(s) ({size} bytes) put "
                f"on {name} are still waiting to be written to the queue's pipe, which is "
                "full because no process is reading it. Get the items in another process "
                "before joining this one, or call cancel_join_thread() on the queue if they "
                "may be lost.")
            thread.join()
        util.debug("... queue thread joined")

    @staticmethod
    def _report_discarded(buffer: collections.deque[Any], in_flight: list[int],
                          name: str) -> None:
        count, size = _pending(buffer, in_flight)
        if count:
            _report(f"{_process_label()} exits without flushing {name}: {count} message(s) "
                    f"({size} bytes) were discarded because cancel_join_thread() was called")

    @staticmethod
    def _feed(buffer: collections.deque[Any], notempty: threading.Condition,
              in_flight: list[int], writer: connection.Connection, wlock: Any,
              reader_close: Callable[[], None], ignore_epipe: bool,
              onerror: Callable[[BaseException, Any], None], sem: Any) -> None:
        util.debug("starting thread to feed data to pipe")
        write = _WriteSide(writer.fileno(), wlock).write
        popleft = buffer.popleft
        while True:
            batch: list[Any] = []
            size = 0
            finished = False
            with notempty:
                while not buffer:
                    notempty.wait()
                while buffer and len(batch) < _BATCH_MESSAGES and size < _BATCH_BYTES:
                    item = popleft()
                    if item is _SENTINEL:
                        finished = True
                        break
                    batch.append(item)
                    size += _payload_size(item)
                in_flight[0], in_flight[1] = len(batch), size
            if batch:
                try:
                    write(batch)
                except Exception as exc:
                    if ignore_epipe and getattr(exc, "errno", 0) == errno.EPIPE:
                        return
                    if util.is_exiting():
                        util.info("error in queue thread: %s", exc)
                        return
                    # The messages are lost: give back their room, as a get would have.
                    for _ in batch:
                        sem.release()
                    onerror(exc, batch)
                finally:
                    in_flight[0] = in_flight[1] = 0
            if finished:
                util.debug("feeder thread got sentinel -- exiting")
                reader_close()
                writer.close()
                return

    @staticmethod
    def _on_queue_feeder_error(e: BaseException, obj: Any) -> None:
        """Called when the feeder cannot write, or (if overridden) when ``obj`` cannot be pickled.

        The default prints the traceback; subclasses override it to handle the error.
        """
        import traceback

        traceback.print_exception(type(e), e, e.__traceback__)

    __class_getitem__: Any = classmethod(types.GenericAlias)


def _pending(buffer: collections.deque[Any], in_flight: list[int]) -> tuple[int, int]:
    """Messages (and bytes) not yet written: buffered plus the batch being written."""
    items = [item for item in list(buffer) if item is not _SENTINEL]
    return len(items) + in_flight[0], sum(map(_payload_size, items)) + in_flight[1]


class JoinableQueue(Queue):
    """A Queue whose consumers confirm each item with ``task_done()``, so ``join()`` can wait."""

    def __init__(self, maxsize: int = 0, *, ctx: Any) -> None:
        super().__init__(maxsize, ctx=ctx)
        self._unfinished_tasks = ctx.Semaphore(0)
        self._cond = ctx.Condition()

    def __getstate__(self) -> Any:
        return super().__getstate__() + (self._cond, self._unfinished_tasks)

    def __setstate__(self, state: Any) -> None:
        super().__setstate__(state[:-2])
        self._cond, self._unfinished_tasks = state[-2:]

    def put(self, obj: Any, block: bool = True, timeout: float | None = None) -> None:
        """Put ``obj`` on the queue and count it as an unfinished task (see Queue.put)."""
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")
        data = self._serialize(obj)
        if data is None:
            return
        if not self._sem.acquire(block, timeout):
            raise Full
        with self._notempty, self._cond:
            if self._thread is None:
                self._start_thread()
            self._buffer.append(data)
            self._unfinished_tasks.release()
            self._notempty.notify()
        if type(data) is list or len(data) >= _HANDOFF_SIZE:
            _yield_gil()

    def task_done(self) -> None:
        """Mark one item taken with ``get()`` as processed.

        Raises:
            ValueError: called more times than items were put.
        """
        with self._cond:
            if not self._unfinished_tasks.acquire(False):
                raise ValueError("task_done() called too many times: once per item taken with "
                                 "get() is expected")
            if _semlock(self._unfinished_tasks)._is_zero():
                self._cond.notify_all()

    def join(self) -> None:
        """Block until every item put on the queue has been marked done."""
        with self._cond:
            while not _semlock(self._unfinished_tasks)._is_zero():
                self._cond.wait()


class SimpleQueue:
    """A locked pipe: ``put`` pickles and writes at once, ``get`` reads; no feeder thread."""

    def __init__(self, *, ctx: Any) -> None:
        self._reader, self._writer = connection.Pipe(duplex=False)
        self._rlock = ctx.Lock()
        self._wlock = ctx.Lock()
        self._poll = self._reader.poll
        self._read_side = _ReadSide(self._rlock, self._reader)
        self._write_side = _WriteSide(self._writer.fileno(), self._wlock)

    def close(self) -> None:
        """Close both ends of the pipe in this process."""
        self._reader.close()
        self._writer.close()

    def empty(self) -> bool:
        """Return True if no item is waiting."""
        return not self._poll()

    def __getstate__(self) -> Any:
        reduction.assert_spawning(self)
        return (self._reader, self._writer, self._rlock, self._wlock)

    def __setstate__(self, state: Any) -> None:
        (self._reader, self._writer, self._rlock, self._wlock) = state
        self._poll = self._reader.poll
        self._read_side = _ReadSide(self._rlock, self._reader)
        self._write_side = _WriteSide(self._writer.fileno(), self._wlock)

    def get(self) -> Any:
        """Remove and return the oldest item, waiting for one if needed."""
        return _loads(self._read_side.next(None))

    def put(self, obj: Any) -> None:
        """Pickle ``obj`` and write it to the pipe.

        Raises:
            pickle.PicklingError, TypeError, AttributeError: ``obj`` cannot be pickled.
        """
        self._write_side.write([_pickle(obj)])

    __class_getitem__: Any = classmethod(types.GenericAlias)
