"""What every start method's Popen shares: exit status, signals, waiting, closing."""

from __future__ import annotations

import os
import signal

from . import util
from ._os.fds import close_quietly, unmark_private
from ._os.waiting import wait_readable

TYPE_CHECKING = False  # typing costs import time in every child; only checkers need it
if TYPE_CHECKING:
    from typing import Any


class PopenBase:
    """A started child as the parent sees it.

    Subclasses start the child in ``__init__`` and set ``pid``, ``sentinel`` (an fd
    readable once the child ends) and ``_parent_fds`` (fds to close with this object).
    """

    method: str = ""
    pid: int
    sentinel: int

    def __init__(self) -> None:
        self.returncode: int | None = None
        self._parent_fds: list[int] = []
        self.finalizer: util.Finalize | None = None

    def _own_fds(self, *fds: int) -> None:
        """Close ``fds`` when this Popen is closed or collected."""
        self._parent_fds.extend(fds)
        if self.finalizer is None:
            self.finalizer = util.Finalize(self, _release_fds, (self._parent_fds,))

    def duplicate_for_child(self, fd: int) -> int:
        raise NotImplementedError

    def _reap(self, block: bool) -> int | None:
        """Collect the exit status if the child has ended (blocking if asked)."""
        try:
            pid, status = os.waitpid(self.pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            # Someone else reaped it (a SIGCHLD handler set to SIG_IGN, say): the child is
            # gone but its status is lost.
            return 255
        if pid == 0:
            return None
        return os.waitstatus_to_exitcode(status)

    def poll(self, flag: int = os.WNOHANG) -> int | None:
        """Return the exit code if the child has ended, else None (``flag=0`` blocks)."""
        if self.returncode is None:
            self.returncode = self._reap(block=(flag == 0))
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait up to ``timeout`` seconds (None: for ever) for the child to end."""
        if self.returncode is None:
            if timeout is not None:
                if not wait_readable([self.sentinel], timeout):
                    return None
                return self.poll()
            return self.poll(0)
        return self.returncode

    def _send_signal(self, sig: int) -> None:
        if self.returncode is not None:
            return
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass
        except OSError:
            if self.wait(timeout=0.1) is None:
                raise

    def terminate(self) -> None:
        self._send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self._send_signal(signal.SIGKILL)

    def interrupt(self) -> None:
        self._send_signal(signal.SIGINT)

    def close(self) -> None:
        if self.finalizer is not None:
            self.finalizer()


def _release_fds(fds: list[int]) -> None:
    unmark_private(*fds)
    close_quietly(*fds)
    fds.clear()


def child_exit_hygiene() -> None:
    """Flush what the child wrote before it leaves with ``os._exit``."""
    util._flush_std_streams()


def describe(popen: Any) -> str:
    return f"{type(popen).__module__}.Popen(pid={getattr(popen, 'pid', None)})"
