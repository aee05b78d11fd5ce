"""The spawn start method: the child is a fresh interpreter started with ``posix_spawn``.

    parent                                         child (python -c ...)
    ------                                         ---------------------
    pickle prep data + process  (errors raised here, before any child exists)
    posix_spawn(argv, fds)  ------------------->   close every fd but its own
    write [prep][process] to the data pipe ---->   read, adopt prep, unpickle, run
    alive pipe (write end)  ···· EOF on death ··>  parent watch
    pidfd / exit pipe  <······· EOF on exit ····   exit code via waitpid
"""

from __future__ import annotations

import os
import pickle

from . import reduction
from ._os.fds import close_quietly, mark_private, pidfd_supported, process_sentinel
from ._popen_common import PopenBase
from ._spawn import child_command_line, get_executable, pack, preparation_data

TYPE_CHECKING = False  # typing costs import time in every child; only checkers need it
if TYPE_CHECKING:
    from typing import Any

__all__ = ["Popen"]


def pickle_for_child(popen: Any, process_obj: Any, start_method: str) -> bytes:
    """Pickle preparation data and the process object while ``popen`` is the spawning popen.

    Raises the standard pickling error types, with a message that names the part of
    the process object (target, args, kwargs, attributes) that cannot be pickled.
    """
    prep = preparation_data(process_obj._name)
    prep["start_method"] = start_method
    reduction.set_spawning_popen(popen)
    try:
        prep_blob = reduction.dumps(prep)
        try:
            process_blob = reduction.dumps(process_obj)
        except (TypeError, AttributeError, pickle.PicklingError) as exc:
            # Errors of other types were raised on purpose by a reducer and say why.
            raise _explain_process_pickling(exc, process_obj) from None
    finally:
        reduction.set_spawning_popen(None)
    return pack(prep_blob, process_blob)


def _explain_process_pickling(exc: BaseException, process_obj: Any) -> BaseException:
    parts = {
        "target": getattr(process_obj, "_target", None),
        "args": getattr(process_obj, "_args", ()),
        "kwargs": getattr(process_obj, "_kwargs", {}),
    }
    for label, value in parts.items():
        try:
            reduction.dumps(value)
        except Exception as inner:
            error = reduction.explained(inner, value, root=f"Process {label}")
            message = (f"{error} -- under the '{process_obj._start_method or 'spawn'}' start "
                       "method everything a Process carries is pickled to reach the child")
            try:
                new = type(inner)(message)
            except Exception:
                return error
            new.__cause__ = inner
            return new
    return reduction.explained(exc, process_obj, root=f"the {type(process_obj).__name__} object")


class Popen(PopenBase):
    """Start ``process_obj`` in a freshly spawned interpreter.

    The start-up sequence (pickle first, then pipes, start, hand over the payload) is
    shared with the fork server's Popen, which only replaces :meth:`_start_child`.
    """

    method = "spawn"

    def __init__(self, process_obj: Any) -> None:
        super().__init__()
        self._fds_for_child: list[int] = []
        self._launch(process_obj)

    def duplicate_for_child(self, fd: int) -> int:
        """Pass ``fd`` to the child at the same number."""
        self._fds_for_child.append(fd)
        return fd

    def _launch(self, process_obj: Any) -> None:
        payload = pickle_for_child(self, process_obj, self.method)
        data_r, data_w = os.pipe()    # carries [prep][process] to the child
        alive_r, alive_w = os.pipe()  # the child watches it to learn its parent died
        try:
            self.pid, self.sentinel = self._start_child(data_r, alive_r)
        except BaseException:
            close_quietly(data_w, alive_w)
            raise
        finally:
            close_quietly(data_r, alive_r)
        mark_private(self.sentinel, alive_w, data_w)
        self._own_fds(self.sentinel, alive_w)
        try:
            _write_all(data_w, payload)
        except BrokenPipeError:
            pass  # the child died at once; its exit code tells the story
        finally:
            close_quietly(data_w)

    def _start_child(self, data_r: int, alive_r: int) -> tuple[int, int]:
        """Start the child holding ``data_r`` and ``alive_r``; return ``(pid, sentinel)``."""
        # Without pidfds, the child holds the write end of an exit pipe until it dies.
        exit_r, exit_w = (None, None) if pidfd_supported() else os.pipe()
        extra = [exit_w] if exit_w is not None else []
        try:
            argv = child_command_line("_spawn.main", data_r, alive_r,
                                      -1 if exit_w is None else exit_w, *self._fds_for_child)
            pid = _spawn_with_fds(get_executable(), argv,
                                  [data_r, alive_r, *extra, *self._fds_for_child])
        except BaseException:
            close_quietly(exit_r)
            raise
        finally:
            close_quietly(exit_w)
        sentinel = exit_r if exit_r is not None else process_sentinel(pid)
        assert sentinel is not None
        return pid, sentinel


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _spawn_with_fds(executable: str, argv: list[str], fds: list[int]) -> int:
    """posix_spawn ``argv`` with ``fds`` inherited at the same numbers."""
    made_inheritable = []
    try:
        for fd in fds:
            if not os.get_inheritable(fd):
                os.set_inheritable(fd, True)
                made_inheritable.append(fd)
        return os.posix_spawn(executable, argv, os.environ)
    finally:
        for fd in made_inheritable:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass
