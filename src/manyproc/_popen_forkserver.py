"""The forkserver start method: children are forked by the family's fork server."""

from __future__ import annotations

import os
import struct

from . import forkserver
from ._os.waiting import wait_readable
from ._popen_spawn import Popen as SpawnPopen

TYPE_CHECKING = False  # typing costs import time in every child; only checkers need it
if TYPE_CHECKING:
    pass

__all__ = ["Popen"]

_STATUS = struct.Struct("!i")


class Popen(SpawnPopen):
    """Start ``process_obj`` in a child forked by the fork server.

    The sentinel is the connection to the server, which sends the child's exit status.
    """

    method = "forkserver"

    def duplicate_for_child(self, fd: int) -> int:
        """Pass ``fd`` along; in the child it is found by its index in the passed list."""
        self._fds_for_child.append(fd)
        return len(self._fds_for_child) - 1

    def _start_child(self, data_r: int, alive_r: int) -> tuple[int, int]:
        status_fd, pid = forkserver.start_child([alive_r, data_r, *self._fds_for_child])
        return pid, status_fd

    def poll(self, flag: int = os.WNOHANG) -> int | None:
        if self.returncode is None:
            if flag == os.WNOHANG and not wait_readable([self.sentinel], 0):
                return None
            try:
                data = os.read(self.sentinel, _STATUS.size)
                (code,) = _STATUS.unpack(data) if len(data) == _STATUS.size else (255,)
            except OSError:
                code = 255  # the server is gone and took the status with it
            self.returncode = code
        return self.returncode
