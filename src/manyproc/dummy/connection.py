"""Connections between threads: a Pipe made of two queues, and a matching Listener/Client."""

from __future__ import annotations

from queue import Queue
from typing import Any

__all__ = ["Client", "Listener", "Pipe"]

families = [None]


class Listener:
    """Accepts in-process clients; the "address" is the queue that carries connections."""

    def __init__(self, address: Any = None, family: Any = None, backlog: int = 1) -> None:
        self._backlog_queue: Queue[tuple[Queue[Any], Queue[Any]]] | None = Queue(backlog)

    def accept(self) -> Connection:
        if self._backlog_queue is None:
            raise OSError("listener is closed")
        return Connection(*self._backlog_queue.get())

    def close(self) -> None:
        self._backlog_queue = None

    @property
    def address(self) -> Queue[tuple[Queue[Any], Queue[Any]]] | None:
        return self._backlog_queue

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def Client(address: Queue[tuple[Queue[Any], Queue[Any]]]) -> Connection:  # noqa: N802
    """Connect to an in-process :class:`Listener` whose ``address`` is given."""
    to_server: Queue[Any] = Queue()
    from_server: Queue[Any] = Queue()
    address.put((to_server, from_server))
    return Connection(from_server, to_server)


def Pipe(duplex: bool = True) -> tuple[Connection, Connection]:  # noqa: N802
    """Two connected ends made of queues (always two-way between threads)."""
    a: Queue[Any] = Queue()
    b: Queue[Any] = Queue()
    return Connection(a, b), Connection(b, a)


class Connection:
    """One end of a thread pipe: ``send`` puts on one queue, ``recv`` gets from the other."""

    def __init__(self, inbox: Queue[Any], outbox: Queue[Any]) -> None:
        self._inbox = inbox
        self._outbox = outbox
        self.send = self.send_bytes = outbox.put
        self.recv = self.recv_bytes = inbox.get

    def poll(self, timeout: float | None = 0.0) -> bool:
        """True if a message is waiting, waiting up to ``timeout`` seconds for one."""
        if self._inbox.qsize() > 0:
            return True
        if timeout is not None and timeout <= 0:
            return False
        inbox = self._inbox
        with inbox.not_empty:  # holds inbox.mutex: look at the deque, not qsize()
            inbox.not_empty.wait_for(lambda: len(inbox.queue) > 0, timeout)
            return len(inbox.queue) > 0

    def close(self) -> None:
        pass

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
