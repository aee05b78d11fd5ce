"""manyproc: Python's multiprocessing, written anew.

Use it as the standard library::

    import manyproc as mp

    if __name__ == "__main__":
        p = mp.Process(target=print, args=("hello",))
        p.start()
        p.join()

Every name of ``multiprocessing.__all__`` is here with the same meaning; see the
README for what manyproc adds (pools that never hang, timeouts, progress...).
"""

from __future__ import annotations

import sys as _sys

from . import context as _context
from . import process as _process
from . import reduction as _reduction
from ._errors import (
    AuthenticationError as AuthenticationError,
)
from ._errors import (
    BufferTooShort as BufferTooShort,
)
from ._errors import (
    ProcessError as ProcessError,
)
from ._errors import (
    TaskTimeoutError as TaskTimeoutError,
)
from ._errors import (
    TimeoutError as TimeoutError,
)
from ._errors import (
    WorkerLostError as WorkerLostError,
)

__version__ = "0.1.0"

_default = _context._default_context

Process = _default.Process
current_process = _default.current_process
parent_process = _default.parent_process
active_children = _default.active_children
cpu_count = _default.cpu_count
Manager = _default.Manager
Pipe = _default.Pipe
Lock = _default.Lock
RLock = _default.RLock
Condition = _default.Condition
Semaphore = _default.Semaphore
BoundedSemaphore = _default.BoundedSemaphore
Event = _default.Event
Barrier = _default.Barrier
Queue = _default.Queue
JoinableQueue = _default.JoinableQueue
SimpleQueue = _default.SimpleQueue
Pool = _default.Pool
RawValue = _default.RawValue
RawArray = _default.RawArray
Value = _default.Value
Array = _default.Array
freeze_support = _default.freeze_support
get_logger = _default.get_logger
log_to_stderr = _default.log_to_stderr
allow_connection_pickling = _default.allow_connection_pickling
set_executable = _default.set_executable
set_forkserver_preload = _default.set_forkserver_preload
get_context = _default.get_context
get_start_method = _default.get_start_method
set_start_method = _default.set_start_method
get_all_start_methods = _default.get_all_start_methods
reducer = _reduction

__all__ = [
    "Array", "AuthenticationError", "Barrier", "BoundedSemaphore", "BufferTooShort",
    "Condition", "Event", "JoinableQueue", "Lock", "Manager", "Pipe", "Pool", "Process",
    "ProcessError", "Queue", "RLock", "RawArray", "RawValue", "Semaphore", "SimpleQueue",
    "TimeoutError", "Value", "active_children", "allow_connection_pickling", "cpu_count",
    "current_process", "freeze_support", "get_all_start_methods", "get_context", "get_logger",
    "get_start_method", "log_to_stderr", "parent_process", "reducer", "set_executable",
    "set_forkserver_preload", "set_start_method",
    # manyproc's additions
    "TaskTimeoutError", "WorkerLostError", "BrokenPoolError", "PoolClosedError",
    "RemoteTaskError",
]

# Errors of the pools, loaded on first use: a worker process imports manyproc at start-up
# and should not pay for the pool machinery.
_LAZY_NAMES = {
    "BrokenPoolError": "manyproc._poolcore.errors",
    "PoolClosedError": "manyproc._poolcore.errors",
    "RemoteTaskError": "manyproc._backends.remote",
}


def __getattr__(name: str) -> object:
    module_name = _LAZY_NAMES.get(name)
    if module_name is None:
        raise AttributeError(f"module 'manyproc' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value

# Children re-import the parent's main script as ``__mp_main__``; alias it here too, so
# objects pickled by reference from either side resolve in the other.
if "__main__" in _sys.modules and "__mp_main__" not in _sys.modules:
    _sys.modules["__mp_main__"] = _sys.modules["__main__"]

del _process
