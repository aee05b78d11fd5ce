"""The HMAC challenge that proves both ends of a connection hold the same authkey.

Both ends run it, one after the other, before any payload is unpickled::

    challenger (deliver_challenge)             answerer (answer_challenge)
    ------------------------------             ---------------------------
    send  #CHALLENGE#{sha256}<40 random>  -->
                                          <--  send  {sha256}HMAC(key, challenge)
    check it, send #WELCOME# / #FAILURE#  -->  check for #WELCOME#

A Listener challenges first and answers second; a Client does the reverse.

Two dialects exist and manyproc speaks both, so it interoperates with the standard
library of every Python version:

* modern (Python >= 3.12): the challenge carries a ``{digest}`` prefix naming the
  hash, and the answer is ``{digest}`` + MAC.  manyproc challenges this way.
* legacy (Python <= 3.11): the challenge is exactly 20 random bytes and the answer
  a bare 16-byte HMAC-MD5.  A 20-byte challenge or a 16-byte answer marks a legacy
  peer; manyproc answers and accepts it (the MAC still covers the whole challenge).

Every message of the handshake is at most :data:`MAX_MESSAGE` bytes and must arrive
before a deadline, so a peer that sends garbage, a huge frame or nothing at all gets
an :class:`~manyproc.AuthenticationError`, never a hang or an allocation.
"""

from __future__ import annotations

import hmac
import os
import time

from ._errors import AuthenticationError

TYPE_CHECKING = False  # typing costs import time in every child; only checkers need it
if TYPE_CHECKING:
    from typing import Any

__all__ = ["deliver_challenge", "answer_challenge", "MAX_MESSAGE"]

CHALLENGE = b"#CHALLENGE#"
WELCOME = b"#WELCOME#"
FAILURE = b"#FAILURE#"

NONCE_SIZE = 40            # random bytes in a modern challenge (must exceed 20)
LEGACY_NONCE_SIZE = 20     # a legacy challenge is exactly this long
LEGACY_MAC_SIZE = 16       # a legacy answer is a bare HMAC-MD5
MAX_MESSAGE = 256          # no handshake message is longer
DIGESTS = frozenset({"md5", "sha256", "sha384", "sha3_256", "sha3_384"})
_LONGEST_DIGEST_NAME = max(len(d) for d in DIGESTS)

_KEY_ADVICE = ("both ends must use the same authkey: a child inherits "
               "current_process().authkey, any other program must be given the same bytes "
               "(Listener(authkey=...) and Client(authkey=...))")


def _check_key(authkey: Any) -> None:
    if not isinstance(authkey, bytes):
        raise ValueError(
            f"authkey must be bytes, not {type(authkey).__name__} ({authkey!r:.40}); "
            "encode a text key first, e.g. key.encode()")


def _recv(conn: Any, deadline: float | None, expecting: str) -> bytes:
    """Receive one handshake message, bounded in size and time."""
    receive = getattr(conn, "_recv_handshake", None)
    try:
        if receive is not None:
            return receive(MAX_MESSAGE, deadline)
        return conn.recv_bytes(MAX_MESSAGE)
    except TimeoutError:
        raise AuthenticationError(
            f"the peer did not send {expecting} in time: it probably has no authkey while "
            "this side has one (give both ends an authkey, or neither), or it is not a "
            "manyproc/multiprocessing Listener or Client") from None
    except (EOFError, OSError) as exc:
        # The connection itself failed: keep the standard type (callers tell a lost
        # peer from a wrong key by it), but say where it happened.
        if hasattr(exc, "add_note"):
            exc.add_note(f"(the connection ended during the authentication handshake, while "
                         f"waiting for {expecting})")
        raise


def split_digest(message: bytes) -> tuple[str, bytes]:
    """Return ``(digest_name, payload)`` of a challenge or answer; ``''`` marks legacy MD5."""
    if len(message) in (LEGACY_NONCE_SIZE, LEGACY_MAC_SIZE):
        return "", message
    if message.startswith(b"{"):
        end = message.find(b"}", 1, _LONGEST_DIGEST_NAME + 2)
        if end > 0:
            name = message[1:end].decode("ascii", "replace")
            if name in DIGESTS:
                return name, message[end + 1:]
    raise AuthenticationError(
        f"the peer's handshake message ({len(message)} bytes, starting {message[:24]!r}) has "
        f"no supported {{digest}} prefix ({', '.join(sorted(DIGESTS))}) and is not a legacy "
        "MD5 message; the peer speaks an unknown protocol version or is not a "
        "multiprocessing peer")


