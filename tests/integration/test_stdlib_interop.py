"""manyproc's connections speak the standard library's wire format and handshakes.

The Python running the tests (3.11: the legacy HMAC-MD5 handshake) is checked in
threads; other installed Pythons (3.12+: the ``{sha256}`` handshake) in subprocesses.
"""

from __future__ import annotations

import glob
import multiprocessing.connection as std
import os
import shutil
import subprocess
import sys
import textwrap
import threading

import pytest

from manyproc import connection as ours
from manyproc._errors import AuthenticationError

pytestmark = pytest.mark.timeout(60)

KEY = b"interop key"


def in_thread(fn, *args):
    box = {}

    def target():
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()

    def result():
        t.join(20)
        assert not t.is_alive()
        if "error" in box:
            raise box["error"]
        return box.get("value")

    return result


def serve_one(listener):
    with listener.accept() as conn:
        msg = conn.recv()
        conn.send(("echo", msg))
        conn.send_bytes(conn.recv_bytes() * 2)


def talk(conn):
    with conn:
        conn.send({"from": "client"})
        assert conn.recv() == ("echo", {"from": "client"})
        conn.send_bytes(b"ab" * 50_000)
        assert conn.recv_bytes() == b"ab" * 100_000


@pytest.mark.parametrize("family", ["AF_UNIX", "AF_INET"])
@pytest.mark.parametrize("authkey", [KEY, None])
def test_our_client_with_stdlib_listener(family, authkey):
    with std.Listener(family=family, authkey=authkey) as listener:
        served = in_thread(serve_one, listener)
        talk(ours.Client(listener.address, authkey=authkey))
        served()


@pytest.mark.parametrize("family", ["AF_UNIX", "AF_INET"])
@pytest.mark.parametrize("authkey", [KEY, None])
def test_stdlib_client_with_our_listener(family, authkey):
    with ours.Listener(family=family, authkey=authkey) as listener:
        served = in_thread(serve_one, listener)
        talk(std.Client(listener.address, authkey=authkey))
        served()


def test_wrong_key_between_stdlib_and_us_fails_on_both_sides():
    with std.Listener(authkey=KEY) as listener:
        accepted = in_thread(listener.accept)
        with pytest.raises(AuthenticationError):
            ours.Client(listener.address, authkey=b"wrong")
        with pytest.raises(std.AuthenticationError):
            accepted()
    with ours.Listener(authkey=KEY) as listener:
        accepted = in_thread(listener.accept)
        with pytest.raises(std.AuthenticationError):
            std.Client(listener.address, authkey=b"wrong")
        with pytest.raises(AuthenticationError):
            accepted()


def test_frames_are_interchangeable_on_a_pipe():
    a, b = ours.Pipe()
    theirs = std.Connection(os.dup(b.fileno()))
    b.close()
    with a, theirs:
        for payload in (b"", b"small", os.urandom(200_000)):
            a.send_bytes(payload)
            assert theirs.recv_bytes() == payload
            theirs.send_bytes(payload)
            assert a.recv_bytes() == payload
        a.send([1, "two", 3.0])
        assert theirs.recv() == [1, "two", 3.0]
        theirs.send({"k": (1, 2)})
        assert a.recv() == {"k": (1, 2)}


def test_stdlib_handshake_functions_against_ours():
    a, b = ours.Pipe()
    theirs = std.Connection(os.dup(b.fileno()))
    b.close()
    with a, theirs:
        challenger = in_thread(ours.deliver_challenge, a, KEY)
        std.answer_challenge(theirs, KEY)
        challenger()
        challenger = in_thread(std.deliver_challenge, theirs, KEY)
        ours.answer_challenge(a, KEY)
        challenger()


# --------------------------------------------------------------------------- other Pythons

def _candidates():
    """Pythons 3.12+ on PATH or in a pyenv installation (CI images often have several)."""
    found = set()
    for minor in (12, 13, 14):
        found.add(shutil.which(f"python3.{minor}"))
        found.update(glob.glob(os.path.expanduser(f"~/.pyenv/versions/3.{minor}.*/bin/python3")))
    return {p for p in found
            if p and os.path.realpath(p) != os.path.realpath(sys.executable)}


OTHER_PYTHONS = _candidates()


def _runs(python):
    try:
        out = subprocess.run([python, "-c", "import sys; print(sys.version_info[:2] >= (3, 12))"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.stdout.strip() == "True"


MODERN = [p for p in sorted(OTHER_PYTHONS) if _runs(p)]

PEER = textwrap.dedent("""
    import sys
    from multiprocessing import connection
    mode, address, key = sys.argv[1], sys.argv[2], sys.argv[3].encode()
    if mode == "client":
        with connection.Client(address, authkey=key) as c:
            c.send_bytes(c.recv_bytes() + b" back")
    else:
        with connection.Listener(address, authkey=key) as listener:
            print("listening", flush=True)
            with listener.accept() as c:
                c.send_bytes(b"from " + sys.version.split()[0].encode())
                print(c.recv_bytes().decode(), flush=True)
""")


@pytest.mark.skipif(not MODERN, reason="no Python >= 3.12 installed besides this one")
@pytest.mark.parametrize("python", MODERN)
def test_modern_stdlib_client_with_our_listener(python, tmp_path):
    script = tmp_path / "peer.py"
    script.write_text(PEER)
    with ours.Listener(authkey=KEY) as listener:
        proc = subprocess.Popen([python, str(script), "client", listener.address, KEY.decode()])
        try:
            with listener.accept() as conn:
                conn.send_bytes(b"hello")
                assert conn.recv_bytes() == b"hello back"
        finally:
            assert proc.wait(30) == 0


@pytest.mark.skipif(not MODERN, reason="no Python >= 3.12 installed besides this one")
@pytest.mark.parametrize("python", MODERN)
def test_our_client_with_modern_stdlib_listener(python, tmp_path):
    script = tmp_path / "peer.py"
    script.write_text(PEER)
    address = str(tmp_path / "sock")
    proc = subprocess.Popen([python, str(script), "server", address, KEY.decode()],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "listening"
        with ours.Client(address, authkey=KEY) as conn:
            assert conn.recv_bytes().startswith(b"from 3.1")
            conn.send_bytes(b"reply")
        assert proc.stdout.readline().strip() == "reply"
    finally:
        assert proc.wait(30) == 0
        proc.stdout.close()


@pytest.mark.skipif(not MODERN, reason="no Python >= 3.12 installed besides this one")
def test_modern_stdlib_refuses_our_wrong_key(tmp_path):
    script = tmp_path / "peer.py"
    script.write_text(PEER)
    address = str(tmp_path / "sock")
    proc = subprocess.Popen([MODERN[0], str(script), "server", address, KEY.decode()],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "listening"
        with pytest.raises(AuthenticationError, match="rejected"):
            ours.Client(address, authkey=b"wrong")
    finally:
        proc.wait(30)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode != 0
