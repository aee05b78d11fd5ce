"""Starting a fresh interpreter as a child, and that child's first steps.

Parent side: :func:`preparation_data` gathers what the child must adopt to look
like its parent (``sys.path``, working directory, the main module, the authkey...),
and :func:`child_command_line` builds the ``python -c`` line.

Child side: :func:`main` reads ``[prep][process]`` from a pipe, adopts the
preparation data (importing the parent's main script as ``__mp_main__`` so the
``if __name__ == '__main__'`` guard keeps working), unpickles the process
object and runs it.
"""

from __future__ import annotations

import importlib
import os
import runpy
import struct
import sys
import types

from . import process, util

TYPE_CHECKING = False  # typing costs import time in every child; only checkers need it
if TYPE_CHECKING:
    from typing import Any

CHILD_FLAG = "--manyproc-child"

_executable = sys.executable


def set_executable(executable: str) -> None:
    """Use ``executable`` as the Python interpreter of spawned children."""
    global _executable
    _executable = os.fsdecode(executable)


def get_executable() -> str:
    return _executable


def _interpreter_flags() -> list[str]:
    """Command-line flags that reproduce this interpreter's settings in a child."""
    flags = sys.flags
    args: list[str] = []
    for flag, option in (("dont_write_bytecode", "-B"), ("no_user_site", "-s"),
                         ("ignore_environment", "-E"), ("safe_path", "-P")):
        if getattr(flags, flag, 0):
            args.append(option)
    if flags.optimize:
        args.append("-" + "O" * flags.optimize)
    if flags.isolated:
        args.append("-I")
    for option in sys.warnoptions:
        args.append("-W" + option)
    for key, value in getattr(sys, "_xoptions", {}).items():
        args.append("-X" + (key if value is True else f"{key}={value}"))
    return args


def child_command_line(entry: str, *fds: int) -> list[str]:
    """The argv of a spawned child that calls ``manyproc.<entry>(*fds)``.

    The directory holding manyproc goes first on ``sys.path`` so the child finds the
    same package even when the parent added it by hand; the preparation data then
    replaces ``sys.path`` with the parent's.
    """
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    module, func = entry.rsplit(".", 1)
    code = (f"import sys; sys.path.insert(0, {package_parent!r}); "
            f"from manyproc.{module} import {func}; {func}({', '.join(map(str, fds))})")
    return [_executable, *_interpreter_flags(), "-c", code, CHILD_FLAG]


def is_child_command_line(argv: list[str]) -> bool:
    return CHILD_FLAG in argv


def main_from_command_line(argv: list[str]) -> None:
    raise RuntimeError("manyproc children of frozen executables are not supported yet")


# --------------------------------------------------------------------------- parent side


def preparation_data(name: str) -> dict[str, Any]:
    """What a fresh interpreter needs to reproduce the parent's environment."""
    data: dict[str, Any] = {
        "name": name,
        "sys_path": list(sys.path),
        "sys_argv": list(sys.argv),
        "cwd": os.getcwd(),
        "authkey": bytes(process.current_process().authkey),
        "temp_dir": util._temp_dir["path"],
        "start_method": None,
        "states": {},
    }
    logger = util._logger
    if logger is not None:
        data["log_level"] = logger.getEffectiveLevel()
        data["log_to_stderr"] = util._log_to_stderr
    for module_name in util._spawn_state_modules:
        module = sys.modules.get(module_name)
        if module is not None:
            data["states"][module_name] = module._get_spawn_state()
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    main_name = getattr(spec, "name", None)
    if main_name is not None:
        data["main_module_name"] = main_name
    else:
        path = getattr(main, "__file__", None)
        if path and not str(path).startswith("<"):
            data["main_path"] = os.path.abspath(path)
    return data


def pack(*blobs: bytes) -> bytes:
    """Length-prefix each blob, so the child can read them back one by one."""
    return b"".join(struct.pack("!Q", len(b)) + b for b in blobs)


def _read_exactly(fd: int, size: int) -> bytes:
    chunks = []
    while size:
        chunk = os.read(fd, min(size, 1 << 20))
        if not chunk:
            raise EOFError("the parent closed the start-up pipe early")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def read_packed(fd: int) -> bytes:
    (size,) = struct.unpack("!Q", _read_exactly(fd, 8))
    return _read_exactly(fd, size)


