"""A worker for examples/remote_manager_server.py: take tasks, send back results.

    export MANYPROC_AUTHKEY=some-long-random-secret     # the server's key
    python examples/remote_manager_worker.py --host server.example.org --port 50000

Run it in another terminal or on another machine; start as many as you like.
With ``--cafile cert.pem`` it connects over TLS and checks the server's
certificate against that file.
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import sys

from manyproc.managers import BaseManager


class WorkManager(BaseManager):
    """The server's interface: the same typeids, no callables (they live in the server)."""


WorkManager.register("get_tasks")
WorkManager.register("get_results")


def work(task: int) -> int:
    return task * task


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50000)
    parser.add_argument("--cafile", help="trust this certificate (PEM); enables TLS")
    args = parser.parse_args(argv)

    secret = os.environ.get("MANYPROC_AUTHKEY")
    if not secret:
        print("set MANYPROC_AUTHKEY to the server's secret", file=sys.stderr)
        return 2
    context = ssl.create_default_context(cafile=args.cafile) if args.cafile else None

    manager = WorkManager(address=(args.host, args.port), authkey=secret.encode(),
                          ssl_context=context)
    manager.connect()
    tasks = manager.get_tasks()
    results = manager.get_results()
    me, host = os.getpid(), socket.gethostname()
    count = 0
    while True:
        task = tasks.get()
        if task is None:
            tasks.put(None)  # leave the end marker for the other workers
            break
        results.put(("result", task, work(task), host, me))
        count += 1
    results.put(("done", me, host))
    print(f"worker {me} did {count} tasks", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
