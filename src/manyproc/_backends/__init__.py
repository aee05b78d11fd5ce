"""Backends: what runs a pool's workers (DESIGN.md layer 7).

``get_backend(name)`` loads a backend module by name, lazily, so that a backend's
dependencies are imported only when it is chosen:

* ``"processes"``: worker processes on this machine (:mod:`.local`), the default;
* ``"threads"``: worker threads in this process (:mod:`.thread`);
* ``"dask"``: virtual workers on a Dask cluster (:mod:`.dask`; needs ``distributed``).

Each provides a :class:`~manyproc._backends.base.WorkerBackend`; the
:class:`~manyproc._backends.driver.Driver` runs the pool core on top of it.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # typing costs import time in every child; only checkers need it
if TYPE_CHECKING:
    from typing import Any

__all__ = ["get_backend", "BACKENDS"]

#: backend name -> (module, class)
BACKENDS = {
    "processes": ("manyproc._backends.local", "ProcessBackend"),
    "threads": ("manyproc._backends.thread", "ThreadBackend"),
    "dask": ("manyproc._backends.dask", "DaskBackend"),
}


def get_backend(name: str) -> Any:
    """Return the backend class registered under ``name``.

    Raises:
        ValueError: no backend has that name; the message lists the valid ones.
    """
    try:
        module_name, class_name = BACKENDS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown pool backend {name!r}; choose one of "
                         f"{', '.join(repr(n) for n in BACKENDS)}") from None
    return getattr(importlib.import_module(module_name), class_name)
