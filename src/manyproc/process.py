"""Process objects: the ``Process`` surface of the standard library, start-method agnostic.

A :class:`BaseProcess` knows its identity (``Process-3:1``), its target and its
child-side bootstrap.  How the child is started is the business of a *Popen*
object, chosen by the process class of a context (see :mod:`manyproc.context`):

    parent                                      child
    ------                                      -----
    Process.start() --> Popen(process) ------>  Process._bootstrap()
       .sentinel    <-- readable when the child ends
       .join()/.exitcode  <-- Popen.wait()/poll()
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping

from . import util
from ._os.waiting import wait_readable

TYPE_CHECKING = False  # typing costs import time in every child; only checkers need it
if TYPE_CHECKING:
    from typing import Any

__all__ = ["BaseProcess", "current_process", "active_children", "parent_process"]


def current_process() -> BaseProcess:
    """Return the Process object of the running process."""
    return _current_process


def active_children() -> list[BaseProcess]:
    """Return the children of this process that are still running, reaping ended ones."""
    _cleanup()
    return list(_children)


def parent_process() -> BaseProcess | None:
    """Return a stand-in for the parent process, or ``None`` in the main process."""
    return _parent_process


def _cleanup() -> None:
    """Forget children that have ended (polling reaps them)."""
    for child in list(_children):
        popen = child._popen
        if popen is None or popen.poll() is not None:
            _children.discard(child)


def _describe_exitcode(code: int) -> str:
    if code < 0:
        try:
            return f"-{signal.Signals(-code).name}"
        except ValueError:
            pass
    return str(code)


class BaseProcess:
    """One activity run in a separate process; subclass it or pass a ``target``.

    Start methods are supplied by subclasses through ``_Popen``.
    """

    _start_method: str | None = None

    @staticmethod
    def _Popen(process_obj: BaseProcess) -> Any:  # noqa: N802 - part of the contract
        raise NotImplementedError("use a Process class from a context")

    def __init__(self, group: None = None, target: Callable[..., Any] | None = None,
                 name: str | None = None, args: Iterable[Any] = (),
                 kwargs: Mapping[str, Any] | None = None, *, daemon: bool | None = None) -> None:
        assert group is None, "group argument must be None for now"
        if target is not None and not callable(target):
            raise TypeError(
                f"Process target must be callable, got {target!r} "
                f"({type(target).__name__}); pass the function itself and its arguments "
                "separately: Process(target=f, args=(x,)), not Process(target=f(x))")
        count = next(_process_counter)
        self._identity: tuple[int, ...] = _current_process._identity + (count,)
        self._config: dict[str, Any] = _current_process._config.copy()
        self._parent_pid = os.getpid()
        self._parent_name = _current_process.name
        self._popen: Any = None
        self._closed = False
        self._target = target
        self._args = tuple(args)
        self._kwargs = dict(kwargs or {})
        self._name = name or (
            f"{type(self).__name__}-{':'.join(str(i) for i in self._identity)}")
        if daemon is not None:
            self.daemon = daemon
        _dangling.add(self)

    def _check_closed(self) -> None:
        if self._closed:
            raise ValueError("process object is closed")

    def run(self) -> None:
        """The child's work: call ``target(*args, **kwargs)``. Override it in a subclass."""
        if self._target:
            self._target(*self._args, **self._kwargs)

    def start(self) -> None:
        """Start the child process."""
        self._check_closed()
        assert self._popen is None, "cannot start a process twice"
        assert self._parent_pid == os.getpid(), \
            "can only start a process object created by current process"
        assert not _current_process._config.get("daemon"), \
            "daemonic processes are not allowed to have children"
        _cleanup()
        self._popen = self._Popen(self)
        self._sentinel = self._popen.sentinel
        # The child has its own copy now; dropping ours breaks cycles through the target.
        del self._target, self._args, self._kwargs
        _children.add(self)

    def terminate(self) -> None:
        """Ask the child to stop with SIGTERM."""
        self._check_closed()
        if self._popen is not None:
            self._popen.terminate()

    def kill(self) -> None:
        """Stop the child at once with SIGKILL."""
        self._check_closed()
        if self._popen is not None:
            self._popen.kill()

    def interrupt(self) -> None:
        """Send the child SIGINT, as Ctrl-C would."""
        self._check_closed()
        if self._popen is not None:
            self._popen.interrupt()

    def join(self, timeout: float | None = None) -> None:
        """Wait until the child ends, or at most ``timeout`` seconds."""
        self._check_closed()
        assert self._parent_pid == os.getpid(), "can only join a child process"
        assert self._popen is not None, "can only join a started process"
        if self._popen.wait(timeout) is not None:
            _children.discard(self)

    def is_alive(self) -> bool:
        """True from ``start()`` until the child ends."""
        self._check_closed()
        if self is _current_process:
            return True
        assert self._parent_pid == os.getpid(), "can only test a child process"
        if self._popen is None:
            return False
        if self._popen.poll() is None:
            return True
        _children.discard(self)
        return False

    def close(self) -> None:
        """Release the resources of an ended process; most methods raise ValueError afterwards."""
        if self._popen is not None:
            if self._popen.poll() is None:
                raise ValueError(
                    "Cannot close a process while it is still running. "
                    "You should first call join() or terminate().")
            self._popen.close()
            self._popen = None
            del self._sentinel
            _children.discard(self)
        self._closed = True

    @property
    def name(self) -> str:
        return self._name

    @name.setter
    def name(self, name: str) -> None:
        assert isinstance(name, str), "name must be a string"
        self._name = name

    @property
    def daemon(self) -> bool:
        """Whether the child is stopped (rather than waited for) when this process exits."""
        return bool(self._config.get("daemon", False))

    @daemon.setter
    def daemon(self, daemonic: bool) -> None:
        assert self._popen is None, "process has already started"
        self._config["daemon"] = daemonic

    @property
    def authkey(self) -> bytes:
        return self._config["authkey"]

    @authkey.setter
    def authkey(self, authkey: bytes) -> None:
        self._config["authkey"] = AuthenticationString(authkey)

    @property
    def exitcode(self) -> int | None:
        """The child's exit code, negative ``-N`` if signal N killed it; None while running."""
        self._check_closed()
        if self._popen is None:
            return None
        return self._popen.poll()

    @property
    def ident(self) -> int | None:
        """The process id; None before ``start()``."""
        self._check_closed()
        if self is _current_process:
            return os.getpid()
        return self._popen and self._popen.pid

    pid = ident

    @property
    def sentinel(self) -> int:
        """A file descriptor that becomes readable when the child ends."""
        self._check_closed()
        try:
            return self._sentinel
        except AttributeError:
            raise ValueError("process not started") from None

    def __repr__(self) -> str:
        exitcode = None
        if self is _current_process:
            status = "started"
        elif self._closed:
            status = "closed"
        elif self._parent_pid != os.getpid():
            status = "unknown"
        elif self._popen is None:
            status = "initial"
        else:
            exitcode = self._popen.poll()
            status = "started" if exitcode is None else "stopped"
        parts = [type(self).__name__, f"name={self._name!r}"]
        if self._popen is not None:
            parts.append(f"pid={self._popen.pid}")
        parts.append(f"parent={self._parent_pid}")
        parts.append(status)
        if exitcode is not None:
            parts.append(f"exitcode={_describe_exitcode(exitcode)}")
        if self.daemon:
            parts.append("daemon")
        return "<" + " ".join(parts) + ">"

    # ----------------------------------------------------------------- child side

    @staticmethod
    def _after_fork() -> None:
        util._reset_after_fork_in_child()
        util._run_after_forkers()

    def _bootstrap(self, parent_sentinel: int | None = None) -> int:
        """Run in the child: become the current process, run, and return the exit code."""
        global _current_process, _parent_process, _process_counter, _children
        from . import context

        exitcode = 1
        try:
            if self._start_method is not None:
                context._force_start_method(self._start_method)
            _process_counter = itertools.count(1)
            _children = set()
            util._close_stdin()
            previous = _current_process
            try:
                _current_process = self
                _parent_process = _ParentProcess(self._parent_name, self._parent_pid,
                                                 parent_sentinel)
                set_native_id = getattr(threading.main_thread(), "_set_native_id", None)
                if set_native_id is not None:
                    set_native_id()
                self._after_fork()
            finally:
                del previous
            util.info("child process calling self.run()")
            try:
                self.run()
                exitcode = 0
            finally:
                util._exit_function()
        except SystemExit as exc:
            exitcode = _exitcode_of(exc.code)
        except BaseException:
            exitcode = 1
            import traceback

            sys.stderr.write(f"Process {self.name}:\n")
            traceback.print_exc()
        finally:
            try:
                threading._shutdown()  # type: ignore[attr-defined]
            except BaseException:
                pass
            util.info("process exiting with exitcode %d", exitcode)
            util._flush_std_streams()
        return exitcode