def make_answer(authkey: bytes, challenge: bytes) -> bytes:
    """Compute the answer to ``challenge`` (the bytes after ``#CHALLENGE#``)."""
    name = split_digest(challenge)[0]
    if not name:
        try:
            return hmac.new(authkey, challenge, "md5").digest()
        except ValueError:  # MD5 disabled (FIPS): answer in the modern form, it may be accepted
            name = "sha256"
    return b"{" + name.encode("ascii") + b"}" + hmac.new(authkey, challenge, name).digest()


def check_answer(authkey: bytes, challenge: bytes, answer: bytes) -> None:
    """Raise AuthenticationError unless ``answer`` proves knowledge of ``authkey``."""
    name, mac = split_digest(answer)
    name = name or "md5"
    try:
        expected = hmac.new(authkey, challenge, name).digest()
    except ValueError:
        raise AuthenticationError(
            f"the peer answered with HMAC-{name}, which this Python cannot compute "
            "(disabled by a FIPS policy?)") from None
    if len(mac) != len(expected) or not hmac.compare_digest(mac, expected):
        raise AuthenticationError(
            f"the peer's answer to our challenge was wrong (HMAC-{name}): it holds a "
            f"different authkey; {_KEY_ADVICE}")


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def deliver_challenge(connection: Any, authkey: bytes, digest_name: str = "sha256", *,
                      timeout: float | None = None) -> None:
    """Challenge the peer to prove it holds ``authkey``; welcome it or refuse it.

    Args:
        connection: a Connection (or any object with ``send_bytes``/``recv_bytes``).
        authkey: the shared secret.
        digest_name: the hash to ask for; one of md5, sha256, sha384, sha3_256, sha3_384.
        timeout: seconds to wait for the answer (``None``: wait for ever).

    Raises:
        AuthenticationError: the answer was wrong, malformed or late.
    """
    _check_key(authkey)
    if digest_name not in DIGESTS:
        raise ValueError(f"digest_name {digest_name!r} is not one of {sorted(DIGESTS)}")
    deadline = _deadline(timeout)
    challenge = b"{" + digest_name.encode("ascii") + b"}" + os.urandom(NONCE_SIZE)
    connection.send_bytes(CHALLENGE + challenge)
    answer = _recv(connection, deadline, "an answer to our authentication challenge")
    try:
        check_answer(authkey, challenge, answer)
    except AuthenticationError:
        try:
            connection.send_bytes(FAILURE)
        except OSError:
            pass
        raise
    connection.send_bytes(WELCOME)


def answer_challenge(connection: Any, authkey: bytes, *, timeout: float | None = None) -> None:
    """Prove to the peer that this side holds ``authkey`` by answering its challenge.

    Raises:
        AuthenticationError: no valid challenge arrived in time, or the peer refused
            the answer (a different authkey).
    """
    _check_key(authkey)
    deadline = _deadline(timeout)
    message = _recv(connection, deadline, "an authentication challenge")
    if not message.startswith(CHALLENGE):
        raise AuthenticationError(
            f"expected an authentication challenge but the peer sent {len(message)} bytes "
            f"starting {message[:24]!r}: the peer has no authkey while this side has one "
            "(give both ends an authkey, or neither), or it is not a manyproc/multiprocessing "
            "Listener or Client")
    challenge = message[len(CHALLENGE):]
    if len(challenge) < LEGACY_NONCE_SIZE:
        raise AuthenticationError(
            f"the peer's authentication challenge is too short ({len(challenge)} bytes, at "
            f"least {LEGACY_NONCE_SIZE} expected); it is not a multiprocessing peer")
    connection.send_bytes(make_answer(authkey, challenge))
    reply = _recv(connection, deadline, "the verdict on our answer")
    if reply != WELCOME:
        raise AuthenticationError(
            f"the peer rejected our answer to its authentication challenge (it replied "
            f"{reply[:24]!r}); {_KEY_ADVICE}")
