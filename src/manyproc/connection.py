"""Connections: length-framed messages over pipes and sockets (DESIGN.md layer 3).

::

    Pipe()                      Listener(address, authkey=k)        Client(address, authkey=k)
      |                           |  accept()                          |
      v                           v                                    v
    Connection <--- frames ---> Connection  <===== HMAC handshake =====> Connection
      send(obj)   = reduction.dumps  -> one frame   (see manyproc._wire)
      recv()      = one frame        -> reduction.loads
      send_bytes / recv_bytes / recv_bytes_into: the same frames, raw

Between the two ends of a ``Pipe`` (always on one host), a message holding 1 MiB
or more of big buffers (arrays, bytes) travels through shared memory: the frame
carries only a reference that unpickles into the object, arrays built on the
shared pages without a copy (see :mod:`manyproc._bigdata`).  Listener/Client
connections always carry the whole pickle, as the standard library does.

A :class:`Connection` owns one file descriptor: a socket for a duplex ``Pipe`` and
for everything a ``Listener``/``Client`` makes, an ``os.pipe`` end for a one-way
``Pipe``.  It never reads ahead of the message asked for, so ``poll``, ``wait``
and a pipe shared by several readers always agree with the kernel.

Connections, like sockets, travel to other processes by pickling: while a child
is being spawned the fd is inherited; otherwise it is handed over by
:mod:`manyproc.resource_sharer`.
"""

from __future__ import annotations

import itertools
import os
import socket
from collections.abc import Iterable

from . import _auth, _bigdata, _wire, reduction, util
from ._errors import AuthenticationError, BufferTooShort
from ._os.waiting import wait_readable

TYPE_CHECKING = False  # typing costs import time in every child; only checkers need it
if TYPE_CHECKING:
    from typing import Any, NoReturn

__all__ = ["Client", "Listener", "Pipe", "wait"]

BUFSIZE = 8192
#: Seconds a Listener or Client waits for each step of the authentication handshake.
CONNECTION_TIMEOUT = 20.0

default_family = "AF_INET"
families = ["AF_INET"]
if hasattr(socket, "AF_UNIX"):
    default_family = "AF_UNIX"
    families.append("AF_UNIX")

deliver_challenge = _auth.deliver_challenge
answer_challenge = _auth.answer_challenge
# The handshake's markers, under the standard library's names.
CHALLENGE = _auth.CHALLENGE
WELCOME = _auth.WELCOME
FAILURE = _auth.FAILURE
MESSAGE_LENGTH = _auth.NONCE_SIZE

_loads = reduction.ForkingPickler.loads  # pickle.loads, without a wrapper call


#: Pickling for a peer on this host (Pipe ends, queues): big messages via shared memory.
_pickle = _bigdata.dumps_parts
#: Pickling for any peer (sockets from Listener/Client): the whole pickle in the frame.
_pickle_plain = reduction.dumps_parts
_Reference = _bigdata._Reference
_release = _bigdata.release


_dumps = reduction.dumps


_write_frame = _wire.write_frame
_read_frame = _wire.read_frame
_read_size = _wire.read_size
_read_payload = _wire.read_payload

_address_counter = itertools.count()


# --------------------------------------------------------------------------- addresses


def _is_abstract(address: Any) -> bool:
    """True for a Linux abstract-namespace AF_UNIX address (it starts with a NUL byte)."""
    if isinstance(address, bytes):
        return address[:1] == b"\0"
    if isinstance(address, str):
        return address[:1] == "\0"
    return False


def address_type(address: Any) -> str:
    """Return the family of ``address``: ``'AF_INET'`` for ``(host, port)``, else ``'AF_UNIX'``.

    Raises:
        ValueError: the address is neither a tuple, a str path nor an abstract name.
    """
    if type(address) is tuple:
        return "AF_INET"
    if type(address) is str and address.startswith("\\\\"):
        return "AF_PIPE"
    if type(address) is str or _is_abstract(address):
        return "AF_UNIX"
    raise ValueError(
        f"address type of {address!r} unrecognized: use a (host, port) tuple for TCP, a str "
        "path for a Unix socket, or a name starting with '\\0' for a Linux abstract socket")


def _validate_family(family: str) -> None:
    if family not in families:
        if family == "AF_PIPE":
            raise ValueError(f"Family {family} is not recognized: named pipes exist only on "
                             f"Windows; use one of {families}")
        raise ValueError(f"Family {family!r} is not recognized; use one of {families}")


def arbitrary_address(family: str) -> Any:
    """Return a fresh address of ``family`` for a Listener to bind to."""
    if family == "AF_INET":
        return ("localhost", 0)
    if family == "AF_UNIX":
        name = f"listener-{os.getpid()}-{next(_address_counter)}-{os.urandom(4).hex()}"
        return os.path.join(util.get_temp_dir(), name)
    raise ValueError(f"unrecognized family {family!r}; use one of {families}")


# --------------------------------------------------------------------------- Connection


class Connection:
    """One end of a pipe or socket that carries whole messages.

    Objects go through :meth:`send`/:meth:`recv` (pickled with
    :func:`manyproc.reduction.dumps`), raw bytes through :meth:`send_bytes`,
    :meth:`recv_bytes` and :meth:`recv_bytes_into`.  A message is received whole
    or not at all; a closed peer gives :class:`EOFError`.

    Args:
        handle: the file descriptor, which the Connection owns from now on.
        readable, writable: the directions it may be used in.
        shm_buffers: the peer is a manyproc process on this host, so messages with
            big buffers may go through shared memory (see :mod:`manyproc._bigdata`).
            ``Pipe`` sets it; leave it off for fds whose other end may be elsewhere.
    """

    _handle: int | None = None
    #: Largest incoming message accepted (None: no limit); see ``max_message_size``.
    _max_size: int | None = None
    #: Set on a Client made without authkey: turns an unexpected challenge into advice.
    _no_auth_peer: Any = None
    #: True when either of the two above is set: receiving takes the careful path.
    _guarded = False
    #: Big messages may travel through shared memory (the peer is local and manyproc).
    _shm_buffers = False
    #: Messages this end put in shared memory that the reader has not taken yet.
    _backlog: _bigdata.Backlog | None = None

    def __init__(self, handle: int, readable: bool = True, writable: bool = True, *,
                 shm_buffers: bool = False) -> None:
        try:
            handle = handle.__index__()
        except AttributeError:
            raise TypeError(f"a Connection needs a file descriptor (an int), not "
                            f"{type(handle).__name__} {handle!r:.60}") from None
        if handle < 0:
            raise ValueError(f"invalid handle {handle}: a file descriptor is >= 0")
        if not readable and not writable:
            raise ValueError("at least one of `readable` and `writable` must be True")
        self._handle = handle
        self._readable = readable
        self._writable = writable
        if shm_buffers:
            self._shm_buffers = True

    def __del__(self, _close: Any = os.close) -> None:
        # ``_close`` is bound at definition: at interpreter exit module globals may be gone.
        if self._handle is not None:
            try:
                _close(self._handle)
            except OSError:
                pass
            self._handle = None

    # ----------------------------------------------------------------- state

    def _refuse(self, need_read: bool) -> NoReturn:
        """Raise the error for using a closed or wrong-direction connection."""
        if self._handle is None:
            raise OSError("handle is closed")
        if need_read and not self._readable:
            raise OSError("connection is write-only")
        raise OSError("connection is read-only")

    def _check_readable(self) -> int:
        fd = self._handle
        if fd is None or not self._readable:
            self._refuse(True)
        return fd

    def _check_writable(self) -> int:
        fd = self._handle
        if fd is None or not self._writable:
            self._refuse(False)
        return fd

    @property
    def closed(self) -> bool:
        """True once the connection is closed."""
        return self._handle is None

    @property
    def readable(self) -> bool:
        """True if messages can be received."""
        return self._readable

    @property
    def writable(self) -> bool:
        """True if messages can be sent."""
        return self._writable

    def fileno(self) -> int:
        """Return the file descriptor of the connection."""
        if self._handle is None:
            raise OSError("handle is closed")
        return self._handle

    def close(self) -> None:
        """Close the connection; closing twice is harmless."""
        fd = self._handle
        if fd is not None:
            self._handle = None
            os.close(fd)

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._handle is None:
            state = "closed"
        else:
            mode = ("readable " if self._readable else "") + ("writable" if self._writable
                                                             else "")
            state = f"fd={self._handle} {mode.strip()}"
        return f"<{type(self).__name__} {state}>"

    def __reduce__(self) -> Any:
        raise TypeError(
            f"{self!r} cannot be pickled with plain pickle: pass it to another process "
            "through manyproc (Process args, a Queue, Connection.send), which hands over a "
            "duplicate of its file descriptor")

    # ----------------------------------------------------------------- sending

    def send(self, obj: Any) -> None:
        """Pickle ``obj`` and send it as one message.

        Raises:
            pickle.PicklingError, TypeError, AttributeError: ``obj`` cannot be
                pickled (nothing was sent); the message names the culprit.
        """
        fd = self._handle
        if fd is None or not self._writable:
            self._refuse(False)
        if not self._shm_buffers:
            _write_frame(fd, _pickle_plain(obj))
            return
        data = _pickle(obj)
        if type(data) is _Reference:
            backlog = self._backlog
            if backlog is None:
                backlog = self._backlog = _bigdata.Backlog()
            try:
                backlog.admit(data, fd)  # a reader that lags holds us up, as a full pipe
                _write_frame(fd, data)
            except BaseException as exc:
                _release(data)  # not sent: nobody will ever take its segment
                if isinstance(exc, BrokenPipeError):
                    backlog.abandon()  # nor those sent before that were not read
                raise
            backlog.sent(data)
        else:
            _write_frame(fd, data)

    def send_bytes(self, buf: Any, offset: int = 0, size: int | None = None) -> None:
        """Send ``size`` bytes of the bytes-like ``buf`` from ``offset`` as one message."""
        fd = self._check_writable()
        m = memoryview(buf)
        if m.itemsize > 1 or m.ndim != 1:
            m = m.cast("B")
        n = m.nbytes
        if offset < 0:
            raise ValueError(f"offset is negative ({offset})")
        if n < offset:
            raise ValueError(f"buffer length < offset ({n} < {offset})")
        if size is None:
            size = n - offset
        elif size < 0:
            raise ValueError(f"size is negative ({size})")
        elif offset + size > n:
            raise ValueError(f"buffer length < offset + size ({n} < {offset} + {size})")
        _write_frame(fd, m[offset:offset + size] if offset or size != n else m)

    # ----------------------------------------------------------------- receiving

    def _read_message(self) -> Any:
        """Receive one message as ``bytes`` or ``bytearray`` (no copy is made)."""
        fd = self._handle
        if fd is None or not self._readable:
            self._refuse(True)
        if not self._guarded:
            return _read_frame(fd)
        size = _read_size(fd)
        if self._max_size is not None and size > self._max_size:
            self._reject_size(size, self._max_size, "max_message_size")
        data = _read_payload(fd, size)
        if self._no_auth_peer is not None:
            self._check_first_message(data)
        return data

    def recv(self) -> Any:
        """Receive one message and unpickle it.

        Raises:
            EOFError: the other end is closed and nothing is left to read.
        """
        fd = self._handle
        if fd is None or not self._readable or self._guarded:
            return _loads(self._read_message())
        return _loads(_read_frame(fd))

    def recv_bytes(self, maxlength: int | None = None) -> bytes:
        """Receive one message as bytes.

        Raises:
            OSError: the message is longer than ``maxlength``; the connection can no
                longer be read, since the rest of that message is still pending.
            EOFError: the other end is closed and nothing is left to read.
        """
        if maxlength is None:
            data = self._read_message()
        else:
            if maxlength < 0:
                raise ValueError(f"negative maxlength ({maxlength})")
            fd = self._check_readable()
            size = _read_size(fd)
            if size > maxlength:
                self._reject_size(size, maxlength, "maxlength")
            data = _read_payload(fd, size)
        return data if type(data) is bytes else bytes(data)

    def recv_bytes_into(self, buf: Any, offset: int = 0) -> int:
        """Receive one message into the writable buffer ``buf`` at byte ``offset``.

        Returns:
            The number of bytes received.

        Raises:
            BufferTooShort: the message does not fit; ``args[0]`` holds it whole.
        """
        fd = self._check_readable()
        with memoryview(buf) as m:
            if m.readonly:
                raise TypeError(f"recv_bytes_into needs a writable buffer, not a read-only "
                                f"{type(buf).__name__}; pass a bytearray or array")
            nbytes = m.nbytes
            if offset < 0:
                raise ValueError(f"negative offset ({offset})")
            if offset > nbytes:
                raise ValueError(f"offset too large ({offset} > buffer size {nbytes})")
            size = _read_size(fd)
            if self._max_size is not None and size > self._max_size:
                self._reject_size(size, self._max_size, "max_message_size")
            if nbytes - offset < size:
                data = _read_payload(fd, size)
                raise BufferTooShort(bytes(data))
            if size:
                with m.cast("B") as flat:
                    _wire.read_payload_into(fd, flat[offset:offset + size])
            return size

    def poll(self, timeout: float | None = 0.0) -> bool:
        """Return whether a message can be received without blocking.

        Args:
            timeout: seconds to wait; ``None`` waits until data or end of file arrives.
        """
        fd = self._check_readable()
        return bool(wait_readable([fd], timeout))

    # ----------------------------------------------------------------- helpers

    def _set_max_size(self, limit: int | None) -> None:
        """Refuse incoming messages longer than ``limit`` bytes (None: no limit)."""
        self._max_size = limit
        self._guarded = limit is not None or self._no_auth_peer is not None

    def _reject_size(self, size: int, limit: int, name: str) -> None:
        # The payload stays unread, so the stream is out of step: stop reading it.
        if self._writable:
            self._readable = False
        else:
            self.close()
        hint = ("pass a larger maxlength, or none" if name == "maxlength" else
                "raise max_message_size= on the Listener or Client if such messages are "
                "expected")
        raise OSError(f"bad message length: the incoming message is {size} bytes, more than "
                      f"{name}={limit}; {hint}. The connection can no longer be read")

    def _check_first_message(self, data: Any) -> None:
        address = self._no_auth_peer
        self._no_auth_peer = None
        self._guarded = self._max_size is not None
        if bytes(data[:len(_auth.CHALLENGE)]) == _auth.CHALLENGE:
            raise AuthenticationError(
                f"the Listener at {address!r} requires authentication but this Client was "
                "made without an authkey: pass the Listener's key, Client(address, "
                "authkey=key)")

    def _recv_handshake(self, limit: int, deadline: float | None) -> bytes:
        """Receive one handshake message of at most ``limit`` bytes before ``deadline``."""
        fd = self._check_readable()
        try:
            size = _wire.read_size(fd, deadline)
            if size > limit:
                raise AuthenticationError(
                    f"the peer sent a {size}-byte message during the authentication "
                    f"handshake, where at most {limit} bytes are expected: it has no authkey "
                    "while this side has one, or it is not a manyproc/multiprocessing peer")
            return _wire.read_payload(fd, size, deadline)
        except _wire.FrameError as exc:
            raise AuthenticationError(
                f"authentication failed: the peer broke the handshake protocol ({exc})"
            ) from exc


