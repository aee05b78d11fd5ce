"""Worker processes on this machine: the default backend of ``Pool`` and the executor.

Each worker is a ``Process`` of the pool's context (fork, spawn or forkserver) running
``worker.main`` with two private pipes (see ``worker`` for the protocol). The parent's
ends are non-blocking: a task that does not fit in the pipe waits in an out-box that
the leader flushes when the pipe becomes writable, so no thread ever blocks writing
while holding the driver's lock, and a worker blocked writing its answers can never
deadlock with a parent blocked writing tasks.

The leader's ``poll`` watches, for every worker, its answer pipe, its process
sentinel (readable once it exited) and, while its out-box is not empty, its task pipe.
When a sentinel fires, everything the worker wrote before it died is read first, then
its exit is reported: so a task answered just before a crash still counts as done.
"""

from __future__ import annotations

import itertools
import os
import select
import signal
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Any

from manyproc import _bigdata, reduction, util
from manyproc._os.fds import close_quietly, mark_private
from manyproc._poolcore import (
    Event,
    RetireWorker,
    TaskDone,
    TaskSkipped,
    WorkerExited,
    WorkerInitFailed,
    WorkerReady,
)

from . import worker as wire
from .base import JobRecord, WorkerBackend
from .remote import rebuild_error

__all__ = ["ProcessBackend", "FunctionCache"]

#: functions a worker keeps unpickled (the parent mirrors each worker's cache)
WORKER_FUNCTION_CACHE = 32
#: seconds a worker whose task timed out has to say where it is stuck before it is killed
STACK_WAIT = 0.5
#: bytes of a worker's stack dump or crash report kept for the error message
REPORT_LIMIT = 32768
_WORKER_FILE = os.path.join("_backends", "worker.py")

_RESULT, _SENTINEL, _TASK, _WAKE = 0, 1, 2, 3
_POLLIN = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR
_POLLOUT = select.POLLOUT | select.POLLERR | select.POLLHUP
_STOP_FRAME = wire.frame(reduction.dumps((wire.STOP,)))
_IOV_MAX = 512
_monotonic = time.monotonic
_frame = wire.frame
_dumps = reduction.dumps


class FunctionCache:
    """Gives each function a key and its pickled form, pickling each function once."""

    def __init__(self, size: int = 128) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[int, int], tuple[int, Any, bytes]] = OrderedDict()
        self._keys = itertools.count(1)
        self._last: tuple[Any, int, int, bytes | None] = (None, -1, 0, None)

    def prepare(self, record: JobRecord) -> None:
        """Set ``record.fkey`` and ``record.fblob``.

        Raises:
            TypeError, pickle.PicklingError...: the function cannot be pickled; the
                message names the part that cannot.
        """
        func, call = record.func, record.call
        last = self._last  # the function of the previous job, most often this one's
        if last[0] is func and last[1] == call:
            record.fkey, record.fblob = last[2], last[3]
            return
        key = (id(func), call)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[1] is func:
                self._entries.move_to_end(key)
                record.fkey, record.fblob = entry[0], entry[2]
                self._last = (func, call, entry[0], entry[2])
                return
        try:
            blob = _dumps((func, call))
        except Exception as exc:
            raise _function_error(exc, func) from None
        with self._lock:
            fkey = next(self._keys)
            self._entries[key] = (fkey, func, blob)
            if len(self._entries) > self._size:
                self._entries.popitem(last=False)
            self._last = (func, call, fkey, blob)
        record.fkey, record.fblob = fkey, blob


def _function_error(exc: Exception, func: Any) -> Exception:
    message = (f"the function {func!r} cannot be sent to the worker processes: {exc}. "
               "Pass a function defined at the top level of a module (lambdas and local "
               "functions work too, through cloudpickle, unless they capture something "
               "that cannot be pickled), or use a ThreadPool")
    try:
        error = type(exc)(message)
    except Exception:  # noqa: BLE001
        error = TypeError(message)
    error.__cause__ = exc
    return error


