"""How a manager's clients and its server talk: sockets, security, frames and messages.

Connection set-up
-----------------
Every connection to a manager's server, whatever it is for, starts the same way::

    client                                         server
    ------                                         ------
    connect (TCP or Unix socket)       ------->    accept      (accept thread)
                                                   one thread per connection from here on
    [TLS handshake, if ssl_context]    <------>    [TLS handshake]
    answer the server's HMAC challenge <------>    challenge   (manyproc._auth; every
    challenge the server in return     <------>    answer       handshake frame <= 256 B)

Nothing is decoded before both challenges have succeeded, and each step has a
deadline (``HANDSHAKE_TIMEOUT``), so a silent or hostile peer costs one thread for
a few seconds and never a byte of unpickling.

Frames and messages
-------------------
After the handshake the connection carries length-prefixed frames (the
:mod:`manyproc._wire` layout).  The server refuses a frame longer than its
``max_message_size`` before reading it.  Each frame holds one message encoded
by the manager's serializer (``'pickle'``: :mod:`manyproc.reduction`;
``'xmlrpclib'``: XML-RPC, which only carries plain data)::

    request   (seq, op, args)        seq: int chosen by the client, op: str, args: tuple
    reply     (seq, status, value)   seq echoes the request (-1: about the connection)

``op`` and its ``args`` are listed in :data:`OPS`; ``status`` in :data:`STATUSES`.
A reply whose ``seq`` is older than the request being waited for belongs to a
request whose caller was interrupted (Ctrl-C) and is skipped.

The first request of a connection is ``hello``: it opens a new *session* (the
client process's share of the server's objects) or joins an existing one.  A
process holds one session connection per manager plus one connection per thread
for method calls; the references it holds belong to its session and are dropped
when the last connection of the session closes, so a killed client leaks nothing.
"""

from __future__ import annotations

import copyreg
import io
import ipaddress
import os
import pickle
import socket
import ssl
import struct
import threading
import time
import traceback
import xmlrpc.client
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import _auth, _wire, connection, reduction, util
from ._errors import AuthenticationError

__all__ = [
    "OPS", "STATUSES", "Request", "Reply", "Codec", "get_codec", "RemoteError",
    "RemoteTraceback", "ManagerConnectionError", "MessageTooLarge", "ProtocolError",
    "connect", "secure_accepted", "ServerSocket", "is_loopback", "format_address",
]

#: Seconds allowed for each step of a connection's TLS and HMAC handshake.
HANDSHAKE_TIMEOUT = 20.0
#: Largest request a server reads by default (``max_message_size=None``: no limit).
DEFAULT_MAX_MESSAGE_SIZE = 256 << 20
#: Connections a server may hold in the handshake at once; more are closed at once.
MAX_PENDING_HANDSHAKES = 128

#: op -> (arguments, what the server replies).  ``release`` gets no reply.  Server
#: subclasses add their own (SharedMemoryServer: track_segment, release_segment,
#: list_segments).
OPS: dict[str, tuple[str, str]] = {
    "hello": ("(session_id | None, client_name)", "(session_id, server_tag)"),
    "create": ("(typeid, args, kwds)", "(ident, exposed)"),
    "call": ("(ident, method, args, kwds)", "the result ('ok' or 'proxy')"),
    "incref": ("(idents,)", "the idents that no longer exist"),
    "adopt": ("(from_session_id, idents)", "the idents that no longer exist (moves the "
              "references a parent reserved while starting this child)"),
    "release": ("(idents,)", "no reply"),
    "methods": ("(ident,)", "the exposed method names"),
    "count": ("()", "the number of shared objects"),
    "describe": ("()", "a text listing the shared objects and their references"),
    "ping": ("()", "None"),
    "shutdown": ("()", "None, then the server stops"),
}

#: status -> meaning of the reply's value.
STATUSES: dict[str, str] = {
    "ok": "the result",
    "proxy": "(typeid, ident, exposed, proxytype name): a new shared object held for the "
             "caller's session (method_to_typeid)",
    "raised": "(exception | None, type name, message, server traceback): the referent raised",
    "error": "(message, server traceback, cause | None): the request itself failed",
}


# --------------------------------------------------------------------------- messages


