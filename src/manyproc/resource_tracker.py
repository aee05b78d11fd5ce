"""Remove named segments and semaphores when the process that owns them ends, however it ends.

A process that creates a named kernel object (a shared-memory segment, a semaphore
shared with spawned children) *owns* it.  It registers the name here; when it exits
normally it removes its names itself, and if it dies abruptly -- SIGKILL, a crash,
the OOM killer -- a small tracker process notices that the owner's connection
closed and removes them (see :mod:`manyproc._os.tracker` for the server's theory
of operation).

    owner process                 tracker process (one per family, started lazily)
    -------------                 ----------------------------------------------
    register(name) ---- REG --->  remembers: this connection owns name
    unlink(name); unregister ->   forgets it
    dies (any way) --- EOF ---->  removes what that connection still owned,
                                  unless another live connection owns it too

Every process has its own connection: a forked child closes the one it inherited
and opens its own when it first registers something, and spawned children learn
the tracker's address from their parent.  Processes that only *attach* to a named
object never register it, so their exit never removes it.  Nothing is reported as
"leaked": removing an owner's names when it ends is the designed behaviour.

The signatures of :func:`ensure_running`, :func:`register` and :func:`unregister`
are the standard library's.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterable
from typing import Any

from . import util
from ._os import shm
from ._os import tracker as _server

__all__ = ["ensure_running", "register", "unregister", "getfd"]

_CLEANUP_FUNCS = _server.CLEANUP_FUNCS
_MAX_NAME_BYTES = 255   # the kernel's NAME_MAX for segment and semaphore names

_REPLY_TIMEOUT = 10.0   # a tracker that does not answer HELLO/BYE within this is presumed dead
_START_TIMEOUT = 30.0   # starting the tracker's interpreter on a loaded machine
_STOP_TIMEOUT = 5.0
_EXIT_PRIORITY = -50    # after children are joined (priority >= 0), before the temp dir goes


class _State:
    """This process's view of the tracker (replaced wholesale in a forked child)."""

    def __init__(self, address: str | None = None) -> None:
        self.lock = threading.RLock()
        self.address = address          # where the family's tracker listens
        self.conn: socket.socket | None = None
        self.pending = b""              # bytes received beyond the last reply line
        self.owned: set[tuple[str, str]] = set()
        self.popen: subprocess.Popen[bytes] | None = None   # set where we started it
        self.tracker_pid: int | None = None
        self.finalizer: util.Finalize | None = None
        self.broken = False             # the tracker cannot be started: clean up at exit only


_state = _State()


# --------------------------------------------------------------------------- public API


def ensure_running() -> None:
    """Make sure this process is connected to a running tracker, starting one if needed."""
    with _state.lock:
        if _state.conn is not None and not _peer_alive(_state.conn):
            _reconnect()
        else:
            _connection()


def getfd() -> int:
    """The file descriptor of this process's connection to the tracker."""
    with _state.lock:
        return _connection().fileno()


def register(name: str, rtype: str) -> None:
    """Have ``name`` (of type ``rtype``) removed when this process ends, even abruptly.

    Raises:
        ValueError: ``rtype`` is not a known resource type, or ``name`` cannot be sent.
    """
    _check(name, rtype)
    with _state.lock:
        _state.owned.add((rtype, name))
        _deliver(f"REG {rtype} {name}")


def unregister(name: str, rtype: str) -> None:
    """Stop tracking ``name``: call it after removing the object yourself.

    Unregistering a name this process never registered does nothing (it never
    starts a tracker), so a process that only attached may call it safely.
    """
    _check(name, rtype)
    with _state.lock:
        _state.owned.discard((rtype, name))
        if _state.conn is not None:
            _deliver(f"UNREG {rtype} {name}")


