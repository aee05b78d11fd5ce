"""The forkserver start method: children are forked by the family's fork server."""

from __future__ import annotations

import os
import struct

from . import forkserver
from ._os.fds import close_quietly, mark_private
from ._os.waiting import wait_readable
from ._popen_common import PopenBase
from ._popen_spawn import _write_all, pickle_for_child

TYPE_CHECKING = False  # typing costs import time in every child; only checkers need it
if TYPE_CHECKING:
    from typing import Any

__all__ = ["Popen"]

_STATUS = struct.Struct("!i")


class Popen(PopenBase):
    """Start ``process_obj`` in a child forked by the fork server."""

    method = "forkserver"

    def __init__(self, process_obj: Any) -> None:
        super().__init__()
        self._fds_for_child: list[int] = []
        self._launch(process_obj)

    def duplicate_for_child(self, fd: int) -> int:
        """Pass ``fd`` along; in the child it is found by its index in the passed list."""
        self._fds_for_child.append(fd)
        return len(self._fds_for_child) - 1

    def _launch(self, process_obj: Any) -> None:
        payload = pickle_for_child(self, process_obj, self.method)
        data_r, data_w = os.pipe()
        alive_r, alive_w = os.pipe()
        try:
            status_fd, self.pid = forkserver.start_child([alive_r, data_r, *self._fds_for_child])
        except BaseException:
            close_quietly(data_w, alive_w)
            raise
        finally:
            close_quietly(data_r, alive_r)
        self.sentinel = status_fd
        mark_private(status_fd, alive_w, data_w)
        self._own_fds(status_fd, alive_w)
        try:
            _write_all(data_w, payload)
        except BrokenPipeError:
            pass
        finally:
            close_quietly(data_w)

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