class ProtocolError(ValueError):
    """A message does not have the shape of a manager request or reply."""


def _check_seq(seq: Any, what: str) -> int:
    if type(seq) is not int:
        raise ProtocolError(f"{what} sequence number must be an int, not {type(seq).__name__}")
    return seq


@dataclass(frozen=True, slots=True)
class Request:
    """One request from a client: ``op`` with ``args`` (see :data:`OPS`)."""

    seq: int
    op: str
    args: tuple[Any, ...] = ()

    def to_wire(self) -> tuple[Any, ...]:
        return (self.seq, self.op, self.args)

    @classmethod
    def from_wire(cls, message: Any) -> Request:
        """Check the shape of a decoded request (a 3-tuple, or a list from XML-RPC)."""
        if type(message) not in (tuple, list) or len(message) != 3:
            raise ProtocolError(f"a request is a (seq, op, args) triple, not {_brief(message)}")
        seq, op, args = message
        if type(op) is not str:
            raise ProtocolError(f"a request's op must be a str, not {_brief(op)}")
        if type(args) not in (tuple, list):
            raise ProtocolError(f"request arguments must be a tuple, not {_brief(args)}")
        return cls(_check_seq(seq, "request"), op, tuple(args))


@dataclass(frozen=True, slots=True)
class Reply:
    """The server's answer to the request numbered ``seq`` (see :data:`STATUSES`)."""

    seq: int
    status: str
    value: Any = None

    def to_wire(self) -> tuple[Any, ...]:
        return (self.seq, self.status, self.value)

    @classmethod
    def from_wire(cls, message: Any) -> Reply:
        if type(message) not in (tuple, list) or len(message) != 3:
            raise ProtocolError(f"a reply is a (seq, status, value) triple, not "
                                f"{_brief(message)}")
        seq, status, value = message
        if status not in STATUSES:
            raise ProtocolError(f"unknown reply status {_brief(status)}")
        return cls(_check_seq(seq, "reply"), status, value)