def _check(name: object, rtype: object) -> None:
    if rtype not in _CLEANUP_FUNCS:
        raise ValueError(
            f"cannot track {name!r}: unknown resource type {rtype!r}; the tracker knows "
            f"{', '.join(repr(t) for t in _CLEANUP_FUNCS)}")
    if not isinstance(name, str) or not name or "\n" in name:
        raise ValueError(f"cannot track resource name {name!r}: it must be a non-empty str "
                         "without newlines")
    if len(name.encode("utf-8", "surrogateescape")) > _MAX_NAME_BYTES:
        raise ValueError(f"cannot track {rtype} name of {len(name)} characters: names are at "
                         f"most {_MAX_NAME_BYTES} bytes ({name[:40]!r}...)")


class ResourceTracker:
    """The module's functions as an object, where code written for the stdlib expects one."""

    ensure_running = staticmethod(ensure_running)
    register = staticmethod(register)
    unregister = staticmethod(unregister)
    getfd = staticmethod(getfd)

    @property
    def _pid(self) -> int | None:
        """The pid of the tracker this process talks to (None before it has connected)."""
        return _state.tracker_pid if _state.conn is not None else None

    def _check_alive(self) -> bool:
        """True if this process's tracker answers."""
        with _state.lock:
            if _state.conn is None:
                return False
            try:
                _send(_state.conn, "LIST")
            except OSError:
                return False
            return _read_reply(_state.conn, _REPLY_TIMEOUT) is not None

    def _stop(self) -> None:
        _stop()


_resource_tracker = ResourceTracker()


# --------------------------------------------------------------------------- manyproc-internal


def _unlink_after(name: str, rtype: str, pids: Iterable[int]) -> None:
    """Hand ``name`` over to the tracker: remove it once every process in ``pids`` has ended.

    Used when an owner lets go of an object that a child it started may still be
    opening by name.
    """
    _check(name, rtype)
    pid_list = ",".join(str(int(p)) for p in pids)
    with _state.lock:
        _state.owned.discard((rtype, name))
        if _state.conn is None:
            _remove_now(rtype, name)
            return
        _deliver(f"DEFER {rtype} {pid_list} {name}")


def _defer_new(name: str, rtype: str, pids: Iterable[int]) -> bool:
    """Before creating ``name``: have the tracker remove it once every process in ``pids`` ended.

    Unlike :func:`_unlink_after`, this connects to (or starts) the tracker first.
    Returns False, having sent nothing, when no tracker can be reached: the caller
    should then not create an object that nobody would remove.
    """
    _check(name, rtype)
    pid_list = ",".join(str(int(p)) for p in pids)
    with _state.lock:
        if _state.broken:
            return False
        try:
            _connection()
        except OSError as exc:
            util.info("no resource tracker for %s %s: %s", rtype, name, exc)
            return False
        _deliver(f"DEFER {rtype} {pid_list} {name}")
        return not _state.broken


def _cancel_deferred(names: Iterable[str], rtype: str, address: str | None = None) -> None:
    """Forget the deferred removals of ``names``: this process removed them.

    Any process may call it, also before the DEFER reached the tracker.
    ``address`` names the tracker that holds the deferrals (default: this
    process's own); another tracker gets the lines on a connection of their
    own.  One write for all names; never starts a tracker, and gives up silently
    if it is gone (its deferred removals went with it).
    """
    lines = "".join(f"UNDEFER {rtype} {name}\n" for name in names)
    if not lines:
        return
    data = lines.encode("utf-8", "surrogateescape")
    with _state.lock:
        if address is None or address == _state.address:
            if _state.broken or (_state.conn is None and _state.address is None):
                return
            try:
                _connection(start=False).sendall(data)
            except OSError:
                pass
            return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(_REPLY_TIMEOUT)
        try:
            sock.connect(address)
            sock.sendall(data)
        except OSError:
            pass


def _tracked() -> list[dict[str, Any]]:
    """What the family's tracker tracks right now: dicts with ``rtype``, ``name``, ``pid``.

    Returns ``[]`` without starting anything if this process never reached a tracker.
    """
    with _state.lock:
        if _state.conn is None and _state.address is None:
            return []
        try:
            conn = _connection(start=False)
        except OSError:
            return []
        _send(conn, "LIST")
        line = _read_reply(conn, _REPLY_TIMEOUT)
    if line is None or not line.startswith("LIST "):
        return []
    rows: list[dict[str, Any]] = json.loads(line[5:])
    return rows


