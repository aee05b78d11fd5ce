"""Hand file descriptors to other processes after start-up.

While a child is being spawned, an fd it needs simply becomes part of its start-up
(``popen.duplicate_for_child``).  Afterwards, an fd pickled into a message (a
socket or Connection sent through a Queue or Pipe) needs a live hand-over::

    sender process                                    receiving process
    --------------                                    -----------------
    DupFd(fd) -> os.dup(fd), kept under a key         unpickles _SharedFd(address, key)
    _SharedFd(address, key) is pickled         --->   .detach(): Client(address, authkey)
    sharer thread: Listener.accept() (HMAC)    <---     sends key
      sends b"OK", then the fd (SCM_RIGHTS)    --->     receives the fd
      closes its duplicate

The sharer is a daemon thread serving an AF_UNIX Listener, started on first use;
only processes holding this process's authkey (its children) can connect.  Each
shared fd can be received once.  Importing this module installs it as
:func:`manyproc.reduction.DupFd`'s way of sharing.
"""

from __future__ import annotations

import os
import signal
import struct
import sys
import threading
from collections.abc import Callable
from typing import Any

from . import reduction, util

__all__ = ["stop", "DupFd"]

_request = struct.Struct("!qq")  # key (0 asks the thread to stop), pid of the receiver
_OK = b"OK"


def _authkey() -> bytes:
    from .process import current_process  # layer 4, read only when sharing

    return bytes(current_process().authkey)


class _SharedFd:
    """Pickled stand-in for an fd offered by another process; ``detach()`` fetches it."""

    def __init__(self, address: Any, key: int, owner_pid: int) -> None:
        self._address = address
        self._key = key
        self._owner_pid = owner_pid

    def __repr__(self) -> str:
        return f"<shared fd #{self._key} of process {self._owner_pid}>"

    def detach(self) -> int:
        """Receive the fd from its owner; this works once per shared fd."""
        from .connection import Client

        try:
            conn = Client(self._address, authkey=_authkey())
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise OSError(
                exc.errno,
                f"cannot receive a file descriptor from process {self._owner_pid}: it has "
                "exited (or stopped sharing) before this process unpickled the object; keep "
                "the sender alive until the receiver has the object") from None
        with conn:
            conn.send_bytes(_request.pack(self._key, os.getpid()))
            status = conn.recv_bytes(512)
            if status != _OK:
                raise OSError(
                    f"process {self._owner_pid} could not hand over {self!r}: "
                    f"{status.decode('utf-8', 'replace')}")
            return reduction.recv_handle(conn)


class _Sharer:
    """The registry of offered fds and the thread that hands them out."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._offered: dict[int, int] = {}
        self._next_key = 1
        self._listener: Any = None
        self._thread: threading.Thread | None = None
        util.register_after_fork(self, _Sharer._forget_after_fork)

    def share(self, fd: int) -> _SharedFd:
        """Offer a duplicate of ``fd``; return the picklable object that fetches it."""
        dup = os.dup(fd)
        with self._lock:
            try:
                if self._listener is None:
                    self._start()
            except BaseException:
                os.close(dup)
                raise
            key = self._next_key
            self._next_key += 1
            self._offered[key] = dup
            return _SharedFd(self._listener.address, key, os.getpid())

    def _start(self) -> None:
        from .connection import Listener

        util.debug("starting the fd sharer thread")
        self._listener = Listener(authkey=_authkey(), backlog=32)
        thread = threading.Thread(target=self._serve, args=(self._listener,),
                                  name="manyproc-fd-sharer", daemon=True)
        thread.start()
        self._thread = thread

    def _serve(self, listener: Any) -> None:
        if hasattr(signal, "pthread_sigmask"):
            # Signals belong to the main thread; this one only serves fds.
            signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        while True:
            try:
                with listener.accept() as conn:
                    key, pid = _request.unpack(conn.recv_bytes(_request.size))
                    if key == 0:
                        return
                    with self._lock:
                        fd = self._offered.pop(key, None)
                    if fd is None:
                        conn.send_bytes(b"no such shared fd: it was received already, or the "
                                        b"sharer was stopped")
                        continue
                    try:
                        conn.send_bytes(_OK)
                        reduction.send_handle(conn, fd, pid)
                    finally:
                        os.close(fd)
            except Exception:
                if self._listener is not listener or util.is_exiting():
                    return
                sys.excepthook(*sys.exc_info())

    def stop(self, timeout: float | None = None) -> None:
        """Stop the thread and close every fd still on offer."""
        from .connection import Client

        with self._lock:
            listener, thread = self._listener, self._thread
            self._listener = self._thread = None
            offered, self._offered = self._offered, {}
        for fd in offered.values():
            util.close_fds(fd)
        if listener is None:
            return
        # Outside the lock: the thread may need it to finish a hand-over first.
        try:
            with Client(listener.address, authkey=_authkey()) as conn:
                conn.send_bytes(_request.pack(0, os.getpid()))
        except OSError:
            pass
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                util.sub_warning("the fd sharer thread did not stop when asked")
        listener.close()

    def _forget_after_fork(self) -> None:
        # The child has copies of the offered fds and of the socket, but no thread.
        self._lock = threading.Lock()
        for fd in self._offered.values():
            util.close_fds(fd)
        self._offered = {}
        listener, self._listener, self._thread = self._listener, None, None
        if listener is not None:
            listener.close()  # the parent owns the socket file; only our fd is closed


_sharer = _Sharer()
stop: Callable[..., None] = _sharer.stop


def DupFd(fd: int) -> Any:  # noqa: N802 - the standard library's name
    """Offer a duplicate of ``fd`` to whichever process unpickles the result."""
    return _sharer.share(fd)


reduction._install_fd_sharer(_sharer.share)
util._register_service_stopper(stop)