def _brief(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


# --------------------------------------------------------------------------- serializers


class Codec:
    """Turns messages into frame payloads and back."""

    name = ""
    #: Whether arbitrary objects (exceptions, proxies) survive the round trip.
    carries_objects = True

    def dumps(self, obj: Any) -> bytes:
        raise NotImplementedError

    def loads(self, data: Any) -> Any:
        raise NotImplementedError


class _ReusedPickler(threading.local):
    """One ForkingPickler per thread, reset per message: building one costs more than
    pickling a small request.  Rebuilt when a reducer is registered meanwhile."""

    pickler: Any = None
    buffer: Any = None
    tables = (-1, -1)
    busy = False


class PickleCodec(Codec):
    """manyproc's pickler: any picklable object, proxies included."""

    name = "pickle"

    def __init__(self) -> None:
        self._reused = _ReusedPickler()

    def dumps(self, obj: Any) -> bytes:
        reused = self._reused
        tables = (len(copyreg.dispatch_table), len(reduction.ForkingPickler._extra_reducers))
        if reused.busy:  # pickling a proxy pickles its token: a nested call
            return reduction.dumps(obj)
        if reused.pickler is None or reused.tables != tables:
            reused.buffer = io.BytesIO()
            reused.pickler = reduction.ForkingPickler(reused.buffer)
            reused.tables = tables
        buffer = reused.buffer
        reused.busy = True
        try:
            reused.pickler.dump(obj)
            return buffer.getvalue()
        except Exception:
            reused.pickler = None  # a pickler that failed mid-stream is not reused
            return reduction.dumps(obj)  # the same bytes, or an explained failure
        finally:
            reused.busy = False
            if reused.pickler is not None:
                reused.pickler.clear_memo()
                buffer.seek(0)
                buffer.truncate()

    def loads(self, data: Any) -> Any:
        return reduction.loads(data)


class XmlrpcCodec(Codec):
    """XML-RPC marshalling: None, bool, int, float, str, bytes, lists, str-keyed dicts."""

    name = "xmlrpclib"
    carries_objects = False

    def dumps(self, obj: Any) -> bytes:
        return xmlrpc.client.dumps((obj,), None, None, None, True).encode("utf-8")

    def loads(self, data: Any) -> Any:
        params, _method = xmlrpc.client.loads(bytes(data).decode("utf-8"),
                                              use_builtin_types=True)
        if len(params) != 1:
            raise ProtocolError(f"an XML-RPC message holds one value, not {len(params)}")
        return params[0]


_CODECS: dict[str, Codec] = {"pickle": PickleCodec(), "xmlrpclib": XmlrpcCodec()}


class UnknownSerializerError(ValueError, KeyError):
    """The serializer name is neither 'pickle' nor 'xmlrpclib' (a KeyError in the stdlib)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def get_codec(name: Any) -> Codec:
    """Return the codec called ``name``.

    Raises:
        UnknownSerializerError: (a ValueError and KeyError) for any other name.
    """
    try:
        return _CODECS[name]
    except (KeyError, TypeError):
        raise UnknownSerializerError(
            f"unknown serializer {name!r}: use serializer='pickle' (any picklable object) or "
            "serializer='xmlrpclib' (plain data only)") from None


# --------------------------------------------------------------------------- errors


class RemoteError(Exception):
    """A request failed in the manager's server; the message carries the server's account."""

    def __str__(self) -> str:
        rule = "-" * 75
        return f"\n{rule}\n{self.args[0] if self.args else ''}{rule}"


class RemoteTraceback(Exception):
    """The server-side traceback of an exception, attached as its ``__cause__``."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ManagerConnectionError(ConnectionError, EOFError):
    """The connection to a manager's server failed or broke (e.g. the server died).

    It is a ConnectionError and, like the standard library's error in that case,
    an EOFError.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class MessageTooLarge(OSError):
    """A frame announces more bytes than the receiver accepts."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"message of {size} bytes exceeds max_message_size={limit}")
        self.size = size
        self.limit = limit


def explain_unpicklable(value: Any, error: BaseException, root: str) -> str:
    """Say which part of ``value`` (called ``root``) cannot be pickled, and what to do."""
    try:
        found = reduction.find_unpicklable(value)
        native: BaseException = error
        if found is not None:
            try:
                pickle.dumps(found[1])
            except Exception as exc:  # the culprit's own, short complaint
                native = exc
        return reduction.explain(value, native, root)
    except Exception:
        return str(error)


def format_exception_text(exc: BaseException, skip_frames: int = 0) -> str:
    """The traceback of ``exc`` as text, without its first ``skip_frames`` frames."""
    tb = exc.__traceback__
    for _ in range(skip_frames):
        if tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def raised_from_reply(value: Any) -> BaseException:
    """Rebuild the exception of a ``raised`` reply, with the server traceback as its cause."""
    try:
        exc, type_name, message, server_tb = value
    except (TypeError, ValueError):
        return RemoteError(f"malformed error reply from the manager: {_brief(value)}\n")
    if isinstance(exc, BaseException):
        exc.__cause__ = RemoteTraceback(f"\n\"\"\"\n{server_tb}\"\"\"")
        return exc
    return RemoteError(f"{type_name}: {message}\n\n{server_tb}")


def error_from_reply(value: Any) -> RemoteError:
    """Rebuild the RemoteError of an ``error`` reply (its cause attached when it travelled)."""
    try:
        message, server_tb, cause = value
    except (TypeError, ValueError):
        return RemoteError(f"malformed error reply from the manager: {_brief(value)}\n")
    text = message if message.endswith("\n") else message + "\n"
    if server_tb:
        text += "\n" + server_tb
    error = RemoteError(text)
    if isinstance(cause, BaseException):
        error.__cause__ = cause
    return error


# --------------------------------------------------------------------------- addresses


def format_address(address: Any) -> str:
    """Show an address the way users type it."""
    if isinstance(address, (tuple, list)) and len(address) >= 2:
        host = address[0] or "0.0.0.0"
        return f"{host}:{address[1]}"
    return repr(address)


def normalize_address(address: Any) -> Any:
    """Addresses arrive as lists from XML-RPC; make them tuples again."""
    if isinstance(address, list):
        return tuple(address)
    return address


def is_loopback(address: Any) -> bool:
    """True when only this machine can reach ``address`` (a Unix socket or a loopback IP)."""
    if not isinstance(address, tuple):
        return True  # Unix socket path or abstract name
    host = address[0]
    if host in ("", "0.0.0.0", "::"):
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def _tune(sock: socket.socket) -> None:
    """Request/response traffic: no Nagle delay; keepalive so a vanished host is noticed."""
    if sock.family not in (socket.AF_INET, getattr(socket, "AF_INET6", -1)):
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 6)):
        option = getattr(socket, name, None)
        if option is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, option, value)
            except OSError:  # pragma: no cover - platform without the option
                pass