def _exitcode_of(code: object) -> int:
    """Map ``SystemExit.code`` to an exit status the way the interpreter does."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF  # the status the OS reports for exit(code)
    sys.stderr.write(str(code) + "\n")
    return 1


class AuthenticationString(bytes):
    """The authkey: bytes that refuse to be pickled except while starting a child."""

    def __reduce__(self) -> Any:
        from .reduction import get_spawning_popen

        if get_spawning_popen() is None:
            raise TypeError(
                "Pickling an AuthenticationString object is disallowed for security reasons; "
                "an authkey only travels to a child while it starts")
        return AuthenticationString, (bytes(self),)


class _ParentProcess(BaseProcess):
    """What a child knows of its parent: name, pid and a sentinel readable when it ends."""

    def __init__(self, name: str, pid: int, sentinel: int | None) -> None:
        self._identity = ()
        self._name = name
        self._pid = pid
        self._parent_pid = None  # type: ignore[assignment]
        self._popen = None
        self._closed = False
        self._sentinel = sentinel
        self._config = {}

    def is_alive(self) -> bool:
        if self._sentinel is None:
            try:
                os.kill(self._pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
            return True
        return not wait_readable([self._sentinel], 0)

    @property
    def ident(self) -> int:
        return self._pid

    pid = ident

    def join(self, timeout: float | None = None) -> None:
        """Wait until the parent ends (or the timeout passes)."""
        if self._sentinel is not None:
            wait_readable([self._sentinel], timeout)


class _MainProcess(BaseProcess):
    """The process the interpreter started in."""

    def __init__(self) -> None:
        self._identity = ()
        self._name = "MainProcess"
        self._parent_pid = None  # type: ignore[assignment]
        self._popen = None
        self._closed = False
        self._config = {
            "authkey": AuthenticationString(os.urandom(32)),
            "semprefix": "/mp",
        }

    def close(self) -> None:
        pass


_parent_process: BaseProcess | None = None
_current_process: BaseProcess = _MainProcess()
_process_counter = itertools.count(1)
_children: set[BaseProcess] = set()
_dangling: weakref.WeakSet[BaseProcess] = weakref.WeakSet()


def _stop_children_at_exit() -> None:
    """Exit hook: stop daemonic children, then wait for the others."""
    for child in active_children():
        if child.daemon:
            util.info("calling terminate() for daemon %s", child.name)
            child._popen.terminate()
    for child in active_children():
        util.info("calling join() for process %s", child.name)
        child.join()


util._register_exit_hook(_stop_children_at_exit)
