"""The fork server: a clean process, started once with spawn, that forks children on request.

Forking a small, single-threaded server is as quick as ``fork`` and as safe as
``spawn``: the children never inherit the parent's threads or locks.  Modules
named with :func:`set_forkserver_preload` are imported once, in the server, so
children start with them loaded.

    client (any process of the family)         server                       child
    ----------------------------------         ------                       -----
    connect to the AF_UNIX address  ------>    accept, send a nonce
    HMAC(key, nonce)                ------>    check, or drop the client
    fds [alive_r, data_r, *passed]  ------>    fork() ----------------->  read [prep][process]
    <------------------------------------      pid                         from data_r, run it
    write [prep][process] to data_w ........................................^
    <------------------------------------      exit status when it ends

Only a client holding the key (the starting process and its descendants) can ask
for a child; the socket lives in a private (0700) directory as a second fence.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import os
import selectors
import signal
import socket
import struct
import threading
from collections.abc import Sequence

from . import reduction, util
from ._os.fds import close_quietly, mark_private

__all__ = ["ensure_running", "start_child", "set_forkserver_preload", "stop"]

_NONCE_SIZE = 32
_MAX_FDS = 256
_AUTH_TIMEOUT = 5.0
_PID = struct.Struct("!q")
_STATUS = struct.Struct("!i")


def _digest(key: bytes, nonce: bytes) -> bytes:
    return hmac.new(key, b"manyproc-forkserver:" + nonce, hashlib.sha256).digest()


class ForkServer:
    """Client-side handle on this process family's fork server."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._address: str | None = None
        self._key: bytes | None = None
        self._pid: int | None = None          # set only in the process that started it
        self._alive_w: int | None = None
        self._preload: list[str] = []

    def set_forkserver_preload(self, module_names: Sequence[str]) -> None:
        """Modules to import in the server before it forks any child.

        Raises:
            TypeError: ``module_names`` is not a list of module-name strings.
        """
        if isinstance(module_names, str) or not all(
                isinstance(name, str) for name in module_names):
            raise TypeError(
                "module_names must be a list of strings, e.g. ['numpy', '__main__'], "
                f"not {module_names!r}")
        self._preload = list(module_names)

    @property
    def _forkserver_pid(self) -> int | None:
        """The server's pid in the process that started it (the name tests expect)."""
        return self._pid

    def _server_alive(self) -> bool:
        if self._pid is None:
            return self._address is not None
        try:
            pid, _ = os.waitpid(self._pid, os.WNOHANG)
        except ChildProcessError:
            return False
        return pid == 0

    def ensure_running(self) -> None:
        """Start the server unless this process (or its family) already has one."""
        with self._lock:
            if self._server_alive():
                return
            self._stop_locked()
            self._start_locked()

    def _start_locked(self) -> None:
        from ._popen_spawn import _spawn_with_fds
        from ._spawn import child_command_line, get_executable, pack, preparation_data

        address = os.path.join(util.get_temp_dir(), f"fs-{os.getpid()}-{os.urandom(4).hex()}")
        key = os.urandom(32)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        alive_r, alive_w = os.pipe()
        data_r, data_w = os.pipe()
        try:
            listener.bind(address)
            os.chmod(address, 0o600)
            listener.listen(64)
            prep = preparation_data("ForkServer")
            prep["preload"] = self._preload
            if "__main__" not in self._preload:
                prep.pop("main_path", None)
                prep.pop("main_module_name", None)
            prep["key"] = key
            prep["address"] = address
            argv = child_command_line("forkserver._server_main", listener.fileno(), alive_r,
                                      data_r)
            pid = _spawn_with_fds(get_executable(), argv,
                                  [listener.fileno(), alive_r, data_r])
            os.write(data_w, pack(reduction.dumps(prep)))
        finally:
            listener.close()
            close_quietly(alive_r, data_r, data_w)
        mark_private(alive_w)
        self._address, self._key, self._pid, self._alive_w = address, key, pid, alive_w

    def start_child(self, fds: list[int]) -> tuple[int, int]:
        """Ask the server to fork a child that receives ``fds``; return ``(status_fd, pid)``.

        ``status_fd`` becomes readable when the child's exit status arrives.
        """
        self.ensure_running()
        assert self._address is not None and self._key is not None
        if len(fds) > _MAX_FDS:
            raise ValueError(f"too many file descriptors to pass to a child ({len(fds)})")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                sock.connect(self._address)
            except (FileNotFoundError, ConnectionRefusedError):
                with self._lock:  # the server died: start a fresh one and retry once
                    self._stop_locked()
                    self._start_locked()
                sock.connect(self._address)
            nonce = _recv_exactly(sock, _NONCE_SIZE)
            sock.sendall(_digest(self._key, nonce))
            socket.send_fds(sock, [b"F"], fds)
            (pid,) = _PID.unpack(_recv_exactly(sock, _PID.size))
        except BaseException:
            sock.close()
            raise
        return sock.detach(), pid

    def _stop_locked(self) -> None:
        if self._alive_w is not None:
            close_quietly(self._alive_w)  # the server exits when it sees EOF
            self._alive_w = None
        if self._pid is not None:
            try:
                os.waitpid(self._pid, 0)
            except ChildProcessError:
                pass
        if self._address is not None and self._pid is not None:
            try:
                os.unlink(self._address)
            except OSError:
                pass
        self._address = self._key = None
        self._pid = None

    def stop(self) -> None:
        """Stop the server this process started (children already forked live on)."""
        with self._lock:
            self._stop_locked()


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError(
                "the fork server closed the connection (it refused the authentication or "
                "exited); check that the process family's fork server is running")
        data += chunk
    return data


