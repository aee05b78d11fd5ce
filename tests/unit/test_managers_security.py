"""A manager's server under hostile or broken peers: authentication, bounds, fuzzing, TLS.

The server must authenticate every connection (HMAC, both ways) before it decodes
a single byte, refuse oversized messages, survive garbage before and after the
handshake, and go on serving the well-behaved clients throughout.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from manyproc import AuthenticationError, _auth, connection
from manyproc import _manager_wire as wire
from manyproc.managers import RemoteError, SyncManager
from tests.unit.test_managers_fixtures import KEY, ThreadedServer, make_certificate

pytestmark = pytest.mark.timeout(60)


class CountingCodec(wire.Codec):
    """Wraps the server's codec to count every decode."""

    def __init__(self, inner: wire.Codec) -> None:
        self.inner = inner
        self.name = inner.name
        self.carries_objects = inner.carries_objects
        self.decoded = 0
        self.lock = threading.Lock()

    def dumps(self, obj):
        return self.inner.dumps(obj)

    def loads(self, data):
        with self.lock:
            self.decoded += 1
        return self.inner.loads(data)


@pytest.fixture(scope="module")
def served():
    server = ThreadedServer(SyncManager, address=("127.0.0.1", 0))
    server.server.handshake_timeout = 0.5
    server.server.codec = CountingCodec(server.server.codec)
    yield server
    server.close()


def still_serving(served):
    shared = served.connect().list([1])
    assert shared[:] == [1]


def raw_socket(served) -> socket.socket:
    sock = socket.create_connection(served.address, timeout=5)
    return sock


def frame(payload: bytes) -> bytes:
    return struct.pack("!i", len(payload)) + payload


def authenticated(served) -> wire.PlainChannel:
    """A channel that passed the handshake, as a real client does."""
    return wire.connect(served.address, KEY)


def test_wrong_key_is_refused_and_the_server_goes_on(served):
    with pytest.raises(AuthenticationError):
        SyncManager(address=served.address, authkey=b"not the key").connect()
    still_serving(served)


def test_client_without_key_handshake_is_refused(served):
    with connection.Client(served.address) as conn:  # no authkey: sends a request at once
        with pytest.raises((AuthenticationError, EOFError, OSError)):
            conn.send_bytes(b"hello?")
            conn.recv_bytes()
    still_serving(served)


def test_a_fake_server_cannot_fool_a_client():
    """The client challenges the server too: a listener without the key is caught."""
    with connection.Listener(("127.0.0.1", 0), authkey=b"other key") as listener:
        thread = threading.Thread(target=lambda: _swallow(listener.accept), daemon=True)
        thread.start()
        with pytest.raises(AuthenticationError):
            SyncManager(address=listener.address, authkey=KEY).connect()
        thread.join(5)


def _swallow(fn):
    try:
        fn()
    except Exception:
        pass


def test_nothing_is_decoded_before_authentication(served):
    codec = served.server.codec
    before = codec.decoded
    for garbage in (b"", b"\x00\x00\x00\x05hello", frame(b"x" * 10_000), b"\xff" * 4,
                    frame(b"#CHALLENGE#" + b"a" * 40)):
        with raw_socket(served) as sock:
            sock.sendall(garbage)
            sock.shutdown(socket.SHUT_WR)
            _drain(sock)
    assert codec.decoded == before
    still_serving(served)


def _drain(sock):
    sock.settimeout(5)
    try:
        while sock.recv(4096):
            pass
    except OSError:
        pass


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=600), cut=st.integers(min_value=0, max_value=600),
       framed=st.booleans())
def test_random_bytes_before_authentication(served, data, cut, framed):
    codec = served.server.codec
    before = codec.decoded
    payload = frame(data) if framed else data
    with raw_socket(served) as sock:
        sock.settimeout(5)
        try:
            sock.recv(256)  # the server's challenge
            sock.sendall(payload[:cut] if cut < len(payload) else payload)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        _drain(sock)
    assert codec.decoded == before  # not a single byte was unpickled
    assert served.thread.is_alive()


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payloads=st.lists(st.binary(max_size=300), min_size=1, max_size=4),
       truncate=st.booleans(), hello_first=st.booleans())
