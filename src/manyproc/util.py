"""Process-wide helpers every layer leans on: logging, finalizers, after-fork hooks, temp dirs.

This module sits at the bottom of the layer stack: it imports nothing else from
manyproc, so any module may use it.  Higher layers plug behaviour into the exit
sequence through :func:`_register_exit_hook` instead of being imported here.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import sys
import threading
import weakref
from collections.abc import Callable, Iterable

TYPE_CHECKING = False  # typing costs import time in every child; only checkers need it
if TYPE_CHECKING:
    import logging
    from typing import Any

__all__ = [
    "sub_debug", "debug", "info", "sub_warning", "get_logger", "log_to_stderr",
    "get_temp_dir", "register_after_fork", "is_exiting", "Finalize",
    "ForkAwareThreadLock", "ForkAwareLocal", "close_all_fds_except",
    "SUBDEBUG", "SUBWARNING",
]

NOTSET = 0
SUBDEBUG = 5
DEBUG = 10
INFO = 20
SUBWARNING = 25

LOGGER_NAME = "manyproc"
DEFAULT_LOGGING_FORMAT = "[%(levelname)s/%(processName)s] %(message)s"

_logger: logging.Logger | None = None
_log_to_stderr = False


def _log(level: int, msg: str, *args: Any) -> None:
    if _logger is not None:
        _logger.log(level, msg, *args, stacklevel=3)


def sub_debug(msg: str, *args: Any) -> None:
    _log(SUBDEBUG, msg, *args)


def debug(msg: str, *args: Any) -> None:
    _log(DEBUG, msg, *args)


def info(msg: str, *args: Any) -> None:
    _log(INFO, msg, *args)


def sub_warning(msg: str, *args: Any) -> None:
    _log(SUBWARNING, msg, *args)


def get_logger() -> logging.Logger:
    """Return manyproc's logger, creating it (with no handler of its own) on first use."""
    global _logger
    import logging
    with logging._lock:  # type: ignore[attr-defined]
        if _logger is None:
            logging.addLevelName(SUBDEBUG, "SUBDEBUG")
            logging.addLevelName(SUBWARNING, "SUBWARNING")
            _logger = logging.getLogger(LOGGER_NAME)
            _logger.propagate = False
    return _logger


