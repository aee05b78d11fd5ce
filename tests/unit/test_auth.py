"""The HMAC handshake: both dialects, every digest, wrong and missing keys, hostile peers."""

from __future__ import annotations

import hmac
import os
import socket
import struct
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from manyproc import _auth, connection
from manyproc._errors import AuthenticationError
from manyproc.connection import Client, Connection, Listener, Pipe

pytestmark = pytest.mark.timeout(30)

KEY = b"the shared secret"


def run_in_thread(fn, *args, **kwargs):
    """Run fn in a thread; return a function that joins it and returns or raises its result."""
    box = {}

    def target():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box["error"] = exc

    t = threading.Thread(target=target)
    t.start()

    def result(timeout=10):
        t.join(timeout)
        assert not t.is_alive(), "thread did not finish"
        if "error" in box:
            raise box["error"]
        return box.get("value")

    return result


@pytest.mark.parametrize("digest", sorted(_auth.DIGESTS))
def test_challenge_and_answer_agree_for_every_digest(digest):
    a, b = Pipe()
    with a, b:
        server = run_in_thread(_auth.deliver_challenge, a, KEY, digest, timeout=5)
        _auth.answer_challenge(b, KEY, timeout=5)
        server()


def test_modern_challenge_format():
    a, b = Pipe()
    with a, b:
        server = run_in_thread(_auth.deliver_challenge, a, KEY, timeout=5)
        message = b.recv_bytes()
        assert message.startswith(b"#CHALLENGE#{sha256}")
        nonce = message[len(b"#CHALLENGE#"):]
        assert len(nonce) == len(b"{sha256}") + 40
        b.send_bytes(b"{sha256}" + hmac.new(KEY, nonce, "sha256").digest())
        assert b.recv_bytes() == b"#WELCOME#"
        server()


def test_legacy_challenge_gets_a_bare_md5_answer():
    """A Python <= 3.11 Listener sends 20 random bytes and expects raw HMAC-MD5."""
    a, b = Pipe()
    with a, b:
        client = run_in_thread(_auth.answer_challenge, b, KEY, timeout=5)
        nonce = os.urandom(20)
        a.send_bytes(b"#CHALLENGE#" + nonce)
        answer = a.recv_bytes()
        assert answer == hmac.new(KEY, nonce, "md5").digest()
        a.send_bytes(b"#WELCOME#")
        client()


def test_legacy_md5_answer_to_a_modern_challenge_is_accepted():
    """A Python <= 3.11 Client answers any challenge with raw HMAC-MD5 over all of it."""
    a, b = Pipe()
    with a, b:
        server = run_in_thread(_auth.deliver_challenge, a, KEY, timeout=5)
        challenge = b.recv_bytes()[len(b"#CHALLENGE#"):]
        b.send_bytes(hmac.new(KEY, challenge, "md5").digest())
        assert b.recv_bytes() == b"#WELCOME#"
        server()


def test_stronger_digest_in_answer_is_accepted():
    a, b = Pipe()
    with a, b:
        server = run_in_thread(_auth.deliver_challenge, a, KEY, timeout=5)
        challenge = b.recv_bytes()[len(b"#CHALLENGE#"):]
        b.send_bytes(b"{sha384}" + hmac.new(KEY, challenge, "sha384").digest())
        assert b.recv_bytes() == b"#WELCOME#"
        server()


@pytest.mark.parametrize("answer", [
    b"{sha256}" + b"\0" * 32,          # right form, wrong MAC
    b"{sha256}" + b"\0" * 10,          # wrong length
    b"{whirlpool}" + b"\0" * 32,       # unsupported digest
    b"no prefix at all, 33 bytes long!!",
])
def test_bad_answers_are_refused_with_failure(answer):
    a, b = Pipe()
    with a, b:
        server = run_in_thread(_auth.deliver_challenge, a, KEY, timeout=5)
        b.recv_bytes()
        b.send_bytes(answer)
        assert b.recv_bytes() == b"#FAILURE#"
        with pytest.raises(AuthenticationError):
            server()


def test_wrong_key_fails_on_both_sides_with_advice():
    a, b = Pipe()
    with a, b:
        server = run_in_thread(_auth.deliver_challenge, a, KEY, timeout=5)
        with pytest.raises(AuthenticationError, match="rejected our answer.*same authkey"):
            _auth.answer_challenge(b, b"another key", timeout=5)
        with pytest.raises(AuthenticationError, match="different authkey"):
            server()


def test_authkey_must_be_bytes():
    a, b = Pipe()
    with a, b:
        with pytest.raises(ValueError, match="authkey must be bytes, not str.*encode"):
            _auth.deliver_challenge(a, "text")
        with pytest.raises(ValueError, match="authkey must be bytes"):
            _auth.answer_challenge(a, 123)
        with pytest.raises(ValueError, match="digest_name"):
            _auth.deliver_challenge(a, KEY, "crc32")