def _named_objects(all_families: bool = False) -> list[str]:
    """Named segments and semaphores of manyproc that exist now, as ``/dev/shm`` entries.

    By default only those named by this process family (this test session); see
    :func:`manyproc._os.shm.list_named_objects`.  Always ``[]`` where they cannot be listed.
    """
    return shm.list_named_objects(None if all_families else "")


def _stop() -> None:
    """Say goodbye (removing this process's names) and, if we started it, wait for the tracker.

    Registered as a service stopper so test suites can end with no tracker running.
    """
    _say_goodbye()
    with _state.lock:
        popen = _state.popen
        if popen is not None:
            try:
                popen.wait(timeout=_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                # Other processes of the family still hold connections and need the
                # tracker: leave it running (and keep its Popen, to reap it later).
                return
            _state.popen = None


# --------------------------------------------------------------------------- connection


def _connection(start: bool = True) -> socket.socket:
    """This process's connection, opening it (and starting a tracker) on first use."""
    if _state.conn is not None:
        return _state.conn
    conn = None
    if _state.address is not None:
        conn = _try_connect(_state.address)
    if conn is None:
        if not start:
            raise OSError("no resource tracker is running for this process family")
        conn = _start_tracker()
    _state.conn = conn
    _ensure_exit_cleanup()
    return conn


def _peer_alive(conn: socket.socket) -> bool:
    """False if the tracker closed our connection (it only writes when asked)."""
    from ._os.waiting import wait_readable

    if not wait_readable([conn.fileno()], 0):
        return True
    try:
        return conn.recv(1, socket.MSG_PEEK) != b""
    except OSError:
        return False


def _hello(conn: socket.socket, timeout: float = _REPLY_TIMEOUT) -> bool:
    _state.pending = b""
    try:
        _send(conn, f"HELLO {os.getpid()}")
    except OSError:
        return False
    line = _read_reply(conn, timeout)
    if line is None or not line.startswith("OK "):
        return False
    try:
        _state.tracker_pid = int(line[3:])
    except ValueError:
        pass
    return True


def _try_connect(address: str) -> socket.socket | None:
    """Connect to a running tracker; None if it is gone (then we start our own)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(address)
    except OSError:
        sock.close()
        return None
    if not _hello(sock):
        sock.close()
        return None
    util.debug("connected to resource tracker at %s", address)
    return sock


def _socket_dir() -> str:
    path = util.get_temp_dir()
    if os.path.isdir(path):
        return path
    # The family's temp dir went with its creator; use one of our own.
    path = tempfile.mkdtemp(prefix="manyproc-rt-", dir="/tmp" if sys.platform == "darwin" else None)
    util.Finalize(None, _remove_dir, (path,), exitpriority=-100)
    return path


def _remove_dir(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _start_tracker() -> socket.socket:
    """Start a tracker process; return our connection to it (the first one it serves)."""
    address = os.path.join(_socket_dir(), f"rt-{os.getpid()}-{secrets.token_hex(3)}.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(address)
        listener.listen(64)
        fds = (listener.fileno(), theirs.fileno())
        # -I -S: no site-packages, no environment; the server needs only the stdlib.
        # The trailing comment makes the command line say what this process is.
        code = ("import sys, runpy; del sys.argv[0]; "
                "runpy.run_path(sys.argv[0], run_name='__main__')  # manyproc resource_tracker")
        args = [sys.executable, "-I", "-S", "-c", code, _server.__file__, *map(str, fds)]
        # A session of its own: killing the family's process group (a job control
        # kill, a test runner's timeout) must not take the tracker down with it, or
        # nobody would be left to remove the family's names.
        popen = subprocess.Popen(args, pass_fds=fds, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, close_fds=True,
                                 start_new_session=True)
    except BaseException:
        ours.close()
        raise
    finally:
        listener.close()
        theirs.close()
    if not _hello(ours, _START_TIMEOUT):
        ours.close()
        popen.kill()
        popen.wait()
        raise OSError(f"the resource tracker (pid {popen.pid}, {sys.executable}) did not start; "
                      "run with manyproc.log_to_stderr('DEBUG') for details")
    _state.address = address
    _state.popen = popen
    util.info("started resource tracker pid %d at %s", popen.pid, address)
    return ours


def _send(conn: socket.socket, line: str) -> None:
    conn.sendall(line.encode("utf-8", "surrogateescape") + b"\n")


def _deliver(line: str) -> None:
    """Send ``line`` on this process's connection, reconnecting once if the tracker died.

    After reconnecting (to a new tracker, usually) every name this process still owns
    is registered again, so a tracker's death loses nothing that is still alive.
    """
    _ensure_exit_cleanup()
    if _state.broken:
        return  # no tracker: the names in _state.owned are removed at exit instead
    try:
        try:
            _send(_connection(), line)
            return
        except OSError:
            conn = _reconnect()
        if not line.startswith("REG "):  # a REG line is among the names re-registered
            _send(conn, line)
    except OSError as exc:
        _state.broken = True
        warnings.warn(
            f"manyproc could not reach or start its resource tracker ({exc}); named shared "
            "memory and semaphores of this process will be removed when it exits normally, "
            "but not if it is killed", RuntimeWarning, stacklevel=4)


def _reconnect() -> socket.socket:
    """Replace a dead connection (the tracker died) and register our names again."""
    util.info("lost the resource tracker; starting or finding another")
    if _state.conn is not None:
        _state.conn.close()
        _state.conn = None
    conn = _connection()
    for rtype, name in sorted(_state.owned):
        _send(conn, f"REG {rtype} {name}")
    return conn


def _ensure_exit_cleanup() -> None:
    if _state.finalizer is None:
        _state.finalizer = util.Finalize(None, _say_goodbye, exitpriority=_EXIT_PRIORITY)


def _read_reply(conn: socket.socket, timeout: float) -> str | None:
    """Read one reply line; None on EOF, error or timeout."""
    from ._os.waiting import wait_readable

    buffer = _state.pending
    while b"\n" not in buffer:
        if not wait_readable([conn.fileno()], timeout):
            return None
        try:
            chunk = conn.recv(65536)
        except OSError:
            return None
        if not chunk:
            return None
        buffer += chunk
    line, _, _state.pending = buffer.partition(b"\n")
    return line.decode("utf-8", "surrogateescape")


def _remove_now(rtype: str, name: str) -> None:
    try:
        _CLEANUP_FUNCS[rtype](name)
    except FileNotFoundError:
        pass
    except OSError as exc:
        util.sub_warning("could not remove %s %r: %s", rtype, name, exc)


def _say_goodbye() -> None:
    """At exit: have the tracker remove what we own, or remove it ourselves if it is gone."""
    with _state.lock:
        conn, _state.conn = _state.conn, None
        owned, _state.owned = _state.owned, set()
        if _state.finalizer is not None:
            _state.finalizer.cancel()
            _state.finalizer = None
        done = False
        if conn is not None:
            try:
                _send(conn, "BYE")
                done = _read_reply(conn, _REPLY_TIMEOUT) == "BYE"
            except OSError:
                pass
            conn.close()
        if not done:
            for rtype, name in sorted(owned):
                _remove_now(rtype, name)


# --------------------------------------------------------------------------- inheritance


def _after_fork_in_child() -> None:
    """A forked child keeps the address but drops the parent's connection and ownership."""
    global _state
    old = _state
    if old.conn is not None:
        try:
            old.conn.close()  # our copy only: the parent's connection stays open
        except OSError:
            pass
    if old.popen is not None:
        _not_ours.append(old.popen)  # the parent's child: never waited for (or warned about) here
    _state = _State(old.address)


_not_ours: list[Any] = []


os.register_at_fork(after_in_child=_after_fork_in_child)


def _get_spawn_state() -> dict[str, Any]:
    return {"address": _state.address, "family": shm.family_token()}


def _set_spawn_state(state: dict[str, Any]) -> None:
    _state.address = state.get("address")
    shm.set_family_token(state.get("family"))


util.register_spawn_state(__name__)
util._register_service_stopper(_stop)
