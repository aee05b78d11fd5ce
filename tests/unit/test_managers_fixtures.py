"""Helpers for the manager unit tests: a manager's server running in a thread of this process.

The unit tests start no process: the server runs in a thread and the test talks to
it through the same client machinery a separate process would use.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

from manyproc import _manager_client as client_side
from manyproc import process
from manyproc.managers import BaseManager, SyncManager

KEY = b"unit-test-authkey"


class ThreadedServer:
    """A manager's server serving from a daemon thread, stopped by :meth:`close`."""

    def __init__(self, manager_class: type[BaseManager] = SyncManager, address: Any = None,
                 authkey: bytes = KEY, **kwargs: Any) -> None:
        self.manager_class = manager_class
        self.authkey = authkey
        self.owner = manager_class(address=address, authkey=authkey, **kwargs)
        self.server = self.owner.get_server()
        self.address = self.server.address
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def connect(self, manager_class: type[BaseManager] | None = None, **kwargs: Any) -> Any:
        """A manager connected to this server, as a client program makes one."""
        kwargs.setdefault("authkey", self.authkey)
        manager = (manager_class or self.manager_class)(address=self.address, **kwargs)
        manager.connect()
        return manager

    def count(self) -> int:
        return self.server.number_of_objects()

    def close(self) -> None:
        self.server.stop()
        self.thread.join(10)
        client_side.forget_clients(self.address)
        client_side._ssl_contexts.pop(self.address, None)
        client_side._built_contexts.pop(self.address, None)
        process.current_process().__dict__.pop("_manager_server", None)


def make_certificate(directory: Path, hosts: tuple[str, ...] = ("127.0.0.1",)) -> Path | None:
    """Write a self-signed certificate and key (one PEM file) for ``hosts``; None without openssl."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    pem = directory / "server.pem"
    alt = ",".join(("IP:" if host[0].isdigit() else "DNS:") + host for host in hosts)
    result = subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=manyproc-test", "-addext", f"subjectAltName={alt}",
         "-keyout", str(pem), "-out", str(pem)],
        capture_output=True, timeout=60)
    if result.returncode != 0:
        return None
    return pem
