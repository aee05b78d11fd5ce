"""A manager served over TCP to separately started programs, as across machines.

The server and the workers are the scripts in ``examples/``, each run as its own
OS process (``python examples/remote_manager_server.py`` ...), exactly as a user
starts them from different terminals or hosts.  Where the machine allows network
namespaces, one test puts the server and the worker in two namespaces joined by
a veth pair, so that the traffic crosses a real network interface.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from tests.unit.test_managers_fixtures import make_certificate

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
SRC = str(ROOT / "src")
SERVER = str(ROOT / "examples" / "remote_manager_server.py")
WORKER = str(ROOT / "examples" / "remote_manager_worker.py")
SECRET = "remote-test-secret-0123456789"


def environment(secret: str = SECRET) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env["MANYPROC_AUTHKEY"] = secret
    return env


def _default_sigint() -> None:
    # As in a terminal, even when the test run itself ignores Ctrl-C (started in background).
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Program:
    """A Python program running in its own process, its output collected line by line."""

    def __init__(self, args: list[str], secret: str = SECRET, prefix: list[str] | None = None):
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        self.process = subprocess.Popen(
            [*(prefix or []), sys.executable, *args], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, env=environment(secret), cwd=str(ROOT),
            preexec_fn=_default_sigint)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        with self.process.stdout:
            for line in self.process.stdout:
                self.output.append(line)
                self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r} within {timeout} s; "
                                     f"output so far: {''.join(self.output)}") from None
            if line is None:
                raise AssertionError(f"the program ended without printing {pattern!r}: "
                                     f"{''.join(self.output)}")
            found = re.search(pattern, line)
            if found:
                return found

    def finish(self, timeout: float = 60) -> tuple[int, str]:
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the program did not end: {''.join(self.output)}") from None
        self._reader.join(10)
        return code, "".join(self.output)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        self._reader.join(10)


def start_server(*args: str, prefix: list[str] | None = None) -> tuple[Program, str, int]:
    server = Program([SERVER, "--port", "0", *args], prefix=prefix)
    found = server.wait_for(r"serving on (\S+):(\d+)")
    return server, found.group(1), int(found.group(2))


def test_workers_in_other_processes_take_work_from_a_tcp_queue():
    server, host, port = start_server("--tasks", "30", "--workers", "2")
    workers = [Program([WORKER, "--host", host, "--port", str(port)]) for _ in range(2)]
    try:
        results = [worker.finish() for worker in workers]
        code, output = server.finish()
    finally:
        for program in (server, *workers):
            program.kill()
    assert [c for c, _ in results] == [0, 0], results
    assert code == 0, output
    done = [int(n) for n in re.findall(r"task (\d+) -> (\d+)", output) for n in n[:1]]
    assert sorted(done) == list(range(30))
    assert all(int(v) == int(t) ** 2 for t, v in re.findall(r"task (\d+) -> (\d+)", output))
    assert output.count("is done") == 2 and "server stopped" in output
    assert sum(int(n) for _, out in results for n in re.findall(r"did (\d+) tasks", out)) == 30


def test_a_worker_with_the_wrong_key_is_refused_and_the_others_go_on():
    server, host, port = start_server("--tasks", "5", "--workers", "1")
    intruder = Program([WORKER, "--host", host, "--port", str(port)], secret="wrong secret")
    worker = None
    try:
        code, output = intruder.finish()
        assert code != 0 and "AuthenticationError" in output, output
        worker = Program([WORKER, "--host", host, "--port", str(port)])
        assert worker.finish()[0] == 0
        code, output = server.finish()
        assert code == 0 and len(re.findall(r"task \d+ ->", output)) == 5
    finally:
        for program in (server, intruder, worker):
            if program is not None:
                program.kill()


WAITING_WORKER = """
    import sys, time
    from manyproc.managers import BaseManager, ManagerConnectionError

    class WorkManager(BaseManager):
        pass

    WorkManager.register("get_tasks")
    manager = WorkManager(address=(sys.argv[1], int(sys.argv[2])), authkey=sys.argv[3].encode())
    manager.connect()
    tasks = manager.get_tasks()
    while tasks.get() is not None:  # take everything, the end marker included
        pass
    print("waiting", flush=True)
    started = time.monotonic()
    try:
        tasks.get()  # nothing more will come: the server is killed meanwhile
    except ManagerConnectionError as exc:
        print(f"error after {time.monotonic() - started:.1f}s: {exc}", flush=True)
        sys.exit(3)
    """


def test_a_worker_learns_quickly_that_the_server_was_killed(tmp_path):
    server, host, port = start_server("--tasks", "1", "--workers", "1")
    script = tmp_path / "waiting_worker.py"
    script.write_text(textwrap.dedent(WAITING_WORKER))
    worker = Program([str(script), host, str(port), SECRET])
    try:
        worker.wait_for("waiting")
        server.process.send_signal(signal.SIGKILL)
        code, output = worker.finish(30)
        assert code == 3, output
        assert f"{host}:{port}" in output and "lost the connection" in output
    finally:
        server.kill()
        worker.kill()


def test_ctrl_c_stops_the_server_cleanly():
    server, host, port = start_server("--tasks", "1")
    try:
        with socket.create_connection((host, port), timeout=10) as probe:
            probe.recv(256)  # a challenge: the server is accepting, so it is serving
        server.process.send_signal(signal.SIGINT)
        code, output = server.finish(30)
        assert code == 0 and "server stopped" in output, output
    finally:
        server.kill()


def test_refuses_to_serve_a_public_address_without_a_key():
    program = subprocess.run(
        [sys.executable, "-c", "from manyproc.managers import SyncManager\n"
         "SyncManager(address=('0.0.0.0', 0)).get_server()"],
        capture_output=True, text=True, env=environment(), timeout=60)
    assert program.returncode != 0
    assert "without an explicit authkey" in program.stderr
    assert "authkey=os.urandom(32)" in program.stderr


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    pem = make_certificate(tmp_path_factory.mktemp("tls"), ("127.0.0.1", "10.231.0.1"))
    if pem is None:
        pytest.skip("needs the openssl command to make a test certificate")
    return pem


def test_workers_over_tls(certificate):
    server, host, port = start_server("--tasks", "8", "--workers", "1",
                                      "--certfile", str(certificate))
    worker = Program([WORKER, "--host", host, "--port", str(port), "--cafile", str(certificate)])
    plain = Program([WORKER, "--host", host, "--port", str(port)])
    try:
        plain_code, plain_output = plain.finish()
        assert plain_code != 0, plain_output  # a client without TLS gets nowhere
        assert worker.finish()[0] == 0
        code, output = server.finish()
        assert code == 0 and len(re.findall(r"task \d+ ->", output)) == 8
    finally:
        for program in (server, worker, plain):
            program.kill()


# --------------------------------------------------------------------------- namespaces


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def two_namespaces():
    """Two network namespaces joined by a veth pair: 10.231.0.1 <-> 10.231.0.2."""
    if shutil.which("ip") is None or sys.platform != "linux":
        pytest.skip("needs Linux and the ip command")
    tag = f"{os.getpid() % 100000}"
    server_ns, worker_ns = f"mpms{tag}", f"mpmw{tag}"
    server_if, worker_if = f"mpvs{tag}", f"mpvw{tag}"
    made: list[str] = []
    try:
        for ns in (server_ns, worker_ns):
            result = _ip("netns", "add", ns)
            if result.returncode != 0:
                pytest.skip(f"cannot create network namespaces here: {result.stderr.strip()}")
            made.append(ns)
        steps = [
            ("link", "add", server_if, "type", "veth", "peer", "name", worker_if),
            ("link", "set", server_if, "netns", server_ns),
            ("link", "set", worker_if, "netns", worker_ns),
            ("-n", server_ns, "addr", "add", "10.231.0.1/24", "dev", server_if),
            ("-n", worker_ns, "addr", "add", "10.231.0.2/24", "dev", worker_if),
            ("-n", server_ns, "link", "set", server_if, "up"),
            ("-n", worker_ns, "link", "set", worker_if, "up"),
            ("-n", server_ns, "link", "set", "lo", "up"),
            ("-n", worker_ns, "link", "set", "lo", "up"),
        ]
        for step in steps:
            result = _ip(*step)
            if result.returncode != 0:
                pytest.skip(f"cannot set up a veth pair here ({' '.join(step)}): "
                            f"{result.stderr.strip()}")
        yield server_ns, worker_ns, server_if
    finally:
        for ns in made:
            _ip("netns", "del", ns)  # removes the veth pair with it


def _received_bytes(namespace: str, interface: str) -> int:
    text = _ip("-n", namespace, "-s", "link", "show", interface).stdout
    numbers = re.search(r"RX:.*\n\s*(\d+)", text)
    return int(numbers.group(1)) if numbers else 0


def test_server_and_worker_in_two_network_namespaces(two_namespaces, certificate):
    server_ns, worker_ns, server_if = two_namespaces
    before = _received_bytes(server_ns, server_if)
    server = Program([SERVER, "--host", "10.231.0.1", "--port", "0", "--tasks", "12",
                      "--workers", "1", "--certfile", str(certificate)],
                     prefix=["ip", "netns", "exec", server_ns])
    worker = None
    try:
        port = int(server.wait_for(r"serving on \S+:(\d+)").group(1))
        worker = Program([WORKER, "--host", "10.231.0.1", "--port", str(port),
                          "--cafile", str(certificate)],
                         prefix=["ip", "netns", "exec", worker_ns])
        code, output = worker.finish()
        assert code == 0, output
        code, output = server.finish()
        assert code == 0 and len(re.findall(r"task \d+ ->", output)) == 12, output
    finally:
        server.kill()
        if worker is not None:
            worker.kill()
    assert _received_bytes(server_ns, server_if) - before > 1000  # it crossed the veth pair