_ConnectionBase = Connection  # the standard library's name for the base class


# --------------------------------------------------------------------------- Pipe


def Pipe(duplex: bool = True, *, shm_buffers: bool = True  # noqa: N802
         ) -> tuple[Connection, Connection]:
    """Return the two ends of a new pipe as Connections.

    Args:
        duplex: both ends can send and receive (a socket pair); with ``False`` the
            first end only receives and the second only sends (an ``os.pipe``).
        shm_buffers: let messages holding 1 MiB or more of arrays or bytes travel
            through shared memory (see :func:`manyproc.reduction.set_shm_threshold`);
            ``False`` keeps every byte in the pipe.
    """
    if duplex:
        s1, s2 = socket.socketpair()
        s1.setblocking(True)
        s2.setblocking(True)
        return (Connection(s1.detach(), shm_buffers=shm_buffers),
                Connection(s2.detach(), shm_buffers=shm_buffers))
    r, w = os.pipe()
    return (Connection(r, writable=False, shm_buffers=shm_buffers),
            Connection(w, readable=False, shm_buffers=shm_buffers))


# --------------------------------------------------------------------------- sockets


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _tune(sock: socket.socket) -> None:
    if sock.family in (socket.AF_INET, getattr(socket, "AF_INET6", -1)):
        # Request/response traffic: never hold a small message back waiting for an ACK.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class SocketListener:
    """A bound, listening socket that accepts Connections."""

    def __init__(self, address: Any, family: str, backlog: int = 1) -> None:
        self._socket = socket.socket(getattr(socket, family))
        try:
            if os.name == "posix":
                self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._socket.setblocking(True)
            self._socket.bind(address)
            self._socket.listen(backlog)
            self._address = self._socket.getsockname()
        except OSError as exc:
            self._socket.close()
            raise type(exc)(exc.errno, f"cannot listen on {address!r}: {exc.strerror}") \
                from None
        self._family = family
        self._last_accepted: Any = None
        self._unlink: util.Finalize | None = None
        if family == "AF_UNIX" and not _is_abstract(address):
            self._unlink = util.Finalize(self, _unlink_quietly, args=(address,), exitpriority=0)

    def accept(self) -> Connection:
        s, self._last_accepted = self._socket.accept()
        s.setblocking(True)
        _tune(s)
        return Connection(s.detach())

    def close(self) -> None:
        try:
            self._socket.close()
        finally:
            unlink, self._unlink = self._unlink, None
            if unlink is not None:
                unlink()


