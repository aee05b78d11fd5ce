"""The resource tracker's server: removes named objects whose owner has gone.

Runs as a small separate process (``python -I -S .../tracker.py LISTEN_FD CONN_FD``),
started lazily by the first process of a family that creates a named segment or
semaphore.  It imports nothing from manyproc, so it starts in a few milliseconds
and does not depend on the user's code.

Theory of operation
-------------------
Each process that owns named objects holds its *own* connection to the tracker
(an AF_UNIX stream socket) and reports on it, one text line per message::

    HELLO <pid>                   -> "OK <tracker pid>"    (sent once, on connecting)
    REG <rtype> <name>            this connection owns <name>
    UNREG <rtype> <name>          it does not any more (it removed the name itself)
    DEFER <rtype> <pid,...> <name>   remove <name> once all those processes have ended
    UNDEFER <rtype> <name>        forget the deferred removal of <name>: some process
                                  removed it already (may arrive before its DEFER)
    LIST                          -> "LIST <json>"          (what is tracked, for tests)
    BYE                           -> "BYE"   remove what this connection owns, then close

When a connection reaches end-of-file -- its process exited, crashed or was killed
with SIGKILL; the kernel closes the socket in every case -- the tracker removes the
names that connection registered and did not unregister, *unless another live
connection registered the same name* (a name that a second process re-created after
the first one lost it belongs to the second).  Processes that only attach to an
object never register it, so their exit never removes anything.

A deferred removal whose segment is gone already (its receiver took it, but could
not reach this tracker to say so) is dropped once two looks, made
``MISSING_CHECK_INTERVAL`` seconds apart, found it missing (a name may be
deferred a moment before it is created).

The tracker exits by itself once no connection and no deferred removal remain.  A
process that finds it gone (connection refused, or closed before ``OK``) starts a new
one.  The :class:`Ledger` holds all the bookkeeping and does no I/O, so it is
unit-tested directly.
"""

from __future__ import annotations

import errno
import json
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable

__all__ = ["Ledger", "CLEANUP_FUNCS", "serve", "main"]


def _unlink_semaphore(name: str) -> None:
    from _multiprocessing import sem_unlink

    sem_unlink(name)


def _unlink_segment(name: str) -> None:
    import _posixshmem

    _posixshmem.shm_unlink(name)


def _nothing(name: str) -> None:
    pass


# How each resource type is removed; the client refuses types not listed here.
CLEANUP_FUNCS: dict[str, Callable[[str], None]] = {
    "noop": _nothing,
    "semaphore": _unlink_semaphore,
    "shared_memory": _unlink_segment,
}

Key = tuple[str, str]  # (rtype, name)

_MAX_LINE = 1 << 16  # names are at most a few hundred bytes


class Ledger:
    """Who owns which named object, with no I/O: the tracker's whole decision logic."""

    def __init__(self) -> None:
        self.owned: dict[int, set[Key]] = {}      # connection id -> keys it registered
        self.pids: dict[int, int] = {}            # connection id -> pid it announced
        self.waiting: list[tuple[Key, set[int]]] = []  # deferred removals and their pids
        # Names undeferred before their DEFER arrived (two processes, two sockets):
        # that DEFER is then dropped.  Oldest first, bounded.
        self.undeferred: dict[Key, None] = {}
        self.missing: set[Key] = set()  # deferred names found missing at the last look

    def connect(self, conn: int, pid: int = 0) -> None:
        self.owned.setdefault(conn, set())
        if pid:
            self.pids[conn] = pid

    def register(self, conn: int, key: Key) -> None:
        self.owned.setdefault(conn, set()).add(key)

    def unregister(self, conn: int, key: Key) -> None:
        self.owned.get(conn, set()).discard(key)

    def _claimed_elsewhere(self, key: Key, conn: int | None) -> bool:
        if any(key in keys for other, keys in self.owned.items() if other != conn):
            return True
        return any(key == waiting_key for waiting_key, _ in self.waiting)

    def defer(self, conn: int, key: Key, pids: Iterable[int]) -> list[Key]:
        """Move ``key`` from ``conn`` to the waiting list; return it at once if no pid is given."""
        self.unregister(conn, key)
        if key in self.undeferred:
            del self.undeferred[key]
            return []  # already removed by the process that undeferred it
        pending = set(pids)
        if not pending:
            return [] if self._claimed_elsewhere(key, None) else [key]
        self.waiting.append((key, pending))
        return []

    #: Most early UNDEFERs remembered (each waits for a DEFER that may never come).
    MAX_UNDEFERRED = 1 << 16

    def undefer(self, key: Key) -> None:
        """Drop the deferred removal of ``key``: another process removed it already.

        If its DEFER has not arrived yet, remember to drop it when it does.
        """
        kept = [entry for entry in self.waiting if entry[0] != key]
        if len(kept) != len(self.waiting):
            self.waiting = kept
            return
        self.undeferred[key] = None
        if len(self.undeferred) > self.MAX_UNDEFERRED:
            del self.undeferred[next(iter(self.undeferred))]

    def drop_missing(self, exists: Callable[[Key], bool]) -> None:
        """Drop deferred removals of names found missing now and at the previous call.

        A removal deferred just before its object is created looks missing once;
        only a name missing twice is really gone, leaving nothing to remove.
        """
        missing = {key for key, _ in self.waiting if not exists(key)}
        gone = missing & self.missing
        self.missing = missing - gone
        if gone:
            self.waiting = [entry for entry in self.waiting if entry[0] not in gone]

    def disconnect(self, conn: int) -> list[Key]:
        """Forget ``conn``; return the keys now owned by nobody, which must be removed."""
        keys = self.owned.pop(conn, set())
        self.pids.pop(conn, None)
        return sorted(k for k in keys if not self._claimed_elsewhere(k, None))

    def watched_pids(self) -> set[int]:
        return {pid for _, pids in self.waiting for pid in pids}

    def process_ended(self, pid: int) -> list[Key]:
        """Note that ``pid`` ended; return deferred keys whose processes have all ended."""
        due: list[tuple[Key, set[int]]] = []
        still: list[tuple[Key, set[int]]] = []
        for key, pids in self.waiting:
            pids.discard(pid)
            (still if pids else due).append((key, pids))
        self.waiting = still
        return [key for key, _ in due if not self._claimed_elsewhere(key, None)]

    def idle(self) -> bool:
        """True when nothing is connected and nothing waits: the tracker may exit."""
        return not self.owned and not self.waiting

    def listing(self) -> list[dict[str, object]]:
        rows: list[dict[str, object]] = []
        for conn, keys in self.owned.items():
            for rtype, name in sorted(keys):
                rows.append({"rtype": rtype, "name": name, "pid": self.pids.get(conn, 0)})
        for (rtype, name), pids in self.waiting:
            rows.append({"rtype": rtype, "name": name, "pid": 0, "after": sorted(pids)})
        return rows