def test_random_frames_after_authentication(served, payloads, truncate, hello_first):
    channel = authenticated(served)
    try:
        if hello_first:
            hello = wire.Request(1, "hello", (None, "fuzzer"))
            channel.send(served.server.codec.dumps(hello.to_wire()))
            assert wire.Reply.from_wire(served.server.codec.loads(channel.recv(None))).status \
                == "ok"
        fd = channel.fileno()
        for payload in payloads:
            data = frame(payload)
            if truncate:
                data = data[: max(1, len(data) // 2)]
            try:
                with socket.socket(fileno=_dup(fd)) as sock:
                    sock.sendall(data)
            except OSError:
                break
            if truncate:
                break
    finally:
        channel.close()
    assert served.thread.is_alive()
    still_serving(served)


def _dup(fd):
    import os

    return os.dup(fd)


def test_garbage_after_hello_gets_an_error_reply_and_the_connection_goes_on(served):
    channel = authenticated(served)
    try:
        codec = served.server.codec
        channel.send(codec.dumps(wire.Request(1, "hello", (None, "t")).to_wire()))
        assert wire.Reply.from_wire(codec.loads(channel.recv(None))).status == "ok"
        for junk in (b"not a pickle", codec.dumps(("a", "b")), codec.dumps((1, "nope", ())),
                     codec.dumps((2, "call", ("x:1",) * 9))):
            channel.send(junk)
            reply = wire.Reply.from_wire(codec.loads(channel.recv(None)))
            assert reply.status == "error"
        channel.send(codec.dumps(wire.Request(9, "ping", ()).to_wire()))
        assert wire.Reply.from_wire(codec.loads(channel.recv(None))) == wire.Reply(9, "ok", None)
    finally:
        channel.close()


def test_requests_before_hello_are_refused(served):
    channel = authenticated(served)
    try:
        codec = served.server.codec
        channel.send(codec.dumps(wire.Request(1, "count", ()).to_wire()))
        reply = wire.Reply.from_wire(codec.loads(channel.recv(None)))
        assert reply.status == "error" and "hello" in reply.value[0]
        with pytest.raises((EOFError, OSError)):
            channel.recv(None)  # and the connection is closed
    finally:
        channel.close()


def test_a_silent_peer_is_dropped_after_the_handshake_timeout(served):
    with raw_socket(served) as sock:
        sock.settimeout(10)
        sock.recv(256)  # the challenge; then say nothing
        assert sock.recv(256) == b""  # the server hung up (0.5 s handshake_timeout)
    still_serving(served)


def test_oversized_messages_are_refused_and_the_server_goes_on():
    server = ThreadedServer(SyncManager, max_message_size=10_000)
    try:
        manager = server.connect()
        shared = manager.list()
        with pytest.raises(RemoteError) as info:
            shared.append("x" * 20_000)
        text = str(info.value)
        assert "max_message_size=10000" in text and "refused" in text
        shared.append("small")  # the next call opens a fresh connection
        assert shared[:] == ["small"]
    finally:
        server.close()


def test_the_size_bound_comes_before_the_allocation():
    """A header announcing a huge message is refused without reading (or allocating) it."""
    server = ThreadedServer(SyncManager, max_message_size=1000)
    try:
        channel = wire.connect(server.address, KEY)
        codec = server.server.codec
        channel.send(codec.dumps(wire.Request(1, "hello", (None, "t")).to_wire()))
        codec.loads(channel.recv(None))
        with socket.socket(fileno=_dup(channel.fileno())) as sock:
            sock.sendall(struct.pack("!i", -1) + struct.pack("!Q", 1 << 40))
        reply = wire.Reply.from_wire(codec.loads(channel.recv(None)))
        assert reply.seq == -1 and "max_message_size=1000" in reply.value[0]
        channel.close()
        assert server.connect().list([2])[:] == [2]
    finally:
        server.close()


def test_handshake_frames_are_bounded(served):
    with raw_socket(served) as sock:
        sock.settimeout(5)
        sock.recv(256)
        sock.sendall(struct.pack("!i", 1 << 30))  # an "answer" of 1 GiB
        _drain(sock)
    still_serving(served)


# --------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    pem = make_certificate(tmp_path_factory.mktemp("tls"))
    if pem is None:
        pytest.skip("needs the openssl command to make a test certificate")
    return pem


def server_context(pem):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pem)
    return context


def test_tls_manager(certificate):
    server = ThreadedServer(SyncManager, address=("127.0.0.1", 0),
                            ssl_context=server_context(certificate))
    try:
        client_context = ssl.create_default_context(cafile=str(certificate))
        manager = server.connect(ssl_context=client_context)
        shared = manager.dict(secret="over TLS")
        assert shared["secret"] == "over TLS"
        link = manager._client()._session
        assert isinstance(link.channel, wire.TLSChannel)
        assert link.channel.sock.version() is not None
        # A client without TLS cannot talk to it, and the server goes on.
        plain = wire.connect  # the raw handshake over a plain socket
        with pytest.raises((AuthenticationError, OSError, EOFError)):
            plain(server.address, KEY, timeout=2)
        # A client that does not trust the certificate refuses the server.
        with pytest.raises(ssl.SSLError):
            wire.connect(server.address, KEY, ssl_context=ssl.create_default_context())
        assert shared["secret"] == "over TLS"
    finally:
        server.close()


def test_tls_context_checks(certificate):
    client_context = ssl.create_default_context(cafile=str(certificate))
    with pytest.raises(ValueError, match="server-side"):
        SyncManager(address=("127.0.0.1", 0), authkey=KEY,
                    ssl_context=client_context).get_server()
    # A server-only context: the manager's own proxies need a client one as well.
    owner = SyncManager(address=("127.0.0.1", 0), authkey=KEY,
                        ssl_context=server_context(certificate))
    server = owner.get_server()
    server.listener.close()
    assert owner._client_ssl() is None


def test_auth_module_refuses_oversized_handshake():
    left, right = connection.Pipe()
    right.send_bytes(b"x" * 1000)
    with pytest.raises(AuthenticationError):
        _auth.answer_challenge(left, KEY, timeout=1)
    left.close()
    right.close()