# --------------------------------------------------------------------------- channels


class PlainChannel:
    """Frames over a socket, through a :class:`manyproc.connection.Connection`."""

    def __init__(self, conn: connection.Connection) -> None:
        self.conn = conn

    @property
    def handshake_endpoint(self) -> Any:
        return self.conn

    def fileno(self) -> int:
        return self.conn.fileno()

    def send(self, payload: Any) -> None:
        _wire.write_frame(self.conn.fileno(), payload)

    def recv(self, limit: int | None) -> Any:
        fd = self.conn.fileno()
        size = _wire.read_size(fd)
        if limit is not None and size > limit:
            raise MessageTooLarge(size, limit)
        return _wire.read_payload(fd, size)

    def poll(self, timeout: float | None = 0.0) -> bool:
        return self.conn.poll(timeout)

    def shutdown(self) -> None:
        """Wake a thread blocked reading this channel (it sees end of file)."""
        try:
            with socket.socket(fileno=os.dup(self.conn.fileno())) as s:
                s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.conn.close()

    @property
    def closed(self) -> bool:
        return self.conn.closed


_HEADER = struct.Struct("!i")
_LONG_HEADER = struct.Struct("!Q")


class TLSChannel:
    """Frames over a TLS socket, in the same layout as :class:`PlainChannel`."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock

    @property
    def handshake_endpoint(self) -> Any:
        return self

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, payload: Any) -> None:
        self.sock.sendall(_wire.header_for(len(payload)) + bytes(payload))

    send_bytes = send  # what manyproc._auth calls

    def _read_exact(self, size: int, deadline: float | None, started: bool) -> bytes:
        parts = []
        have = 0
        while have < size:
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("timed out waiting for data from the peer")
                self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(min(size - have, 1 << 20))
            except TimeoutError:
                raise TimeoutError("timed out waiting for data from the peer") from None
            finally:
                if deadline is not None:
                    self.sock.settimeout(None)
            if not chunk:
                if have == 0 and not started:
                    raise EOFError("the other end of the connection was closed (end of file)")
                raise OSError(f"got end of file part-way through a message ({have} of {size} "
                              "bytes); the sender closed its end or died")
            parts.append(chunk)
            have += len(chunk)
        return b"".join(parts)

    def _read_size(self, deadline: float | None) -> int:
        (size,) = _HEADER.unpack(self._read_exact(4, deadline, False))
        if size == -1:
            (size,) = _LONG_HEADER.unpack(self._read_exact(8, deadline, True))
        elif size < 0:
            raise _wire.FrameError(f"malformed message header announcing {size} bytes")
        return size

    def recv(self, limit: int | None) -> bytes:
        size = self._read_size(None)
        if limit is not None and size > limit:
            raise MessageTooLarge(size, limit)
        return self._read_exact(size, None, True)

    def _recv_handshake(self, limit: int, deadline: float | None) -> bytes:
        """One bounded, timed handshake frame (called by manyproc._auth)."""
        size = self._read_size(deadline)
        if size > limit:
            raise AuthenticationError(f"the peer sent a {size}-byte message during the "
                                      f"authentication handshake, where at most {limit} bytes "
                                      "are expected")
        return self._read_exact(size, deadline, True)

    def poll(self, timeout: float | None = 0.0) -> bool:
        if self.sock.pending():
            return True
        return bool(connection.wait([self.sock.fileno()], timeout))

    def shutdown(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    @property
    def closed(self) -> bool:
        return self.sock.fileno() == -1


Channel = PlainChannel | TLSChannel


def _authenticate(channel: Channel, authkey: bytes, server_side: bool, timeout: float) -> None:
    endpoint = channel.handshake_endpoint
    if server_side:
        _auth.deliver_challenge(endpoint, authkey, timeout=timeout)
        _auth.answer_challenge(endpoint, authkey, timeout=timeout)
    else:
        _auth.answer_challenge(endpoint, authkey, timeout=timeout)
        _auth.deliver_challenge(endpoint, authkey, timeout=timeout)


def _wrap(sock: socket.socket, ssl_context: ssl.SSLContext | None, server_side: bool,
          server_hostname: str | None, timeout: float) -> Channel:
    if ssl_context is None:
        sock.setblocking(True)
        return PlainChannel(connection.Connection(sock.detach()))
    sock.settimeout(timeout)
    try:
        tls = ssl_context.wrap_socket(sock, server_side=server_side,
                                      server_hostname=None if server_side else server_hostname)
    except BaseException:
        sock.close()
        raise
    tls.settimeout(None)
    return TLSChannel(tls)


def connect(address: Any, authkey: bytes, *, ssl_context: ssl.SSLContext | None = None,
            timeout: float = HANDSHAKE_TIMEOUT) -> Channel:
    """Open an authenticated (and, with ``ssl_context``, encrypted) channel to a server.

    Raises:
        ConnectionRefusedError, FileNotFoundError: nothing listens at ``address``.
        AuthenticationError: the server holds a different authkey.
        ssl.SSLError: the TLS handshake failed (certificate not trusted...).
    """
    family = connection.address_type(address)
    sock = socket.socket(getattr(socket, family))
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except OSError as exc:
            if exc.errno is None:
                raise
            raise type(exc)(exc.errno, f"no manager is listening at {format_address(address)} "
                            f"({exc.strerror}): start it first (manager.start(), or "
                            "get_server().serve_forever() in the serving program) or check the "
                            "address") from None
        _tune(sock)
        host = address[0] if isinstance(address, tuple) else None
        channel = _wrap(sock, ssl_context, False, host, timeout)
    except BaseException:
        sock.close()
        raise
    try:
        _authenticate(channel, authkey, False, timeout)
    except BaseException:
        channel.close()
        raise
    return channel


def secure_accepted(sock: socket.socket, authkey: bytes, *,
                    ssl_context: ssl.SSLContext | None, timeout: float) -> Channel:
    """Run the server side of the handshake on an accepted socket; return the channel."""
    _tune(sock)
    channel = _wrap(sock, ssl_context, True, None, timeout)
    try:
        _authenticate(channel, authkey, True, timeout)
    except BaseException:
        channel.close()
        raise
    return channel


class ServerSocket:
    """The listening socket of a manager's server."""

    def __init__(self, address: Any, backlog: int = 16) -> None:
        family = connection.address_type(address) if address is not None \
            else connection.default_family
        if address is None:
            address = connection.arbitrary_address(family)
        self._socket = socket.socket(getattr(socket, family))
        try:
            if os.name == "posix":
                self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._socket.bind(address)
            self._socket.listen(backlog)
        except OSError as exc:
            self._socket.close()
            if exc.errno is None:
                raise
            raise type(exc)(exc.errno, f"a manager cannot listen on {format_address(address)}: "
                            f"{exc.strerror}") from None
        self.address = self._socket.getsockname()
        self._path = address if family == "AF_UNIX" and isinstance(address, str) \
            and not address.startswith("\0") else None
        self._unlink: util.Finalize | None = None
        if self._path is not None:
            self._unlink = util.Finalize(self, _unlink_quietly, args=(self._path,),
                                         exitpriority=0)

    def fileno(self) -> int:
        return self._socket.fileno()

    def accept(self) -> socket.socket:
        sock, _peer = self._socket.accept()
        return sock

    @property
    def closed(self) -> bool:
        return self._socket.fileno() == -1

    def close(self) -> None:
        """Stop listening; a thread blocked in :meth:`accept` gets an OSError."""
        try:
            self._socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._socket.close()
        unlink, self._unlink = self._unlink, None
        if unlink is not None:
            unlink()


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def call_quietly(fn: Callable[..., Any], *args: Any) -> None:
    """Call ``fn``; ignore any error (cleanup paths that must not raise)."""
    try:
        fn(*args)
    except Exception:
        pass
