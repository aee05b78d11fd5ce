"""Locks, semaphores, conditions, events and barriers that work between processes.

Each primitive is built on named POSIX semaphores (:mod:`manyproc._os.semaphore`):

* ``fork`` context: the name is removed as soon as the semaphore exists; forked
  children inherit the open semaphore itself.
* ``spawn`` and ``forkserver`` contexts: a child re-opens the semaphore by name
  while it starts.  The name belongs to the process that created the object: it
  is removed when that object is collected (or, if a child it was sent to may
  still be opening it, once that child has ended), when the creator exits, and
  by the resource tracker if the creator is killed.

:class:`Condition` wakes waiters through three semaphores (sleepers, a gate and
acknowledgements, see :meth:`Condition.notify`); :class:`Event` and
:class:`Barrier` keep their state in shared memory beside a :class:`Condition`.
These objects travel to children only while the child starts (as ``Process``
arguments or pool initializer arguments), never through queues or pipes.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

from . import reduction, sharedctypes, util
from ._os import semaphore as _sem
from .process import current_process

__all__ = [
    "Lock", "RLock", "Semaphore", "BoundedSemaphore", "Condition", "Event", "Barrier",
]

RECURSIVE_MUTEX = _sem.RECURSIVE_MUTEX
SEMAPHORE = _sem.SEMAPHORE
SEM_VALUE_MAX = _sem.SEM_VALUE_MAX

BrokenBarrierError = threading.BrokenBarrierError

# How long a notifier waits for a woken waiter's acknowledgement before it suspects
# that the waiter died (a live one acknowledges within microseconds of waking).
_ACK_GRACE = 5.0

_sem.require()


def _context(ctx: Any) -> Any:
    if ctx is None:
        from .context import _default_context

        return _default_context.get_context()
    return ctx


class _NotOwnedError(AssertionError, RuntimeError):
    """Using a condition without holding its lock (both the multiprocessing and the
    threading exception types, so either ``except`` clause catches it)."""


# --------------------------------------------------------------------------- the base


class SemLock:
    """What every semaphore-based primitive shares: the C object, naming, pickling, cleanup."""

    _semlock: Any

    def __init__(self, kind: int, value: int, maxvalue: int, *, ctx: Any = None) -> None:
        ctx = _context(ctx)
        fork_only = ctx.get_start_method() == "fork"
        self._recipients: list[Any] = []  # weak references to Popen objects
        if fork_only:
            self._semlock = _sem.create(kind, value, maxvalue, unlink_now=True)
        else:
            from . import resource_tracker

            def track(name: str) -> None:
                resource_tracker.register(name, "semaphore")

            def untrack(name: str) -> None:
                resource_tracker.unregister(name, "semaphore")

            self._semlock = _sem.create(kind, value, maxvalue, unlink_now=False,
                                        before=track, failed=untrack)
            util.debug("created semlock with name %s", self._semlock.name)
            util.Finalize(self, _let_go_of_name, (self._semlock.name, self._recipients))
        self._bind()

    def _bind(self) -> None:
        util.register_after_fork(self, SemLock._after_fork)
        # Bound straight to the C methods: no Python frame on the hot path.
        self.acquire = self._semlock.acquire  # type: ignore[method-assign]
        self.release = self._semlock.release  # type: ignore[method-assign]

    @staticmethod
    def _after_fork(obj: SemLock) -> None:
        obj._semlock._after_fork()  # a fork child holds none of its parent's acquisitions

    def acquire(self, block: bool = True, timeout: float | None = None) -> bool:
        """Acquire; wait at most ``timeout`` seconds (``None``: for ever) unless ``block`` is false.

        Returns:
            True if acquired, False if not (non-blocking or timed out).
        """
        return bool(self._semlock.acquire(block, timeout))

    def release(self) -> None:
        """Release once."""
        self._semlock.release()

    def __enter__(self) -> Any:
        return self._semlock.__enter__()

    def __exit__(self, *exc: Any) -> Any:
        return self._semlock.__exit__(*exc)

    def __getstate__(self) -> tuple[Any, ...]:
        reduction.assert_spawning(self)
        sl = self._semlock
        if sl.name is None:
            kind = type(self).__name__
            raise RuntimeError(
                f"A SemLock created in a fork context (this {kind}) is being sent to a child "
                "started another way: only children started with fork can use it. Create it "
                "with the context that starts the child, e.g. "
                f"manyproc.get_context('spawn').{kind}()")
        popen = reduction.get_spawning_popen()
        if popen is not None:
            # Remember the child, so the name outlives this object until the child has
            # surely opened it (see _let_go_of_name); forget children that ended.
            self._recipients[:] = [r for r in self._recipients if _running_pid(r) is not None]
            self._recipients.append(weakref.ref(popen))
        return (sl.handle, sl.kind, sl.maxvalue, sl.name)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self._semlock = _sem.reopen(*state)
        self._recipients = []
        util.debug("recreated semlock with name %r", state[3])
        self._bind()


def _running_pid(recipient: Any) -> int | None:
    """The pid of a child this object was sent to, if that child may still be running."""
    popen = recipient()
    if popen is None:
        return None  # collected: the child was reaped (running children are kept alive)
    try:
        return None if popen.poll() is not None else int(popen.pid)
    except Exception:
        return None


def _let_go_of_name(name: str, recipients: list[Any]) -> None:
    """The creator's object is gone: remove its semaphore's name (now or after its children)."""
    from . import resource_tracker

    waiting_for = [pid for pid in map(_running_pid, recipients) if pid is not None]
    if waiting_for:
        resource_tracker._unlink_after(name, "semaphore", waiting_for)
        return
    try:
        _sem.unlink(name)
    except OSError:
        pass  # already gone
    resource_tracker.unregister(name, "semaphore")


def _check_value(value: Any, what: str) -> None:
    if not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__} ({value!r})")
    if value < 0:
        raise ValueError(f"{what} must be >= 0, got {value}; a semaphore counts available "
                         "permits, so start it at 0 or more")
    if value > SEM_VALUE_MAX:
        raise ValueError(f"{what} {value} is larger than this system's limit "
                         f"SEM_VALUE_MAX={SEM_VALUE_MAX}")


# --------------------------------------------------------------------------- semaphores and locks


class Semaphore(SemLock):
    """A counter of permits shared between processes: ``acquire`` takes one, ``release`` adds one.

    Raises:
        ValueError: ``value`` is negative or above SEM_VALUE_MAX.
    """

    def __init__(self, value: int = 1, *, ctx: Any = None) -> None:
        _check_value(value, "semaphore initial value")
        super().__init__(SEMAPHORE, value, SEM_VALUE_MAX, ctx=ctx)

    def get_value(self) -> int:
        """The current number of permits.

        Raises:
            NotImplementedError: on macOS, whose semaphores cannot be read.
        """
        try:
            return int(self._semlock._get_value())
        except NotImplementedError:
            raise NotImplementedError(
                "this platform (macOS) has no sem_getvalue(), so a semaphore's value cannot "
                "be read; keep your own count in a manyproc.Value if you need it") from None

    def _shown_value(self) -> str:
        try:
            return str(self._semlock._get_value())
        except Exception:
            return "unknown"

    def __repr__(self) -> str:
        return f"<{type(self).__name__}(value={self._shown_value()})>"


class BoundedSemaphore(Semaphore):
    """A semaphore that refuses (ValueError) to be released above its initial value."""

    def __init__(self, value: int = 1, *, ctx: Any = None) -> None:
        _check_value(value, "semaphore initial value")
        SemLock.__init__(self, SEMAPHORE, value, value, ctx=ctx)

    def __repr__(self) -> str:
        return (f"<{type(self).__name__}(value={self._shown_value()}, "
                f"maxvalue={self._semlock.maxvalue})>")


def _holder(sl: Any) -> tuple[str, str]:
    """Who holds a lock and how many times, as the reprs show it."""
    try:
        if sl._is_mine():
            name = current_process().name
            thread = threading.current_thread()
            if thread is not threading.main_thread():
                name += "|" + thread.name
            return name, str(sl._count())
        if sl._get_value() == 1:
            return "None", "0"
        # Held: by a thread of this process (it counts acquisitions) or by another process.
        return ("SomeOtherThread" if sl._count() > 0 else "SomeOtherProcess"), "nonzero"
    except Exception:
        return "unknown", "unknown"


class Lock(SemLock):
    """A non-recursive lock shared between processes; any process may release it."""

    def __init__(self, *, ctx: Any = None) -> None:
        super().__init__(SEMAPHORE, 1, 1, ctx=ctx)

    def __repr__(self) -> str:
        owner, _ = _holder(self._semlock)
        return f"<{type(self).__name__}(owner={owner})>"


class RLock(SemLock):
    """A recursive lock: its owner may acquire it again, and must release it as many times."""

    def __init__(self, *, ctx: Any = None) -> None:
        super().__init__(RECURSIVE_MUTEX, 1, 1, ctx=ctx)

    def __repr__(self) -> str:
        owner, count = _holder(self._semlock)
        return f"<{type(self).__name__}({owner}, {count})>"


# --------------------------------------------------------------------------- condition


class Condition:
    """A condition variable shared between processes (``threading.Condition``'s interface).

    Waking works with three semaphores, all zero at rest:

    * ``_sleepers`` counts waiters not yet chosen by a notifier;
    * ``_gate`` holds one token per chosen waiter, which that waiter takes to wake up;
    * ``_acks`` gets one release per woken waiter, and the notifier (still holding the
      lock, so nobody new can start waiting) takes them all before returning.  This is
      what stops a waiter that arrives later from taking a token meant for an earlier one.
      A waiter that was killed never acknowledges; the notifier gives up on it after a
      grace period instead of hanging (see :meth:`_collect_acks`).

    A waiter that times out removes itself from ``_sleepers``; if a notifier has already
    counted it, it takes its token instead and reports that it was notified.
    """

    def __init__(self, lock: Any = None, *, ctx: Any = None) -> None:
        ctx = _context(ctx)
        self._lock = lock if lock is not None else RLock(ctx=ctx)
        self._sleepers = Semaphore(0, ctx=ctx)
        self._gate = Semaphore(0, ctx=ctx)
        self._acks = Semaphore(0, ctx=ctx)
        self._bind()

    def _bind(self) -> None:
        self.acquire = self._lock.acquire
        self.release = self._lock.release

    def __getstate__(self) -> tuple[Any, ...]:
        reduction.assert_spawning(self)
        return (self._lock, self._sleepers, self._gate, self._acks)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self._lock, self._sleepers, self._gate, self._acks = state
        self._bind()

    def __enter__(self) -> bool:
        return bool(self._lock.__enter__())

    def __exit__(self, *exc: Any) -> None:
        self._lock.__exit__(*exc)

    # CPython's test suite reads these to check that nothing is left over.
    @property
    def _sleeping_count(self) -> Semaphore:
        return self._sleepers

    @property
    def _woken_count(self) -> Semaphore:
        return self._acks

    @property
    def _wait_semaphore(self) -> Semaphore:
        return self._gate

    def __repr__(self) -> str:
        try:
            waiting = str(self._sleepers._semlock._get_value())
        except Exception:
            waiting = "unknown"
        return f"<{type(self).__name__}({self._lock!r}, {waiting})>"

    def _held_depth(self, what: str) -> int:
        """How many times this thread holds the lock; raise if it does not hold it."""
        sl = getattr(self._lock, "_semlock", None)
        if sl is None:
            return 1  # a foreign lock: trust the caller
        if not sl._is_mine():
            raise _NotOwnedError(
                f"cannot {what}() a Condition whose lock this thread does not hold; use "
                f"'with cond: cond.{what}(...)'")
        return int(sl._count())

    def wait(self, timeout: float | None = None) -> bool:
        """Release the lock, sleep until notified or ``timeout`` seconds pass, re-acquire.

        Returns:
            False if the timeout expired, else True.
        """
        depth = self._held_depth("wait")
        self._sleepers.release()
        for _ in range(depth):
            self._lock.release()
        notified = False
        try:
            notified = self._gate.acquire(True, timeout)
        finally:
            if not notified and not self._sleepers.acquire(False):
                # A notifier counted us before we gave up: its token is ours to take.
                self._gate.acquire(True)
                notified = True
            if notified:
                self._acks.release()
            for _ in range(depth):
                self._lock.acquire()
        return notified

    def wait_for(self, predicate: Callable[[], Any], timeout: float | None = None) -> Any:
        """Wait until ``predicate()`` is true or ``timeout`` seconds pass; return its last value."""
        return util.wait_for_predicate(self.wait, predicate, timeout)

    def notify(self, n: int = 1) -> None:
        """Wake up to ``n`` of the processes or threads waiting now."""
        self._held_depth("notify")
        chosen = 0
        while chosen < n and self._sleepers.acquire(False):
            chosen += 1
        for _ in range(chosen):
            self._gate.release()
        self._collect_acks(chosen)

    def _collect_acks(self, expected: int) -> None:
        """Wait for ``expected`` woken waiters to acknowledge; give up on dead ones.

        A waiter killed while waiting never acknowledges.  After ``_ACK_GRACE``
        seconds without an acknowledgement the notifier takes back one unclaimed
        token (that waiter never woke, so it is forgotten); a token that was taken
        but never acknowledged for two grace periods belongs to a waiter that died
        just after waking.
        """
        quiet_periods = 0
        while expected:
            if self._acks.acquire(True, _ACK_GRACE):
                expected -= 1
                quiet_periods = 0
            elif self._gate.acquire(False) or quiet_periods:
                util.sub_warning("a process waiting on %r did not wake up; assuming it died",
                                 self)
                expected -= 1
                quiet_periods = 0
            else:
                quiet_periods += 1

    def notify_all(self) -> None:
        """Wake every process or thread waiting now."""
        self.notify(SEM_VALUE_MAX)


# --------------------------------------------------------------------------- event


class Event:
    """A flag shared between processes that ``wait()`` blocks on until it is set."""

    def __init__(self, *, ctx: Any = None) -> None:
        ctx = _context(ctx)
        self._cond = Condition(Lock(ctx=ctx), ctx=ctx)
        self._flag = sharedctypes.RawValue("i", 0)

    def __getstate__(self) -> dict[str, Any]:
        reduction.assert_spawning(self)
        return {"_cond": self._cond, "_flag": self._flag}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._cond = state["_cond"]
        self._flag = state["_flag"]

    def is_set(self) -> bool:
        """True if the flag is set."""
        return bool(self._flag.value)

    def set(self) -> None:
        """Set the flag and wake every waiter."""
        with self._cond:
            self._flag.value = 1
            self._cond.notify_all()

    def clear(self) -> None:
        """Reset the flag."""
        with self._cond:
            self._flag.value = 0

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the flag is set or ``timeout`` seconds pass.

        Returns:
            True if the flag was set (even if cleared again since), False on timeout.
        """
        with self._cond:
            if self._flag.value:
                return True
            notified = self._cond.wait(timeout)
            return bool(self._flag.value) or notified

    def __repr__(self) -> str:
        return f"<{type(self).__qualname__} at {id(self):#x} {'set' if self.is_set() else 'unset'}>"


# --------------------------------------------------------------------------- barrier

_FILLING, _DRAINING, _RESETTING, _BROKEN = 0, 1, 2, 3


class Barrier:
    """``threading.Barrier`` between processes: ``parties`` callers meet, then all go on.

    A round passes through *filling* (callers arrive), *draining* (they leave);
    ``reset()`` puts waiting callers in *resetting* and ``abort()`` or a timeout in
    *broken*; callers of the next round wait until the previous one has drained.
    State and count live in shared memory, guarded by the condition's lock.

    Raises:
        ValueError: ``parties`` is less than 1.
    """

    def __init__(self, parties: int, action: Callable[[], Any] | None = None,
                 timeout: float | None = None, *, ctx: Any = None) -> None:
        if not isinstance(parties, int) or isinstance(parties, bool):
            raise TypeError(f"parties must be an int, not {type(parties).__name__}")
        if parties < 1:
            raise ValueError(f"parties must be > 0, got {parties}")
        if action is not None and not callable(action):
            raise TypeError(f"action must be callable or None, got {action!r}")
        ctx = _context(ctx)
        self._parties = parties
        self._action = action
        self._timeout = timeout
        self._cond = Condition(Lock(ctx=ctx), ctx=ctx)
        self._shared = sharedctypes.RawArray("i", 2)  # [state, count]

    def __getstate__(self) -> tuple[Any, ...]:
        reduction.assert_spawning(self)
        return (self._parties, self._action, self._timeout, self._cond, self._shared)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self._parties, self._action, self._timeout, self._cond, self._shared = state

    @property
    def _state(self) -> int:
        return int(self._shared[0])

    @_state.setter
    def _state(self, value: int) -> None:
        self._shared[0] = value

    @property
    def _count(self) -> int:
        return int(self._shared[1])

    @_count.setter
    def _count(self, value: int) -> None:
        self._shared[1] = value

    def wait(self, timeout: float | None = None) -> int:
        """Wait for all parties; return this caller's arrival index (0 .. parties-1).

        Raises:
            threading.BrokenBarrierError: the barrier is or becomes broken or reset, or
                ``timeout`` (default: the barrier's) expired -- which breaks it.
        """
        if timeout is None:
            timeout = self._timeout
        with self._cond:
            while self._state in (_DRAINING, _RESETTING):
                self._cond.wait()  # the previous round is still leaving
            if self._state == _BROKEN:
                raise BrokenBarrierError
            index = self._count
            self._count = index + 1
            try:
                if index + 1 == self._parties:
                    self._release_all()
                elif not self._cond.wait_for(lambda: self._state != _FILLING, timeout):
                    self._break()
                    raise BrokenBarrierError
                elif self._state != _DRAINING:
                    raise BrokenBarrierError
                return index
            finally:
                self._count -= 1
                if self._count == 0 and self._state in (_DRAINING, _RESETTING):
                    self._state = _FILLING
                    self._cond.notify_all()

    def _release_all(self) -> None:
        try:
            if self._action is not None:
                self._action()
        except BaseException:
            self._break()
            raise
        self._state = _DRAINING
        self._cond.notify_all()

    def _break(self) -> None:
        self._state = _BROKEN
        self._cond.notify_all()

    def reset(self) -> None:
        """Return to the empty state; callers waiting now get BrokenBarrierError."""
        with self._cond:
            if self._count > 0:
                if self._state in (_FILLING, _BROKEN):
                    self._state = _RESETTING
            else:
                self._state = _FILLING
            self._cond.notify_all()

    def abort(self) -> None:
        """Break the barrier: current and future callers get BrokenBarrierError until reset()."""
        with self._cond:
            self._break()

    @property
    def parties(self) -> int:
        """The number of callers needed to pass the barrier."""
        return self._parties

    @property
    def n_waiting(self) -> int:
        """The number of callers waiting in the current round."""
        return self._count if self._state == _FILLING else 0

    @property
    def broken(self) -> bool:
        """True if the barrier is broken."""
        return self._state == _BROKEN

    def __repr__(self) -> str:
        if self.broken:
            return f"<{type(self).__qualname__} at {id(self):#x}: broken>"
        return (f"<{type(self).__qualname__} at {id(self):#x}: "
                f"waiters={self.n_waiting}/{self.parties}>")