def SocketClient(address: Any) -> Connection:  # noqa: N802 - the standard library's name
    """Return a Connection to the listening socket at ``address``."""
    family = address_type(address)
    with socket.socket(getattr(socket, family)) as s:
        s.setblocking(True)
        try:
            s.connect(address)
        except OSError as exc:
            if exc.errno is None:
                raise
            raise type(exc)(exc.errno, f"cannot connect to {address!r}: {exc.strerror}; "
                            "is a Listener running there?") from None
        _tune(s)
        return Connection(s.detach())


def _check_authkey(authkey: Any) -> None:
    if authkey is not None and not isinstance(authkey, bytes):
        raise TypeError(f"authkey should be a byte string, not {type(authkey).__name__}; "
                        "encode a text key first, e.g. key.encode()")


def _check_limit(max_message_size: Any) -> None:
    if max_message_size is not None and (not isinstance(max_message_size, int)
                                         or max_message_size < 0):
        raise ValueError(f"max_message_size must be None or an int >= 0, "
                         f"not {max_message_size!r}")


class Listener:
    """Accept Connections on a socket, authenticating each peer when ``authkey`` is given.

    Args:
        address: ``(host, port)`` for TCP, a path (or ``'\\0name'``) for a Unix socket;
            ``None`` picks a fresh one of ``family``.
        family: ``'AF_INET'`` or ``'AF_UNIX'``; guessed from ``address`` when omitted.
        backlog: how many pending connections the OS queues.
        authkey: the shared secret every Client must prove it holds (HMAC challenge
            in both directions before any message is read); ``None`` disables it.
        handshake_timeout: seconds allowed for each step of the handshake, so a
            silent or broken peer cannot stall ``accept`` for ever (``None``: no limit).
        max_message_size: largest message accepted on connections from this
            listener; a bigger one raises OSError instead of being read.
    """

    def __init__(self, address: Any = None, family: str | None = None, backlog: int = 1,
                 authkey: bytes | None = None, *,
                 handshake_timeout: float | None = CONNECTION_TIMEOUT,
                 max_message_size: int | None = None) -> None:
        family = family or (address and address_type(address)) or default_family
        _validate_family(family)
        _check_authkey(authkey)
        _check_limit(max_message_size)
        address = address or arbitrary_address(family)
        self._listener: SocketListener | None = SocketListener(address, family, backlog)
        self._authkey = authkey
        self._handshake_timeout = handshake_timeout
        self._max_message_size = max_message_size

    def accept(self) -> Connection:
        """Wait for a Client and return the Connection to it.

        Raises:
            AuthenticationError: the peer failed the challenge; its connection is
                closed and the Listener can go on accepting others.
        """
        listener = self._listener
        if listener is None:
            raise OSError("listener is closed")
        conn = listener.accept()
        if self._authkey is not None:
            try:
                deliver_challenge(conn, self._authkey, timeout=self._handshake_timeout)
                answer_challenge(conn, self._authkey, timeout=self._handshake_timeout)
            except BaseException:
                conn.close()
                raise
        if self._max_message_size is not None:
            conn._set_max_size(self._max_message_size)
        return conn

    def close(self) -> None:
        """Stop listening (and remove the socket file of a Unix address)."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()

    @property
    def address(self) -> Any:
        """The address the listener is bound to (with the real port for port 0)."""
        if self._listener is None:
            raise OSError("listener is closed")
        return self._listener._address

    @property
    def last_accepted(self) -> Any:
        """The address of the last accepted peer."""
        if self._listener is None:
            raise OSError("listener is closed")
        return self._listener._last_accepted

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        where = self._listener._address if self._listener is not None else "closed"
        return f"<{type(self).__name__} {where!r}>"


def Client(address: Any, family: str | None = None, authkey: bytes | None = None, *,  # noqa: N802
           handshake_timeout: float | None = CONNECTION_TIMEOUT,
           max_message_size: int | None = None) -> Connection:
    """Connect to the Listener at ``address`` and return the Connection.

    With ``authkey`` the Client answers the Listener's challenge and then challenges
    it back; each step must complete within ``handshake_timeout`` seconds.

    Raises:
        AuthenticationError: the Listener holds a different key, or none.
        ConnectionRefusedError, FileNotFoundError: nothing listens at ``address``.
    """
    family = family or address_type(address)
    _validate_family(family)
    _check_authkey(authkey)
    _check_limit(max_message_size)
    conn = SocketClient(address)
    if authkey is not None:
        try:
            answer_challenge(conn, authkey, timeout=handshake_timeout)
            deliver_challenge(conn, authkey, timeout=handshake_timeout)
        except BaseException:
            conn.close()
            raise
    else:
        conn._no_auth_peer = address
        conn._guarded = True
    if max_message_size is not None:
        conn._set_max_size(max_message_size)
    return conn


# --------------------------------------------------------------------------- wait


def _fd_of(obj: Any) -> int:
    if isinstance(obj, int):
        fd = obj
    else:
        fileno = getattr(obj, "fileno", None)
        if fileno is None:
            raise ValueError(
                f"cannot wait on {obj!r:.80}: wait() takes Connections, sockets, file "
                "descriptors (ints, e.g. Process.sentinel) and objects with a fileno() method")
        fd = fileno()
        if not isinstance(fd, int):
            raise ValueError(f"{obj!r:.80}.fileno() returned {fd!r}, not an int")
    if fd < 0:
        raise ValueError(f"cannot wait on {obj!r:.80}: invalid file descriptor {fd}")
    return fd


def wait(object_list: Iterable[Any], timeout: float | None = None) -> list[Any]:
    """Wait until some of ``object_list`` are ready; return those that are.

    A Connection or socket is ready when a message (or end of file) can be read;
    an int is a file descriptor, e.g. a process sentinel, ready when readable.

    Args:
        object_list: Connections, sockets, fds and objects with ``fileno()``.
        timeout: seconds to wait at most; ``None`` waits until one is ready.

    Returns:
        The ready objects, in the order given (empty if the timeout expired).
    """
    objects = list(object_list)
    fds = [_fd_of(obj) for obj in objects]
    if timeout is not None and timeout < 0:
        timeout = 0
    ready = set(wait_readable(set(fds), timeout))
    if not ready:
        return []
    return [obj for obj, fd in zip(objects, fds, strict=True) if fd in ready]


# --------------------------------------------------------------------------- pickling


def _reduce_connection(conn: Connection) -> Any:
    args: tuple[Any, ...] = (reduction.DupFd(conn.fileno()), conn.readable, conn.writable)
    if conn._shm_buffers:
        args += (True,)
    return _rebuild_connection, args


def _rebuild_connection(dup: Any, readable: bool, writable: bool,
                        shm_buffers: bool = False) -> Connection:
    return Connection(dup.detach(), readable, writable, shm_buffers=shm_buffers)


reduction.register(Connection, _reduce_connection)