# --------------------------------------------------------------------------- child side


def prepare(data: dict[str, Any]) -> None:
    """Adopt the parent's environment (called in the child before unpickling the process)."""
    if "name" in data:
        process.current_process().name = data["name"]
    if "authkey" in data:
        process.current_process().authkey = data["authkey"]
    if data.get("log_to_stderr"):
        util.log_to_stderr()
    if "log_level" in data:
        util.get_logger().setLevel(data["log_level"])
    if "sys_path" in data:
        sys.path[:] = data["sys_path"]
    if "sys_argv" in data:
        sys.argv[:] = data["sys_argv"]
    if "cwd" in data:
        os.chdir(data["cwd"])
    if data.get("temp_dir"):
        util._set_temp_dir(data["temp_dir"])
    for module_name, state in data.get("states", {}).items():
        importlib.import_module(module_name)._set_spawn_state(state)
    if "main_module_name" in data:
        import_main_from_name(data["main_module_name"])
    elif "main_path" in data:
        import_main_from_path(data["main_path"])


def _install_main(module: types.ModuleType) -> None:
    sys.modules["__main__"] = sys.modules["__mp_main__"] = module


def import_main_from_name(name: str) -> None:
    """Import the parent's ``-m`` module as ``__mp_main__`` (not re-running a package main)."""
    current = sys.modules.get("__main__")
    if name == "__main__" or name.endswith(".__main__"):
        return
    if getattr(getattr(current, "__spec__", None), "name", None) == name:
        return
    module = types.ModuleType("__mp_main__")
    old_main = sys.modules.get("__main__")
    namespace = runpy.run_module(name, run_name="__mp_main__", alter_sys=True)
    module.__dict__.update(namespace)
    if old_main is not None:
        sys.modules["__main__"] = old_main
    _install_main(module)


def import_main_from_path(path: str) -> None:
    """Run the parent's main script as ``__mp_main__`` (its ``__main__`` guard stays shut)."""
    current = sys.modules.get("__main__")
    if getattr(current, "__file__", None) == path:
        return
    base = os.path.splitext(os.path.basename(path))[0]
    if base == "ipython" or path.endswith(("/ipython", "/ipython3")):
        return  # IPython's launcher: re-running it would start a shell
    module = types.ModuleType("__mp_main__")
    module.__file__ = path
    _install_main(module)  # visible while the script runs, for pickles by reference
    namespace = runpy.run_path(path, run_name="__mp_main__")
    module.__dict__.update(namespace)
    _install_main(module)


def main(data_fd: int, alive_fd: int, exit_fd: int, *keep_fds: int) -> None:
    """Entry point of a spawned child (called by the ``-c`` command line).

    ``exit_fd`` is the write end of an exit pipe held until this process ends (-1 where
    the parent watches a pidfd instead); ``keep_fds`` were passed for pickled objects.
    """
    from ._os import deathwatch
    from ._os.fds import mark_private
    from .reduction import loads

    own_fds = (alive_fd,) if exit_fd < 0 else (alive_fd, exit_fd)
    util.close_all_fds_except((0, 1, 2, data_fd, *own_fds, *keep_fds))
    exitcode = 1
    try:
        prep_blob = read_packed(data_fd)
        process_blob = read_packed(data_fd)
        os.close(data_fd)
        for fd in (*own_fds, *keep_fds):
            os.set_inheritable(fd, False)  # our own spawned children must not hold them
        mark_private(*own_fds)  # nor our forked ones
        deathwatch.watch_parent(alive_fd)
        prep = loads(prep_blob)
        prepare(prep)
        process_obj = loads(process_blob)
        if prep.get("start_method"):
            process_obj._start_method = prep["start_method"]
    except BaseException:
        import traceback

        sys.stderr.write("manyproc: the child could not start:\n")
        traceback.print_exc()
        util._flush_std_streams()
        os._exit(exitcode)
    exitcode = process_obj._bootstrap(parent_sentinel=alive_fd)
    sys.exit(exitcode)
