"""The loop every pool worker process runs, and the wire protocol it speaks.

This module is imported by each worker process, so it stays light: the standard
library's ``os``, ``pickle``, ``select``, ``signal``, ``struct`` and ``time``, and manyproc's
``reduction`` (already loaded by the child bootstrap). ``traceback`` is imported
only when a task raises.

Each worker owns two private pipes: tasks come in on one, answers go out on the
other. No lock is shared with any other process, so killing a worker can never
wedge the pool::

    parent (driver)                                    worker process
    ---------------                                    --------------
    TASK(task, fkey, fblob?, drop?, items)  ---pipe-->  run the function over the
    REVOKE(task) / STOP                                 items, in the order sent
                                            <--pipe---  READY / INIT_FAILED(error)
                                                        DONE(task, results, seconds)
                                                        FAILED(task, results, error,
                                                               seconds)
                                                        SKIPPED(task)

Every message is one pickled tuple behind an 8-byte length. A worker answers every
task it was sent, in order: ``DONE``, ``FAILED`` (an item raised, or its result did
not pickle), or ``SKIPPED`` (revoked before it began).

Functions travel once per worker: a task names its function by a key (``fkey``) and
carries the pickled function only the first time this worker sees that key; the
parent keeps a mirror of each worker's cache and tells it which key to forget
(``drop``) when the cache is full.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import struct
import sys
import time
from collections import deque
from itertools import starmap

from manyproc import reduction

TYPE_CHECKING = False  # typing costs import time in every child; only checkers need it
if TYPE_CHECKING:
    from typing import Any

__all__ = ["main", "ChildFd"]

# --- the wire protocol ----------------------------------------------------------------

# parent -> worker
TASK = 1  # (TASK, task_id, fkey, fblob | None, drop_fkey | None, items)
REVOKE = 2  # (REVOKE, task_id)
STOP = 3  # (STOP,)
# worker -> parent
READY = 10  # (READY, pid)
INIT_FAILED = 11  # (INIT_FAILED, error)
DONE = 12  # (DONE, task_id, results, seconds)
FAILED = 13  # (FAILED, task_id, results_before, error, seconds)
SKIPPED = 14  # (SKIPPED, task_id)
RETIRE = 15  # (RETIRE, rss): past max_memory_per_child; replace me once my tasks are done

# how a function is called on each item of a task
CALL_APPLY = 0  # item = (args, kwargs): f(*args, **kwargs)
CALL_ONE = 1  # item = x: f(x)
CALL_STAR = 2  # item = tuple: f(*item)
# the same, each item on its own: an item that raises gets an ItemFailure as its result
# and the task goes on (tasks batched from chunksize=1 work, see JobSpec.batch_limit)
CALL_ONE_EACH = 3
CALL_STAR_EACH = 4
EACH = {CALL_ONE: CALL_ONE_EACH, CALL_STAR: CALL_STAR_EACH}

# the kinds of error payloads: (kind, blob, type_name, text, traceback_text, offset)
ERR_PICKLED = 0  # blob is the pickled exception
ERR_TEXT = 1  # the exception could not travel: only its type name, text and traceback
ERR_ENCODING = 2  # the result at ``offset`` could not be pickled; text = repr(error),
#                   traceback_text = repr(value)

HEADER = struct.Struct("<Q")
HEADER_SIZE = HEADER.size
READ_SIZE = 1 << 18

_pack = HEADER.pack
_unpack_from = HEADER.unpack_from
_dumps = reduction.dumps
_loads = pickle.loads
_plain_dumps = pickle.dumps
#: why a task's SystemExit / KeyboardInterrupt / GeneratorExit comes back as text
STOPPING_REASON = "it is a BaseException that would stop the parent if raised there"
#: seconds an idle worker polls for its next task before it blocks (not on a single CPU)
IDLE_SPIN = 0.0001
#: the signal that makes a worker write the stack of each of its threads to its report pipe
STACK_SIGNAL = signal.SIGUSR1
#: a plain pickle this big may hold byte strings worth sending through shared memory
_BIG_RESULT = 1 << 20


def dumps_result(obj: Any) -> bytes:
    """Pickle what a worker sends back, as the standard library would.

    Results travel by reference only (no by-value fallback for lambdas or local
    classes, which ``reduction.dumps`` would add): a result that the standard pickle
    refuses fails its item with ``MaybeEncodingError``, as in ``multiprocessing``.
    manyproc's own reducers (connections, sockets...) still apply, and big arrays or
    byte strings go through shared memory (see ``manyproc._bigdata``).
    """
    arrays: list[Any] = []
    try:
        # Arrays are left out of band here: a result holding any is pickled again below.
        out = _plain_dumps(obj, 5, buffer_callback=arrays.append)
    except Exception:  # noqa: BLE001 - maybe one of manyproc's reducers knows it
        out = None
    if out is not None and not arrays and len(out) < _BIG_RESULT:
        return out
    from manyproc import _bigdata

    return _bigdata.dumps(obj, by_value=False)


def frame(payload: bytes) -> bytes:
    """One message: its length, then the pickled tuple."""
    return _pack(len(payload)) + payload


class FrameBuffer:
    """Bytes read from a pipe, cut into whole messages (shared by both ends)."""

    __slots__ = ("data",)

    def __init__(self) -> None:
        self.data = bytearray()

    def feed(self, chunk: bytes, out: list[Any]) -> None:
        """Add ``chunk`` and append every message it completes to ``out`` (unpickled)."""
        data = self.data
        if not data:
            # The common case: the chunk holds whole messages; parse it without copying.
            size = len(chunk)
            pos = 0
            while size - pos >= HEADER_SIZE:
                (n,) = _unpack_from(chunk, pos)
                end = pos + HEADER_SIZE + n
                if end > size:
                    break
                out.append(_loads(chunk[pos + HEADER_SIZE:end]))
                pos = end
            if pos < size:
                data += chunk[pos:] if pos else chunk
            return
        data += chunk
        size = len(data)
        pos = 0
        while size - pos >= HEADER_SIZE:
            (n,) = _unpack_from(data, pos)
            end = pos + HEADER_SIZE + n
            if end > size:
                break
            with memoryview(data) as view, view[pos + HEADER_SIZE:end] as part:
                out.append(_loads(part))
            pos = end
        if pos:
            del data[:pos]

    def wanted(self) -> int:
        """How many more bytes complete the message being received (a read-size hint)."""
        data = self.data
        if len(data) < HEADER_SIZE:
            return READ_SIZE
        (n,) = _unpack_from(data, 0)
        return max(READ_SIZE, HEADER_SIZE + n - len(data))


class ItemFailure:
    """The result of an item that failed on its own: ``error`` is an error payload in
    the worker and on the wire, the rebuilt exception once the parent decoded it."""

    __slots__ = ("error",)

    def __init__(self, error: Any) -> None:
        self.error = error

    def __reduce__(self) -> Any:
        return ItemFailure, (self.error,)

    def __repr__(self) -> str:
        return f"ItemFailure({self.error!r})"


# --- passing the pipe ends to the child -------------------------------------------------


class ChildFd:
    """A file descriptor given to a worker process, whatever the start method.

    Under ``fork`` the child simply inherits the number. Pickled for ``spawn`` or
    ``forkserver``, it travels as a ``reduction.DupFd`` and is rebuilt around the
    child's copy.
    """

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> Any:
        return _adopt_fd, (reduction.DupFd(self.fd),)


def _adopt_fd(dup: Any) -> ChildFd:
    return ChildFd(dup.detach())


# --- the worker ---------------------------------------------------------------------


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            done = os.write(fd, view)
        except InterruptedError:  # pragma: no cover - PEP 475 retries for us
            continue
        view = view[done:]


def _error_payload(exc: BaseException, offset: int) -> tuple[Any, ...]:
    """Describe ``exc`` so that the parent can raise it as itself, or at least as text."""
    import traceback

    name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    if type(exc).__module__ == "builtins":
        name = type(exc).__qualname__
    try:
        text = str(exc)
    except Exception:  # noqa: BLE001 - a broken __str__ must not lose the error
        text = f"<{name} whose str() failed>"
    tb_text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    if not isinstance(exc, Exception):
        # SystemExit, KeyboardInterrupt, GeneratorExit raised by a task: re-raising them
        # in the parent would end or interrupt it, so they come back as text.
        return (ERR_TEXT, None, name, text, tb_text, offset, STOPPING_REASON)
    exc.__traceback__ = None
    context, cause = exc.__context__, exc.__cause__
    exc.__context__ = exc.__cause__ = None
    try:
        blob = _dumps(exc)
        _loads(blob)  # an exception whose constructor cannot be called again fails here
    except Exception as why:  # noqa: BLE001
        return (ERR_TEXT, None, name, text, tb_text, offset,
                f"it could not be sent back ({type(why).__name__}: {why})")
    finally:
        exc.__context__, exc.__cause__ = context, cause
    return (ERR_PICKLED, blob, name, text, tb_text, offset, "")


def _encoding_payload(error: BaseException, value: Any, offset: int) -> tuple[Any, ...]:
    try:
        shown = repr(value)
    except Exception:  # noqa: BLE001
        shown = f"<{type(value).__qualname__} object>"
    if len(shown) > 200:
        shown = shown[:197] + "..."
    return (ERR_ENCODING, None, type(error).__qualname__, repr(error), shown, offset, "")


def run_each(func: Any, star: bool, items: Any, append: Any, describe: Any) -> None:
    """Call ``func`` on each item; an item that raises gets an ``ItemFailure`` instead.

    ``describe(exc, offset)`` turns an exception into what the ItemFailure carries.
    """
    for offset, item in enumerate(items):
        try:
            append(func(*item) if star else func(item))
        except Exception as exc:  # noqa: BLE001 - the item's own error
            append(ItemFailure(describe(exc, offset)))
            del exc


class _Worker:
    """State of the worker loop: its pipes, its function cache and its queued tasks."""

    def __init__(self, task_fd: int, result_fd: int) -> None:
        self.task_fd = task_fd
        self.result_fd = result_fd
        self.buffer = FrameBuffer()
        self.functions: dict[int, tuple[Any, int]] = {}
        self.queue: deque[Any] = deque()
        self.revoked: set[int] = set()
        self.stopping = False
        self.current_mode = CALL_ONE
        self.memory_limit: int | None = None
        self.idle_spin = 0.0  # main() sets it for a worker process

    def send(self, message: tuple[Any, ...]) -> None:
        _write_all(self.result_fd, frame(dumps_result(message)))

    def wait_briefly_for_input(self) -> None:
        """Poll the task pipe for ``idle_spin`` seconds before blocking on it.

        A process blocked on a pipe takes tens of microseconds to be woken on another
        CPU; a caller that sends the next task as soon as it has the last result
        (``apply`` in a loop) finds this worker still awake and saves that wake-up.
        The CPU is yielded at each turn, so a runnable process that needs it gets it.
        """
        poller = select.poll()
        poller.register(self.task_fd, select.POLLIN)
        poll = poller.poll
        deadline = time.perf_counter() + self.idle_spin
        while not poll(0) and time.perf_counter() < deadline:
            _sched_yield()

    def receive(self) -> bool:
        """Block until at least one message arrived; False at end of file (parent gone)."""
        out: list[Any] = []
        while not out:
            try:
                chunk = os.read(self.task_fd, self.buffer.wanted())
            except InterruptedError:  # pragma: no cover
                continue
            if not chunk:
                return False
            self.buffer.feed(chunk, out)
        for message in out:
            code = message[0]
            if code == TASK:
                self.queue.append(message)
            elif code == REVOKE:
                self.revoked.add(message[1])
            elif code == STOP:
                self.stopping = True
        return True

    def run(self) -> None:
        queue = self.queue
        limit = self.memory_limit
        answered = False  # a task was just answered: its caller may send the next at once
        while True:
            if not queue:
                self.revoked.clear()  # every revoke so far named a task already answered
                if answered and self.idle_spin and not self.stopping:
                    self.wait_briefly_for_input()
                answered = False
                if self.stopping or not self.receive():
                    return
                continue
            self.run_task(queue.popleft())
            answered = True
            if limit is not None:
                rss = resident_memory()
                if rss > limit:
                    self.send((RETIRE, rss))
                    limit = None  # once is enough: the parent sends no new task

    def isolated(self, task_id: int) -> bool:
        return self.current_mode in (CALL_ONE_EACH, CALL_STAR_EACH)

    def run_task(self, message: tuple[Any, ...]) -> None:
        _, task_id, fkey, fblob, drop, items = message
        if task_id in self.revoked:
            self.revoked.discard(task_id)
            self.send((SKIPPED, task_id))
            return
        functions = self.functions
        if drop is not None:
            functions.pop(drop, None)
        results: list[Any] = []
        started = time.perf_counter()
        try:
            if fblob is not None:
                entry = functions[fkey] = _loads(fblob)
            else:
                entry = functions[fkey]
            func, mode = entry
            self.current_mode = mode
            append = results.append
            if mode == CALL_ONE:
                results.extend(map(func, items))  # on an error, the results before it stay
            elif mode == CALL_STAR:
                results.extend(starmap(func, items))
            elif mode == CALL_APPLY:
                for args, kwargs in items:
                    append(func(*args, **kwargs))
            else:
                run_each(func, mode == CALL_STAR_EACH, items, append, _error_payload)
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the parent
            seconds = time.perf_counter() - started
            error = _error_payload(exc, len(results))
            del exc
            try:
                payload = dumps_result((FAILED, task_id, results, error, seconds))
            except Exception:  # noqa: BLE001 - a result before the error does not pickle
                self.send_encoding_failure(task_id, results, seconds)
                return
            _write_all(self.result_fd, frame(payload))
            return
        seconds = time.perf_counter() - started
        try:
            payload = dumps_result((DONE, task_id, results, seconds))
        except Exception:  # noqa: BLE001 - a result that does not pickle fails its item
            self.send_encoding_failure(task_id, results, seconds)
            return
        _write_all(self.result_fd, frame(payload))

    def send_encoding_failure(self, task_id: int, results: list[Any], seconds: float) -> None:
        if self.isolated(task_id):
            # every item answers for itself: only the results that do not pickle fail
            for offset, value in enumerate(results):
                if type(value) is not ItemFailure:
                    try:
                        dumps_result(value)
                    except Exception as error:  # noqa: BLE001
                        results[offset] = ItemFailure(_encoding_payload(error, value, offset))
            try:
                self.send((DONE, task_id, results, seconds))
                return
            except Exception:  # noqa: BLE001 - fall back to failing the task
                pass
        for offset, value in enumerate(results):
            try:
                dumps_result(value)
            except Exception as error:  # noqa: BLE001
                before = results[:offset]
                payload = _encoding_payload(error, value, offset)
                break
        else:  # each result pickles alone but not together (e.g. a shared unpicklable part)
            before, payload = [], _encoding_payload(
                TypeError("the results of this task could not be pickled together"),
                results, 0)
        self.send((FAILED, task_id, before, payload, seconds))


def report_faults_to(fd: int) -> None:
    """Write Python stacks to ``fd`` on a fatal signal (segfault, abort...) and on
    ``STACK_SIGNAL`` (the pool asking where a task that timed out is stuck).

    ``faulthandler`` writes from its C signal handler, so the answer comes even while
    the task is stuck in C code or holds the GIL in a loop.
    """
    import faulthandler

    try:
        faulthandler.enable(fd, all_threads=True)
        faulthandler.register(STACK_SIGNAL, fd, all_threads=True, chain=False)
    except (AttributeError, OSError, RuntimeError, ValueError):
        pass  # no fault handler here: the errors just say less


def _usable_cpus() -> int:
    """The affinity mask's size: a light stand-in for ``_os.cpus.usable_cpu_count`` (whose
    cgroup parsing and dataclasses would cost every spawned worker's start-up)."""
    affinity = getattr(os, "sched_getaffinity", None)
    if affinity is not None:
        try:
            return len(affinity(0))
        except OSError:
            pass
    return os.cpu_count() or 1