def log_to_stderr(level: int | str | None = None) -> logging.Logger:
    """Send manyproc's log records to stderr, optionally setting the level."""
    global _log_to_stderr
    import logging
    logger = get_logger()
    if not any(getattr(h, "_manyproc_stderr", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(DEFAULT_LOGGING_FORMAT))
        handler._manyproc_stderr = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    if level:
        logger.setLevel(level)
    _log_to_stderr = True
    return logger


# --------------------------------------------------------------------------- finalizers

_finalizer_registry: dict[tuple[Any, int], Finalize] = {}
_finalizer_counter = itertools.count()


class Finalize:
    """Call ``callback(*args, **kwargs)`` once: when ``obj`` is collected, when called, or at exit.

    Finalizers with an ``exitpriority`` run at process exit, highest priority first
    and, within one priority, newest first.  A finalizer only ever runs in the
    process that created it, so a forked child never runs its parent's cleanup.
    """

    def __init__(self, obj: Any, callback: Callable[..., Any], args: Iterable[Any] = (),
                 kwargs: dict[str, Any] | None = None, exitpriority: int | None = None) -> None:
        if exitpriority is not None and not isinstance(exitpriority, int):
            raise TypeError(
                f"exitpriority must be None or an int, not {type(exitpriority).__name__}")
        if obj is None and exitpriority is None:
            raise ValueError("Finalize needs an object to watch or an exitpriority, got neither")
        self._weakref = weakref.ref(obj, self) if obj is not None else None
        self._callback: Callable[..., Any] | None = callback
        self._args = tuple(args)
        self._kwargs = kwargs or {}
        self._key = (exitpriority, next(_finalizer_counter))
        self._pid = os.getpid()
        _finalizer_registry[self._key] = self

    def __call__(self, wr: Any = None) -> Any:
        """Run the callback unless it already ran or was cancelled; return its result."""
        try:
            del _finalizer_registry[self._key]
        except KeyError:
            sub_debug("finalizer no longer registered")
            return None
        callback = self._callback
        if callback is None or self._pid != os.getpid():
            return None
        sub_debug("finalizer calling %s with args %s and kwargs %s", callback, self._args,
                  self._kwargs)
        try:
            return callback(*self._args, **self._kwargs)
        finally:
            self._callback = None
            self._args = ()
            self._kwargs = {}
            self._weakref = None

    def cancel(self) -> None:
        """Forget the callback without running it."""
        try:
            del _finalizer_registry[self._key]
        except KeyError:
            pass
        else:
            self._callback = None
            self._args = ()
            self._kwargs = {}
            self._weakref = None

    def still_active(self) -> bool:
        """True until the callback has run or been cancelled."""
        return self._key in _finalizer_registry

    def __repr__(self) -> str:
        obj = self._weakref() if self._weakref is not None else None
        name = getattr(self._callback, "__qualname__", repr(self._callback))
        parts = [f"<{type(self).__name__} object, callback={name}"]
        if obj is not None:
            parts.append(f", watching {type(obj).__name__}")
        if self._key[0] is not None:
            parts.append(f", exitpriority={self._key[0]}")
        return "".join(parts) + ">"


def _run_finalizers(minpriority: int | None = None) -> None:
    """Run registered finalizers, highest priority first.

    With ``minpriority=None`` every finalizer that has an exit priority runs;
    otherwise only those whose priority is at least ``minpriority``.
    """
    if minpriority is None:
        def wanted(key: tuple[Any, int]) -> bool:
            return key[0] is not None
    else:
        def wanted(key: tuple[Any, int]) -> bool:
            return key[0] is not None and key[0] >= minpriority

    # Finalizers may register or cancel others while we run, so re-read each round.
    chosen = sorted((k for k in list(_finalizer_registry) if wanted(k)), reverse=True)
    for key in chosen:
        finalizer = _finalizer_registry.get(key)
        if finalizer is None:
            continue
        try:
            finalizer()
        except Exception:
            import traceback

            traceback.print_exc()
    if minpriority is None:
        _finalizer_registry.clear()


# --------------------------------------------------------------------------- after fork

_afterfork_registry: weakref.WeakValueDictionary[tuple[int, int, Callable[..., Any]], Any] = (
    weakref.WeakValueDictionary())
_afterfork_counter = itertools.count()


def register_after_fork(obj: Any, func: Callable[[Any], Any]) -> None:
    """Call ``func(obj)`` in every child started by fork or forkserver, while ``obj`` lives."""
    _afterfork_registry[(next(_afterfork_counter), id(obj), func)] = obj


def _run_after_forkers() -> None:
    """Run the after-fork hooks in registration order (called in a fresh child)."""
    for (_, _, func), obj in sorted(_afterfork_registry.items(), key=lambda kv: kv[0][0]):
        try:
            func(obj)
        except Exception as exc:
            info("after-fork hook %r raised %r", func, exc)


class ForkAwareThreadLock:
    """A ``threading.Lock`` that is replaced by a fresh one in a forked child."""

    def __init__(self) -> None:
        self._reset()
        register_after_fork(self, ForkAwareThreadLock._reset)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self.acquire = self._lock.acquire
        self.release = self._lock.release

    def __enter__(self) -> bool:
        return self._lock.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._lock.__exit__(*exc)


class ForkAwareLocal(threading.local):
    """Thread-local storage whose contents are dropped in a forked child."""

    def __init__(self) -> None:
        register_after_fork(self, lambda obj: obj.__dict__.clear())

    def __reduce__(self) -> Any:
        return type(self), ()


# --------------------------------------------------------------------------- exit sequence

_exiting = False
_exit_hooks: list[Callable[[], None]] = []
_service_stoppers: list[Callable[[], None]] = []


def is_exiting() -> bool:
    """True once this process has started its exit sequence."""
    return _exiting


def _register_exit_hook(hook: Callable[[], None]) -> None:
    """Let a higher layer run ``hook`` during the exit sequence, after priority >= 0 finalizers."""
    if hook not in _exit_hooks:
        _exit_hooks.append(hook)


def _register_service_stopper(stopper: Callable[[], None]) -> None:
    """Register how to stop a background service (forkserver, tracker) for test cleanup."""
    if stopper not in _service_stoppers:
        _service_stoppers.append(stopper)


def _exit_function() -> None:
    """Process exit: urgent finalizers, then hooks (join or stop children), then the rest."""
    global _exiting
    if _exiting:
        return
    _exiting = True
    info("process shutting down")
    _run_finalizers(0)
    for hook in list(_exit_hooks):
        try:
            hook()
        except Exception:
            import traceback

            traceback.print_exc()
    _run_finalizers()


atexit.register(_exit_function)


def _reset_after_fork_in_child() -> None:
    """Forget the parent's exit state and finalizers in a new child."""
    global _exiting
    _exiting = False
    _finalizer_registry.clear()


# --------------------------------------------------------------------------- temp dir

_temp_dir: dict[str, str | None] = {"path": None}


def get_temp_dir() -> str:
    """Return a private directory shared by this process tree, removed when its creator exits."""
    path = _temp_dir["path"]
    if path is None:
        import shutil
        import tempfile

        base = None
        if sys.platform == "darwin":
            base = "/tmp"  # AF_UNIX paths must stay short; the default is long on macOS
        path = tempfile.mkdtemp(prefix="manyproc-", dir=base)
        info("created temp directory %s", path)
        Finalize(None, _remove_temp_dir, args=(shutil.rmtree, path), exitpriority=-100)
        _temp_dir["path"] = path
    return path


def _remove_temp_dir(rmtree: Callable[..., Any], path: str) -> None:
    rmtree(path, ignore_errors=True)
    if _temp_dir["path"] == path:
        _temp_dir["path"] = None


def _set_temp_dir(path: str | None) -> None:
    """Adopt the parent's temp dir in a spawned child (it is removed by the parent)."""
    _temp_dir["path"] = path


# --------------------------------------------------------------------------- waiting


def wait_for_predicate(wait: Callable[[float | None], Any], predicate: Callable[[], Any],
                       timeout: float | None) -> Any:
    """``Condition.wait_for`` on top of a ``wait(timeout)``: return the predicate's last value.

    Used by the cross-process condition and by the manager's condition proxy.
    """
    import time

    deadline = None if timeout is None else time.monotonic() + timeout
    result = predicate()
    while not result:
        remaining = None
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
        wait(remaining)
        result = predicate()
    return result


# --------------------------------------------------------------------------- sockets

# Linux names AF_UNIX sockets in an abstract namespace (a leading NUL byte): no file to
# clean up, and nothing left behind by a process that dies.
abstract_sockets_supported = sys.platform.startswith("linux")


def is_abstract_socket_namespace(address: str | bytes | None) -> bool:
    """True if ``address`` names an abstract AF_UNIX socket (starts with a NUL)."""
    if not address:
        return False
    first = address[0]
    return first in (0, "\0")


# --------------------------------------------------------------------------- file descriptors


def close_all_fds_except(fds: Iterable[int]) -> None:
    """Close every file descriptor of this process except those in ``fds``."""
    keep = sorted(set(fds) | {-1})
    keep.append(os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 65536)
    for low, high in itertools.pairwise(keep):
        if high > low + 1:
            os.closerange(low + 1, high)


def close_fds(*fds: int) -> None:
    """Close each of ``fds``, ignoring ones already closed."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _close_stdin() -> None:
    """Give a child an empty stdin, so two processes never read the same terminal."""
    inherited = sys.stdin
    if inherited is None:
        return
    with contextlib.suppress(OSError, ValueError):
        inherited.close()
    with contextlib.suppress(OSError, ValueError):
        sys.stdin = open(os.devnull, encoding="utf-8")  # noqa: SIM115 - lives as sys.stdin


def _flush_std_streams() -> None:
    """Flush stdout and stderr, ignoring streams that are closed or missing."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (AttributeError, ValueError, OSError):
            pass


# Modules whose state a spawned child must adopt register here by name; the child imports
# each one and hands it the state its parent had (see manyproc._spawn).
_spawn_state_modules: list[str] = []


def register_spawn_state(module_name: str) -> None:
    """Have spawned children adopt a module's state.

    The module must define ``_get_spawn_state() -> picklable`` (called in the parent
    while preparing a child) and ``_set_spawn_state(state)`` (called in the child
    before the process object is unpickled).
    """
    if module_name not in _spawn_state_modules:
        _spawn_state_modules.append(module_name)


def _cleanup_tests() -> None:
    """Stop background services and run finalizers (used by test suites between modules)."""
    for stopper in list(_service_stoppers):
        try:
            stopper()
        except Exception:
            import traceback

            traceback.print_exc()
    _run_finalizers()