def test_silent_peer_times_out_instead_of_hanging():
    a, b = Pipe()
    with a, b:
        start = time.monotonic()
        with pytest.raises(AuthenticationError, match="did not send an authentication challenge"):
            _auth.answer_challenge(b, KEY, timeout=0.2)
        assert time.monotonic() - start < 5


def test_peer_lost_during_handshake_keeps_its_standard_type():
    a, b = Pipe()
    with a:
        b.close()
        with pytest.raises(EOFError) as info:
            _auth.answer_challenge(a, KEY, timeout=5)
    notes = getattr(info.value, "__notes__", [])
    assert not notes or "during the authentication handshake" in notes[0]


def test_oversized_handshake_message_is_refused_unread():
    a, b = Pipe()
    with a, b:
        a.send_bytes(b"#CHALLENGE#" + b"x" * 10_000)
        with pytest.raises(AuthenticationError, match="10011-byte message.*at most 256"):
            _auth.answer_challenge(b, KEY, timeout=5)


def test_non_challenge_message_is_refused():
    a, b = Pipe()
    with a, b:
        a.send(("hello", "world"))
        with pytest.raises(AuthenticationError, match="expected an authentication challenge"):
            _auth.answer_challenge(b, KEY, timeout=5)


def test_too_short_challenge_is_refused():
    a, b = Pipe()
    with a, b:
        a.send_bytes(b"#CHALLENGE#short")
        with pytest.raises(AuthenticationError, match="too short"):
            _auth.answer_challenge(b, KEY, timeout=5)


# --------------------------------------------------------------------------- Listener/Client


@pytest.fixture(params=["AF_UNIX", "AF_INET"])
def family(request):
    return request.param


def test_listener_and_client_authenticate(family):
    with Listener(family=family, authkey=KEY) as listener:
        accepted = run_in_thread(listener.accept)
        with Client(listener.address, authkey=KEY) as client:
            with accepted() as server_end:
                client.send({"n": 1})
                assert server_end.recv() == {"n": 1}


def test_listener_keeps_serving_after_a_wrong_key(family):
    with Listener(family=family, authkey=KEY) as listener:
        first = run_in_thread(listener.accept)
        with pytest.raises(AuthenticationError):
            Client(listener.address, authkey=b"wrong")
        with pytest.raises(AuthenticationError, match="different authkey"):
            first()
        second = run_in_thread(listener.accept)
        with Client(listener.address, authkey=KEY) as client, second() as server_end:
            server_end.send("still serving")
            assert client.recv() == "still serving"


def test_client_without_key_gets_advice_instead_of_garbage():
    with Listener(authkey=KEY, handshake_timeout=5) as listener:
        accepted = run_in_thread(listener.accept)
        with Client(listener.address) as client:
            with pytest.raises(AuthenticationError, match="requires authentication.*authkey="):
                client.recv()
        with pytest.raises(EOFError):  # the client left without answering: a lost peer
            accepted()


def test_client_with_key_against_listener_without_one_times_out():
    with Listener() as listener:
        accepted = run_in_thread(listener.accept)
        with pytest.raises(AuthenticationError, match="did not send an authentication challenge"):
            Client(listener.address, authkey=KEY, handshake_timeout=0.3)
        accepted().close()


def test_listener_does_not_wait_for_ever_on_a_silent_client():
    with Listener(authkey=KEY, handshake_timeout=0.3) as listener:
        accepted = run_in_thread(listener.accept)
        with socket.socket(socket.AF_UNIX) as silent:
            silent.connect(listener.address)
            with pytest.raises(AuthenticationError, match="did not send an answer"):
                accepted()


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(garbage=st.binary(max_size=400), keep_open=st.booleans())
def test_random_bytes_before_auth_are_never_unpickled_and_never_hang(monkeypatch, garbage,
                                                                       keep_open):
    def forbidden(*args, **kwargs):
        raise AssertionError("data was unpickled before authentication")

    monkeypatch.setattr(connection, "_loads", forbidden)
    monkeypatch.setattr("pickle.loads", forbidden)
    for side in ("listener", "client"):
        a, b = socket.socketpair()
        conn = Connection(a.detach())
        peer_bytes = garbage
        if side == "client":
            # A peer that announces a challenge of random content.
            peer_bytes = struct.pack("!i", len(garbage) + 11) + b"#CHALLENGE#" + garbage
        b.sendall(peer_bytes)
        if not keep_open:
            b.shutdown(socket.SHUT_WR)
        start = time.monotonic()
        try:
            if side == "listener":
                _auth.deliver_challenge(conn, KEY, timeout=0.05)
            else:
                _auth.answer_challenge(conn, KEY, timeout=0.05)
        except (AuthenticationError, EOFError, OSError):
            pass  # refused, or the peer's stream ended (a lost peer keeps its own type)
        else:  # pragma: no cover - forging an HMAC by chance
            raise AssertionError("random bytes passed authentication")
        finally:
            conn.close()
            b.close()
        assert time.monotonic() - start < 5
