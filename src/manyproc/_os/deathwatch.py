"""Make a child end soon after its parent dies, whatever the way the parent died.

The parent holds the only write end of a pipe whose read end the child watches.
When the parent exits (normally, by SIGKILL, by a crash) the kernel closes the
write end and the read end reaches EOF.  On Linux and BSDs the kernel can turn
that EOF into SIGIO (``O_ASYNC`` + ``F_SETOWN``), which costs the child no
thread; elsewhere a daemon thread blocks on the pipe.  On notice the child gets
a short grace (it may be reporting that its parent is gone) and is then killed.
"""

from __future__ import annotations

import os
import signal
import threading
import time

try:
    import fcntl
except ImportError:  # not on this platform: the watcher thread does the job
    fcntl = None  # type: ignore[assignment]

from .waiting import is_readable

GRACE_SECONDS = 1.0

_watched_fd: int | None = None


def _die_after_grace() -> None:
    time.sleep(GRACE_SECONDS)
    os.kill(os.getpid(), signal.SIGKILL)


def _parent_gone() -> None:
    threading.Thread(target=_die_after_grace, name="manyproc-orphan-reaper",
                     daemon=True).start()


def _on_sigio(signum: int, frame: object) -> None:
    fd = _watched_fd
    if fd is None:
        return
    try:
        if not is_readable(fd):
            return
        if os.read(fd, 1):
            return  # data, not EOF: nobody writes this pipe, so ignore it
    except OSError:
        pass
    _parent_gone()


def _watch_with_thread(fd: int) -> None:
    def watch() -> None:
        try:
            while os.read(fd, 1):
                pass
        except OSError:
            pass
        _parent_gone()

    threading.Thread(target=watch, name="manyproc-parent-watch", daemon=True).start()


def watch_parent(alive_fd: int) -> None:
    """Arrange for this process to end shortly after the holder of the pipe's write end dies.

    Must be called from the main thread (it may install a signal handler).
    """
    global _watched_fd
    _watched_fd = alive_fd
    try:
        if fcntl is None:
            raise RuntimeError("no fcntl on this platform")
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("signal handlers need the main thread")
        if signal.getsignal(signal.SIGIO) not in (signal.SIG_DFL, None):
            raise RuntimeError("SIGIO is taken by the application")
        signal.signal(signal.SIGIO, _on_sigio)
        fcntl.fcntl(alive_fd, fcntl.F_SETOWN, os.getpid())
        flags = fcntl.fcntl(alive_fd, fcntl.F_GETFL)
        fcntl.fcntl(alive_fd, fcntl.F_SETFL, flags | os.O_ASYNC | os.O_NONBLOCK)
    except (ImportError, AttributeError, OSError, RuntimeError, ValueError):
        try:
            signal.signal(signal.SIGIO, signal.SIG_DFL)
        except (AttributeError, ValueError, OSError):
            pass
        _watch_with_thread(alive_fd)
        return
    # The parent may have died before the handler was in place.
    if is_readable(alive_fd):
        _on_sigio(signal.SIGIO, None)


def stop_watching() -> None:
    """Forget the watched pipe (used by a child that adopts a new parent, e.g. the fork server)."""
    global _watched_fd
    _watched_fd = None
    try:
        signal.signal(signal.SIGIO, signal.SIG_DFL)
    except (AttributeError, ValueError, OSError):
        pass