_sched_yield = getattr(os, "sched_yield", lambda: None)


def resident_memory() -> int:
    """Bytes of this process's resident memory (its peak where the current is unknown)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB else


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def main(task_end: ChildFd, result_end: ChildFd, initializer: Any,
         initargs: tuple[Any, ...], report_end: ChildFd | None = None,
         memory_limit: int | None = None) -> None:
    """Entry point of a worker process (the target of its Process object).

    Args:
        task_end: the read end of the task pipe.
        result_end: the write end of the answer pipe.
        initializer: called once with ``initargs`` before the first task, or ``None``.
        initargs: arguments of the initializer.
        report_end: the write end of the pipe the fault handler reports to, if any.
        memory_limit: ``max_memory_per_child`` in bytes, or ``None``.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    if report_end is not None:
        report_faults_to(report_end.fd)
    worker = _Worker(task_end.fd, result_end.fd)
    if _usable_cpus() > 1:
        worker.idle_spin = IDLE_SPIN
    worker.memory_limit = memory_limit
    try:
        if initializer is not None:
            initializer(*initargs)
    except BaseException as exc:  # noqa: BLE001
        try:
            worker.send((INIT_FAILED, _error_payload(exc, 0)))
        except OSError:
            pass
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    try:
        worker.send((READY, os.getpid()))
        worker.run()
    except BrokenPipeError:
        pass  # the parent went away
    finally:
        for fd in (worker.task_fd, worker.result_fd):
            try:
                os.close(fd)
            except OSError:
                pass
