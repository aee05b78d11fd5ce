"""Serve a queue of work on TCP; workers on other machines take tasks from it.

Start the server, then as many workers as you like, anywhere that can reach it::

    export MANYPROC_AUTHKEY=some-long-random-secret     # the same on every machine
    python examples/remote_manager_server.py --host 0.0.0.0 --port 50000 --tasks 100 --workers 2
    python examples/remote_manager_worker.py --host server.example.org --port 50000   # x2

Each task is a number; a worker returns its square with its host name and pid.
The server prints every result, and stops once each of the ``--workers``
workers has said it is done.  Add ``--certfile cert.pem --keyfile key.pem`` (and
``--cafile cert.pem`` on the workers) to encrypt the traffic with TLS.

manyproc refuses to listen on a non-loopback address without an explicit
authkey: whoever knows the key can run code in the server, so make it long and
random (``python -c "import secrets; print(secrets.token_hex(32))"``).
"""

from __future__ import annotations

import argparse
import os
import queue
import ssl
import sys
import threading

from manyproc.managers import BaseManager

tasks: queue.Queue = queue.Queue()
results: queue.Queue = queue.Queue()


def get_tasks() -> queue.Queue:
    return tasks


def get_results() -> queue.Queue:
    return results


class WorkManager(BaseManager):
    """Shares the two queues; workers register the same names without callables."""


WorkManager.register("get_tasks", callable=get_tasks)
WorkManager.register("get_results", callable=get_results)


def collect(server, workers: int) -> None:
    """Print results until every worker is done, then stop the server."""
    done = 0
    while done < workers:
        kind, *payload = results.get()
        if kind == "done":
            done += 1
            print(f"worker {payload[0]} on {payload[1]} is done", flush=True)
        else:
            task, value, host, pid = payload
            print(f"task {task} -> {value} (worker {pid} on {host})", flush=True)
    server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50000, help="0 picks a free port")
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--certfile", help="TLS certificate (PEM); enables TLS")
    parser.add_argument("--keyfile", help="TLS private key (PEM)")
    args = parser.parse_args(argv)

    secret = os.environ.get("MANYPROC_AUTHKEY")
    if not secret:
        print("set MANYPROC_AUTHKEY to a shared secret (the same for the workers)",
              file=sys.stderr)
        return 2
    context = None
    if args.certfile:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.certfile, args.keyfile)

    manager = WorkManager(address=(args.host, args.port), authkey=secret.encode(),
                          ssl_context=context)
    server = manager.get_server()
    for n in range(args.tasks):
        tasks.put(n)
    tasks.put(None)  # the end: each worker puts it back for the next one
    threading.Thread(target=collect, args=(server, args.workers), daemon=True).start()
    host, port = server.address[:2]
    print(f"serving on {host}:{port} (Ctrl-C stops)", flush=True)
    server.serve_forever()
    print("server stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
