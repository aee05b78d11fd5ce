"""The fork start method: the child is a copy of the parent made by ``os.fork()``."""

from __future__ import annotations

import atexit
import os
import sys

from . import util
from ._os import deathwatch
from ._os.fds import close_private_fds_in_child, close_quietly, mark_private, process_sentinel
from ._popen_common import PopenBase

TYPE_CHECKING = False  # typing costs import time in every child; only checkers need it
if TYPE_CHECKING:
    from typing import Any

__all__ = ["Popen"]


class Popen(PopenBase):
    """Start ``process_obj`` in a forked child."""

    method = "fork"

    def __init__(self, process_obj: Any) -> None:
        super().__init__()
        util._flush_std_streams()
        self._launch(process_obj)

    def duplicate_for_child(self, fd: int) -> int:
        return fd  # a forked child already has every fd of its parent

    def _launch(self, process_obj: Any) -> None:
        alive_r, alive_w = os.pipe()  # the child watches it to learn its parent died
        exit_r, exit_w = os.pipe()    # readable (EOF) when the child ends, if no pidfd
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                try:
                    os.close(alive_w)
                    os.close(exit_r)
                    close_private_fds_in_child()
                    mark_private(exit_w, alive_r)  # our own children must not hold these
                    atexit._clear()  # the parent's exit handlers are not ours to run
                    deathwatch.watch_parent(alive_r)
                except BaseException:
                    import traceback

                    sys.stderr.write(f"manyproc: the forked child (pid {os.getpid()}) could "
                                     "not be set up:\n" + traceback.format_exc())
                    raise
                code = process_obj._bootstrap(parent_sentinel=alive_r)
                atexit._run_exitfuncs()
            finally:
                util._flush_std_streams()
                os._exit(code)
        self.pid = pid
        os.close(alive_r)
        os.close(exit_w)
        pidfd = process_sentinel(pid)
        if pidfd is not None:
            close_quietly(exit_r)
            self.sentinel = pidfd
        else:
            self.sentinel = exit_r
        mark_private(self.sentinel, alive_w)
        self._own_fds(self.sentinel, alive_w)