class _Proc:
    """The parent's side of one worker process."""

    __slots__ = ("worker_id", "slot", "process", "pid", "sentinel", "task_w", "result_r",
                 "out", "out_offset", "queued", "watch_out", "buffer", "known", "line", "eof",
                 "exited", "in_shm", "report_r")

    def __init__(self, worker_id: int, slot: int, process: Any, task_w: int,
                 result_r: int, report_r: int) -> None:
        self.worker_id = worker_id
        self.slot = slot
        self.process = process
        self.pid: int | None = getattr(process, "pid", None)
        self.sentinel: int | None = getattr(process, "sentinel", None)
        self.task_w = task_w
        self.result_r = result_r
        self.report_r = report_r
        self.out: list[bytes] = []  # frames not written yet (the first from out_offset)
        self.out_offset = 0
        self.queued = False  # in the backend's list of workers to flush
        self.watch_out = False  # the poller watches task_w for room
        self.buffer = wire.FrameBuffer()
        self.known: OrderedDict[int, None] = OrderedDict()  # mirror of the worker's cache
        self.line: deque[tuple[int, JobRecord, int]] = deque()  # (task, job, start) sent
        self.eof = False
        self.exited = False
        self.in_shm = _bigdata.Backlog()  # big tasks sent through shared memory, maybe unread


class ProcessBackend(WorkerBackend):
    """Worker processes started from a context, one private pipe pair each."""

    remote = True

    def __init__(self, context: Any, processes: int, initializer: Any,
                 initargs: Sequence[Any], *, functions: FunctionCache | None = None,
                 memory_limit: int | None = None) -> None:
        self._context = context
        self._memory_limit = memory_limit
        self._initializer = initializer
        self._initargs = tuple(initargs)
        self.functions = functions or FunctionCache()
        self._procs: dict[int, _Proc] = {}
        self._slots: list[_Proc | None] = [None] * processes
        self._names = itertools.count(1)
        cls_name = getattr(getattr(context, "Process", None), "__name__", "Process")
        self._name_prefix = (cls_name.replace("Process", "PoolWorker")
                             if isinstance(cls_name, str) and "Process" in cls_name
                             else "PoolWorker")
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        mark_private(self._wake_r, self._wake_w)
        self._wake_lock = threading.Lock()
        self._fdmap: dict[int, tuple[int, _Proc | None]] = {self._wake_r: (_WAKE, None)}
        self._poller: Any = None
        self._dirty = True
        self._polling = False
        self._woken = False
        self._pending: list[Event] = []
        self._writable: list[_Proc] = []
        self._to_flush: list[_Proc] = []
        self._closed = False

    # --- called with the driver's lock held -----------------------------------------------

    def spawn(self, worker_id: int, slot: int) -> int | None:
        task_r, task_w = os.pipe()
        result_r, result_w = os.pipe()
        report_r, report_w = os.pipe()  # the worker's fault handler writes stacks here
        try:
            for fd in (task_w, result_r, report_r):
                os.set_blocking(fd, False)
            mark_private(task_w, result_r, report_r)  # later fork children must not hold them
            process = self._context.Process(
                target=wire.main,
                args=(wire.ChildFd(task_r), wire.ChildFd(result_w), self._initializer,
                      self._initargs, wire.ChildFd(report_w), self._memory_limit),
                name=f"{self._name_prefix}-{next(self._names)}", daemon=False)
            process.start()
        except BaseException:
            close_quietly(task_r, task_w, result_r, result_w, report_r, report_w)
            raise
        close_quietly(task_r, result_w, report_w)
        proc = _Proc(worker_id, slot, process, task_w, result_r, report_r)
        self._procs[worker_id] = proc
        old = self._slots[slot]
        self._slots[slot] = proc
        if old is not None and old.exited:
            _close_process(old.process)  # its exit was handled: nobody needs it now
        self._changed()
        return proc.pid

    def send(self, worker_id: int, task_id: int, job: JobRecord, start: int,
             items: Sequence[Any]) -> BaseException | None:
        proc = self._procs.get(worker_id)
        if proc is None or proc.exited:
            return None
        known = proc.known
        fkey = job.fkey
        drop = None
        if fkey in known:
            known.move_to_end(fkey)
            fblob = None
        else:
            fblob = job.fblob
            known[fkey] = None
            if len(known) > WORKER_FUNCTION_CACHE:
                drop = known.popitem(last=False)[0]
        try:
            # big arrays in the arguments travel through shared memory, not the pipe
            payload = _bigdata.dumps((wire.TASK, task_id, fkey, fblob, drop, items))
        except Exception as exc:  # noqa: BLE001 - an argument that cannot be pickled
            if fblob is not None:
                del known[fkey]
                if drop is not None:
                    known[drop] = None
                    known.move_to_end(drop, last=False)
            return exc
        if getattr(payload, "segment", ""):
            proc.in_shm.sent(payload)  # type: ignore[arg-type]
        proc.line.append((task_id, job, start))
        self._write(proc, _frame(payload))
        return None

    def revoke(self, worker_id: int, task_id: int) -> None:
        proc = self._procs.get(worker_id)
        if proc is not None and not proc.exited:
            self._write(proc, _frame(_dumps((wire.REVOKE, task_id))))

    def stop(self, worker_id: int) -> None:
        proc = self._procs.get(worker_id)
        if proc is not None and not proc.exited:
            self._write(proc, _STOP_FRAME)

    def kill(self, worker_id: int) -> None:
        proc = self._procs.get(worker_id)
        if proc is not None and not proc.exited:
            _kill_process(proc.process)

    def where_stuck(self, worker_id: int) -> str | None:
        proc = self._procs.get(worker_id)
        if proc is None or proc.exited or proc.pid is None:
            return None
        _read_report(proc.report_r, 0)  # drop anything older
        try:
            os.kill(proc.pid, wire.STACK_SIGNAL)
        except OSError:
            return None
        return _read_report(proc.report_r, STACK_WAIT) or None

    def _write(self, proc: _Proc, data: bytes) -> None:
        """Queue a frame; ``flush`` (at the end of the driver's round) writes them all."""
        proc.out.append(data)
        if not proc.queued:
            proc.queued = True
            self._to_flush.append(proc)

    def flush(self) -> None:
        """Write what the workers' pipes take now, one ``writev`` per worker."""
        procs = self._to_flush
        if self._writable:
            procs = procs + self._writable
            self._writable = []
        if not procs:
            return
        self._to_flush = []
        for proc in procs:
            proc.queued = False
            if proc.out and not proc.exited:
                self._write_out(proc)

    def _write_out(self, proc: _Proc) -> None:
        out = proc.out
        fd = proc.task_w
        while out:
            if proc.out_offset:
                out[0] = out[0][proc.out_offset:]
                proc.out_offset = 0
            try:
                done = os.writev(fd, out[:_IOV_MAX]) if len(out) > 1 else os.write(fd, out[0])
            except BlockingIOError:
                break
            except OSError:
                out.clear()  # the worker is gone; its sentinel tells the rest
                break
            while done:
                size = len(out[0])
                if done >= size:
                    done -= size
                    del out[0]
                else:
                    proc.out_offset = done
                    break
            if proc.out_offset:
                break  # the pipe is full
        want = bool(out)
        if want != proc.watch_out:
            proc.watch_out = want
            self._changed()

    def _changed(self) -> None:
        """The set of watched fds changed: rebuild the poller before the next poll."""
        self._dirty = True
        if self._polling:
            self.wakeup()

    def prepare_poll(self) -> None:
        if self._dirty:
            self._dirty = False
            poller = select.poll()
            fdmap: dict[int, tuple[int, _Proc | None]] = {self._wake_r: (_WAKE, None)}
            poller.register(self._wake_r, select.POLLIN)
            for proc in self._procs.values():
                if proc.exited:
                    continue
                if not proc.eof:
                    poller.register(proc.result_r, _POLLIN)
                    fdmap[proc.result_r] = (_RESULT, proc)
                if proc.sentinel is not None:
                    poller.register(proc.sentinel, select.POLLIN)
                    fdmap[proc.sentinel] = (_SENTINEL, proc)
                if proc.watch_out:
                    poller.register(proc.task_w, _POLLOUT)
                    fdmap[proc.task_w] = (_TASK, proc)
            self._poller = poller
            self._fdmap = fdmap
        self._polling = True

    def workers(self) -> list[Any]:
        return [proc.process if proc is not None else None for proc in self._slots]

    # --- called by the leader without the lock ------------------------------------------------

    def wakeup(self) -> None:
        if not self._woken:
            self._woken = True
            # Under the lock, so close() cannot free the pipe between the check and the
            # write: a write to a closed pipe's reused fd number would corrupt another
            # connection of this process.
            with self._wake_lock:
                if self._wake_w >= 0:
                    try:
                        os.write(self._wake_w, b"!")
                    except OSError:
                        pass

    def poll(self, timeout: float | None) -> list[Event]:
        try:
            if timeout is None:
                ready = self._poller.poll()
            else:
                ready = self._poller.poll(max(0, int(timeout * 1000 + 0.999)))
        finally:
            self._polling = False
        fdmap = self._fdmap
        dying: list[_Proc] = []
        now = _monotonic()
        for fd, _mask in ready:
            kind, proc = fdmap[fd]
            if kind == _RESULT:
                assert proc is not None
                self._read(proc, now)
            elif kind == _SENTINEL:
                assert proc is not None
                dying.append(proc)
            elif kind == _TASK:
                assert proc is not None
                self._writable.append(proc)
            else:
                try:
                    os.read(self._wake_r, 4096)
                except OSError:
                    pass
                self._woken = False
        for proc in dying:
            self._reap(proc, now)
        events, self._pending = self._pending, []
        return events

    def _read(self, proc: _Proc, now: float) -> bool:
        """Read what is there; return False once nothing more is (EOF or would block)."""
        try:
            chunk = os.read(proc.result_r, proc.buffer.wanted())
        except BlockingIOError:
            return False
        except OSError:
            chunk = b""
        if not chunk:
            proc.eof = True
            self._dirty = True
            return False
        messages: list[Any] = []
        proc.buffer.feed(chunk, messages)
        for message in messages:
            self._pending.append(self._decode(proc, message, now))
        if proc.in_shm.entries and messages:
            proc.in_shm.prune()  # answered tasks were taken
        return True

    def _decode(self, proc: _Proc, message: tuple[Any, ...], now: float) -> Event:
        code = message[0]
        worker_id = proc.worker_id
        if code == wire.DONE:
            task_id, job, start = proc.line.popleft()
            results = message[2]
            if job.call >= wire.CALL_ONE_EACH:
                _rebuild_item_failures(results, proc.pid, job, task_id, start)
            return TaskDone(now=now, worker_id=worker_id, task_id=task_id, results=results,
                            duration=message[3])
        if code == wire.FAILED:
            task_id, job, start = proc.line.popleft()
            payload = message[3]
            where = _describe(job, task_id, start + payload[5])
            error = rebuild_error(payload, f"raised in worker pid {proc.pid} {where}")
            return TaskDone(now=now, worker_id=worker_id, task_id=task_id,
                            results=message[2], error=error, duration=message[4])
        if code == wire.SKIPPED:
            proc.line.popleft()
            return TaskSkipped(now=now, worker_id=worker_id, task_id=message[1])
        if code == wire.READY:
            return WorkerReady(now=now, worker_id=worker_id)
        if code == wire.RETIRE:
            util.debug("pool worker pid %s holds %d bytes, past max_memory_per_child: "
                       "replacing it", proc.pid, message[1])
            return RetireWorker(now=now, worker_id=worker_id)
        if code == wire.INIT_FAILED:
            error = rebuild_error(message[1], f"raised by the pool initializer in worker pid "
                                              f"{proc.pid}")
            return WorkerInitFailed(now=now, worker_id=worker_id, error=error)
        raise RuntimeError(f"pool worker pid {proc.pid} sent an unknown message {code!r}")

    def _reap(self, proc: _Proc, now: float) -> None:
        """The worker's process ended: read all it said, then report its exit."""
        if proc.exited:
            return
        while not proc.eof and self._read(proc, now):
            pass
        process = proc.process
        exitcode = process.exitcode
        if exitcode is None:
            process.join(1.0)  # the sentinel fired, so the exit status is moments away
            exitcode = process.exitcode
        proc.exited = True
        # SIGKILL gives the fault handler no chance to write: do not look
        report = _read_report(proc.report_r, 0) if exitcode != -signal.SIGKILL else ""
        self._pending.append(WorkerExited(now=now, worker_id=proc.worker_id,
                                          exitcode=exitcode, crash_report=report or None))
        self._forget(proc)

    def _forget(self, proc: _Proc) -> None:
        self._procs.pop(proc.worker_id, None)
        if self._slots[proc.slot] is not proc:
            _close_process(proc.process)  # replaced already: Pool._pool no longer shows it
        close_quietly(proc.task_w, proc.result_r, proc.report_r)
        proc.in_shm.prune()
        proc.in_shm.abandon()  # the big tasks it never took
        proc.out = []
        proc.line.clear()
        self._dirty = True

    def kill_all_now(self) -> None:
        procs = list(self._procs.values())
        for proc in procs:
            _kill_process(proc.process)
        for proc in procs:
            _join_process(proc.process)
            proc.exited = True
            self._forget(proc)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.kill_all_now()
        with self._wake_lock:
            close_quietly(self._wake_r, self._wake_w)
            self._wake_r = self._wake_w = -1
        for proc in self._slots:
            if proc is not None:
                _close_process(proc.process)