_forkserver = ForkServer()
ensure_running = _forkserver.ensure_running
start_child = _forkserver.start_child
set_forkserver_preload = _forkserver.set_forkserver_preload
stop = _forkserver.stop
util._register_service_stopper(stop)


# --------------------------------------------------------------------------- server side


def _server_main(listener_fd: int, alive_fd: int, data_fd: int) -> None:
    """Entry point of the server process (called by its ``-c`` command line)."""
    from ._spawn import prepare, read_packed

    util.close_all_fds_except((0, 1, 2, listener_fd, alive_fd, data_fd))
    prep = reduction.loads(read_packed(data_fd))
    os.close(data_fd)
    key = prep.pop("key")
    address = prep.pop("address")
    preload = prep.pop("preload", [])
    prepare(prep)
    for name in preload:
        if name == "__main__":
            continue  # prepare() imported it as __mp_main__
        try:
            __import__(name)
        except ImportError:
            util.info("fork server could not preload %r", name)
    util._close_stdin()
    _forkserver._address, _forkserver._key = address, key
    listener = socket.socket(fileno=listener_fd)
    _Server(listener, alive_fd, key).serve()


class _Server:
    """The server's event loop: authenticate clients, fork children, report exits."""

    def __init__(self, listener: socket.socket, alive_fd: int, key: bytes) -> None:
        self.listener = listener
        self.alive_fd = alive_fd
        self.key = key
        self.children: dict[int, socket.socket] = {}  # pid -> the client's socket
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)

    def serve(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the user's processes
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ, "accept")
        sel.register(self.alive_fd, selectors.EVENT_READ, "alive")
        sel.register(self.wake_r, selectors.EVENT_READ, "wake")
        while True:
            for key, _ in sel.select():
                if key.data == "alive":
                    os._exit(0)  # the starting process is gone; children live their lives
                elif key.data == "wake":
                    try:
                        os.read(self.wake_r, 4096)
                    except BlockingIOError:
                        pass
                    self._reap()
                else:
                    self._accept()

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            client = self.children.pop(pid, None)
            if client is not None:
                try:
                    client.sendall(_STATUS.pack(os.waitstatus_to_exitcode(status)))
                except OSError:
                    pass
                client.close()

    def _accept(self) -> None:
        try:
            client, _ = self.listener.accept()
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EINTR, errno.ECONNABORTED):
                return
            raise
        try:
            client.settimeout(_AUTH_TIMEOUT)
            nonce = os.urandom(_NONCE_SIZE)
            client.sendall(nonce)
            answer = _recv_exactly(client, 32)
            if not hmac.compare_digest(answer, _digest(self.key, nonce)):
                client.close()  # not one of ours: nothing it sent is looked at
                return
            _msg, fds, _flags, _addr = socket.recv_fds(client, 1, _MAX_FDS)
        except (OSError, ConnectionError):
            client.close()
            return
        if len(fds) < 2:
            close_quietly(*fds)
            client.close()
            return
        self._fork_child(client, fds)

    def _fork_child(self, client: socket.socket, fds: list[int]) -> None:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                self._become_child(client)
                code = _child_main(fds)
            finally:
                util._flush_std_streams()
                os._exit(code)
        close_quietly(*fds)
        try:
            client.settimeout(None)
            client.sendall(_PID.pack(pid))
        except OSError:
            client.close()
            return
        self.children[pid] = client

    def _become_child(self, client: socket.socket) -> None:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        self.listener.close()
        client.close()
        for other in self.children.values():
            other.close()
        close_quietly(self.alive_fd, self.wake_r, self.wake_w)


def _child_main(fds: list[int]) -> int:
    """In a child forked by the server: read the process object and run it."""
    import atexit

    from ._os import deathwatch
    from ._spawn import prepare, read_packed

    alive_r, data_r, *passed = fds
    atexit._clear()
    reduction._inherited_fds = passed
    prep = reduction.loads(read_packed(data_r))
    process_blob = read_packed(data_r)
    os.close(data_r)
    mark_private(alive_r)
    deathwatch.watch_parent(alive_r)
    prepare(prep)
    process_obj = reduction.loads(process_blob)
    process_obj._start_method = prep.get("start_method") or "forkserver"
    code = process_obj._bootstrap(parent_sentinel=alive_r)
    atexit._run_exitfuncs()
    return code