def _remove(keys: Iterable[Key]) -> None:
    for rtype, name in keys:
        func = CLEANUP_FUNCS.get(rtype)
        if func is None:
            continue
        try:
            func(name)
        except FileNotFoundError:
            pass  # its owner or another process removed it already
        except Exception as exc:
            _say(f"could not remove {rtype} {name!r}: {exc}")


def _exists(key: Key) -> bool:
    """False only for a segment known to be gone; other kinds are not checked."""
    rtype, name = key
    if rtype != "shared_memory":
        return True
    if sys.platform.startswith("linux"):
        return os.path.exists("/dev/shm/" + name.lstrip("/"))
    import _posixshmem

    try:
        fd = _posixshmem.shm_open(name, os.O_RDONLY, mode=0o600)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    os.close(fd)
    return True


#: Seconds between looks for deferred segments that someone else removed.
MISSING_CHECK_INTERVAL = 1.0


def _say(text: str) -> None:
    try:
        sys.stderr.write(f"manyproc resource tracker: {text}\n")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass


class _Watcher:
    """Learns when processes end: pidfds in the selector (Linux), else polling."""

    POLL_INTERVAL = 0.2

    def __init__(self, sel: selectors.BaseSelector) -> None:
        self._sel = sel
        self._fds: dict[int, int] = {}     # pid -> pidfd
        self._polled: set[int] = set()

    def watch(self, pid: int) -> bool:
        """Start watching ``pid``; False if it has already ended."""
        if pid in self._fds or pid in self._polled:
            return True
        opener = getattr(os, "pidfd_open", None)
        if opener is not None:
            try:
                fd = opener(pid)
            except ProcessLookupError:
                return False
            except OSError:
                pass
            else:
                self._fds[pid] = fd
                self._sel.register(fd, selectors.EVENT_READ, ("pid", pid))
                return True
        if not _pid_alive(pid):
            return False
        self._polled.add(pid)
        return True

    def forget(self, pid: int) -> None:
        fd = self._fds.pop(pid, None)
        if fd is not None:
            self._sel.unregister(fd)
            os.close(fd)
        self._polled.discard(pid)

    def timeout(self) -> float | None:
        return self.POLL_INTERVAL if self._polled else None

    def ended_by_polling(self) -> list[int]:
        return [pid for pid in list(self._polled) if not _pid_alive(pid)]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Server:
    def __init__(self, listener: socket.socket, first: socket.socket) -> None:
        self.sel = selectors.DefaultSelector()
        self.ledger = Ledger()
        self.watcher = _Watcher(self.sel)
        self.listener: socket.socket | None = listener
        self.buffers: dict[int, bytes] = {}
        self.next_missing_check = time.monotonic() + MISSING_CHECK_INTERVAL
        self.socks: dict[int, socket.socket] = {}
        listener.setblocking(False)
        self.sel.register(listener, selectors.EVENT_READ, ("listen", None))
        self._add(first)

    def _add(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        cid = sock.fileno()
        self.socks[cid] = sock
        self.buffers[cid] = b""
        self.ledger.connect(cid)
        self.sel.register(sock, selectors.EVENT_READ, ("conn", cid))

    def _drop(self, cid: int) -> None:
        sock = self.socks.pop(cid)
        self.buffers.pop(cid, None)
        self.sel.unregister(sock)
        sock.close()
        _remove(self.ledger.disconnect(cid))

    def _reply(self, cid: int, text: str) -> None:
        try:
            self.socks[cid].sendall(text.encode() + b"\n")
        except OSError:
            pass  # the peer went away; its EOF will follow

    def _handle(self, cid: int, line: str) -> None:
        verb, _, rest = line.partition(" ")
        if verb == "REG" or verb == "UNREG":
            rtype, _, name = rest.partition(" ")
            if rtype not in CLEANUP_FUNCS or not name:
                _say(f"ignoring malformed request {line!r}")
            elif verb == "REG":
                self.ledger.register(cid, (rtype, name))
            else:
                self.ledger.unregister(cid, (rtype, name))
        elif verb == "DEFER":
            rtype, _, rest = rest.partition(" ")
            pid_text, _, name = rest.partition(" ")
            try:
                pids = [int(p) for p in pid_text.split(",") if p]
            except ValueError:
                _say(f"ignoring malformed request {line!r}")
                return
            live = {pid for pid in pids if self.watcher.watch(pid)}
            _remove(self.ledger.defer(cid, (rtype, name), live))
        elif verb == "UNDEFER":
            rtype, _, name = rest.partition(" ")
            self.ledger.undefer((rtype, name))
        elif verb == "HELLO":
            try:
                self.ledger.connect(cid, int(rest or 0))
            except ValueError:
                pass
            self._reply(cid, f"OK {os.getpid()}")
        elif verb == "LIST":
            self._reply(cid, "LIST " + json.dumps(self.ledger.listing()))
        elif verb == "BYE":
            _remove(self.ledger.disconnect(cid))
            self.ledger.connect(cid)
            self._reply(cid, "BYE")
        else:
            _say(f"ignoring unknown request {line!r}")

    def _read(self, cid: int) -> None:
        try:
            data = self.socks[cid].recv(65536)
        except OSError:
            data = b""
        if not data:
            # End of file: the process is gone (or said BYE and closed).
            self._drop(cid)
            return
        buffer = self.buffers[cid] + data
        *lines, self.buffers[cid] = buffer.split(b"\n")
        if len(self.buffers[cid]) > _MAX_LINE:
            _say(f"dropping a connection that sent a line of over {_MAX_LINE} bytes")
            self._drop(cid)
            return
        for raw in lines:
            if raw:
                self._handle(cid, raw.decode("utf-8", "surrogateescape"))

    def _accept_pending(self) -> bool:
        """Accept every waiting connection; True if there was at least one."""
        got = False
        while self.listener is not None:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ECONNABORTED):
                    break
                raise
            self._add(sock)
            got = True
        return got

    def _timeout(self) -> float | None:
        timeout = self.watcher.timeout()
        if any(key[0] == "shared_memory" for key, _ in self.ledger.waiting):
            due = max(0.0, self.next_missing_check - time.monotonic())
            timeout = due if timeout is None else min(timeout, due)
        return timeout

    def run(self) -> None:
        while True:
            if self.ledger.idle() and not self._accept_pending():
                break
            if time.monotonic() >= self.next_missing_check:
                self.next_missing_check = time.monotonic() + MISSING_CHECK_INTERVAL
                self.ledger.drop_missing(_exists)
                continue  # the ledger may be idle now
            for key, _ in self.sel.select(self._timeout()):
                kind, ident = key.data
                if kind == "listen":
                    self._accept_pending()
                elif kind == "conn":
                    if ident in self.socks:
                        self._read(ident)
                else:
                    self._process_ended(ident)
            for pid in self.watcher.ended_by_polling():
                self._process_ended(pid)
        if self.listener is not None:
            self.sel.unregister(self.listener)
            self.listener.close()
            self.listener = None

    def _process_ended(self, pid: int) -> None:
        self.watcher.forget(pid)
        _remove(self.ledger.process_ended(pid))


def serve(listen_fd: int, conn_fd: int) -> None:
    """Run the tracker on an inherited listening socket and the starter's connection."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        # Stop only when every owner is gone, or a Ctrl-C on the terminal would stop
        # the tracker before the processes whose objects it must remove.
        signal.signal(sig, signal.SIG_IGN)
    listener = socket.socket(fileno=listen_fd)
    address = listener.getsockname()
    first = socket.socket(fileno=conn_fd)
    try:
        _Server(listener, first).run()
    finally:
        if isinstance(address, str) and address:
            try:
                os.unlink(address)
            except OSError:
                pass


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        _say(f"usage: tracker.py LISTEN_FD CONN_FD (got {argv!r})")
        sys.exit(2)
    serve(int(argv[0]), int(argv[1]))


if __name__ == "__main__":
    main(sys.argv[1:])
