"""Make ``import multiprocessing`` (and its submodules) resolve to manyproc.

CPython's suite imports ``multiprocessing`` everywhere; installing these aliases
before it is imported runs it against manyproc.  Spawned children adopt the
aliases through manyproc's spawn-state hook, before they unpickle anything.
"""

from __future__ import annotations

import importlib
import sys
import types

from manyproc import util

# public submodules of multiprocessing -> the manyproc module that provides them
SUBMODULES = {
    "connection": "manyproc.connection",
    "context": "manyproc.context",
    "dummy": "manyproc.dummy",
    "dummy.connection": "manyproc.dummy.connection",
    "heap": "manyproc.heap",
    "managers": "manyproc.managers",
    "pool": "manyproc.pool",
    "process": "manyproc.process",
    "queues": "manyproc.queues",
    "reduction": "manyproc.reduction",
    "resource_sharer": "manyproc.resource_sharer",
    "resource_tracker": "manyproc.resource_tracker",
    "shared_memory": "manyproc.shared_memory",
    "sharedctypes": "manyproc.sharedctypes",
    "synchronize": "manyproc.synchronize",
    "util": "manyproc.util",
    "forkserver": "manyproc.forkserver",
    "spawn": "manyproc._spawn",
    "popen_fork": "manyproc._popen_fork",
    "popen_spawn_posix": "manyproc._popen_spawn",
    "popen_forkserver": "manyproc._popen_forkserver",
}

MISSING: list[str] = []


def install() -> None:
    """Alias ``multiprocessing`` and every submodule manyproc has."""
    import manyproc

    if sys.modules.get("multiprocessing") is manyproc:
        return
    for name in [n for n in sys.modules if n == "multiprocessing" or
                 n.startswith("multiprocessing.")]:
        del sys.modules[name]
    sys.modules["multiprocessing"] = manyproc
    for short, target in SUBMODULES.items():
        try:
            module = importlib.import_module(target)
        except ImportError:
            MISSING.append(short)
            module = _placeholder(short)
        sys.modules[f"multiprocessing.{short}"] = module
        parent, _, leaf = short.rpartition(".")
        owner = sys.modules[f"multiprocessing.{parent}"] if parent else manyproc
        if not hasattr(owner, leaf):
            setattr(owner, leaf, module)
    util.register_spawn_state(__name__)


def _placeholder(short: str) -> types.ModuleType:
    """Stand-in for a module manyproc does not have yet, so the suite can import."""
    module = types.ModuleType(f"multiprocessing.{short}")
    if short == "managers":
        class BaseManager:
            @classmethod
            def register(cls, *args: object, **kwargs: object) -> None:
                pass

        class BaseProxy:
            pass

        class RemoteError(Exception):
            pass

        module.BaseManager = BaseManager  # type: ignore[attr-defined]
        module.BaseProxy = BaseProxy  # type: ignore[attr-defined]
        module.RemoteError = RemoteError  # type: ignore[attr-defined]
        module.SyncManager = BaseManager  # type: ignore[attr-defined]
    return module


def _get_spawn_state() -> bool:
    return True


def _set_spawn_state(state: bool) -> None:
    install()