def _read_report(fd: int, wait: float) -> str:
    """What the worker's fault handler wrote to ``fd``: wait up to ``wait`` seconds for
    it to begin, then read until it has been quiet for a moment."""
    chunks: list[bytes] = []
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    timeout_ms = int(wait * 1000)
    size = 0
    while size < REPORT_LIMIT and poller.poll(timeout_ms):
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # BlockingIOError included: nothing more for now
            break
        if not chunk:
            break  # the worker is gone
        chunks.append(chunk)
        size += len(chunk)
        timeout_ms = 30  # the handler writes in bursts: wait a little for the rest
    text = b"".join(chunks)[:REPORT_LIMIT].decode("utf-8", "replace")
    return _without_pool_frames(text)


def _without_pool_frames(report: str) -> str:
    """Cut each thread's stack where the pool's own worker loop begins (its callers, and
    under fork the parent's frames, say nothing about the task)."""
    lines: list[str] = []
    skipping = False
    for line in report.splitlines():
        if not line.startswith("  File "):
            skipping = False
        elif skipping or _WORKER_FILE in line:
            skipping = True
            continue
        lines.append(line)
    return "\n".join(lines)


def _rebuild_item_failures(results: list[Any], pid: int | None, job: JobRecord, task_id: int,
                           start: int) -> None:
    item_failure = wire.ItemFailure
    for offset, value in enumerate(results):
        if type(value) is item_failure:
            where = _describe(job, task_id, start + offset)
            value.error = rebuild_error(value.error, f"raised in worker pid {pid} {where}")


def _describe(job: JobRecord, task_id: int, index: int) -> str:
    if job.kind == "apply":
        return f"while running {job.label} ({job.kind} job {job.job_id})"
    return (f"while running {job.label} on item {index} ({job.kind} job {job.job_id}, "
            f"task {task_id})")


def _kill_process(process: Any) -> None:
    try:
        kill = getattr(process, "kill", None)
        if kill is not None:
            kill()
        else:
            process.terminate()
    except (OSError, ValueError, AssertionError):
        pass


def _join_process(process: Any) -> None:
    try:
        process.join(5.0)
    except TypeError:  # a stand-in Process whose join() takes no timeout
        process.join()
    except (OSError, ValueError, AssertionError):
        pass


def _close_process(process: Any) -> None:
    """Release an ended worker's Process object (its sentinel fd)."""
    close = getattr(process, "close", None)
    if close is None:
        return
    try:
        if process.exitcode is not None:
            close()
    except (ValueError, AttributeError, TypeError, AssertionError):
        pass
    except OSError as exc:  # pragma: no cover
        util.debug("could not close worker process object: %r", exc)
