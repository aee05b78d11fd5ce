"""util: finalizers, after-fork hooks, logging (no processes)."""

from __future__ import annotations

import logging

import pytest

from manyproc import util


class Thing:
    pass


def test_finalize_runs_once_on_collection():
    calls = []
    thing = Thing()
    fin = util.Finalize(thing, calls.append, args=("gone",))
    assert fin.still_active()
    del thing
    assert calls == ["gone"]
    assert not fin.still_active()
    assert fin() is None and calls == ["gone"]


def test_finalize_cancel_and_call():
    calls = []
    thing = Thing()
    fin = util.Finalize(thing, calls.append, args=("x",))
    fin.cancel()
    del thing
    assert calls == []
    other = Thing()
    fin2 = util.Finalize(other, lambda: "result")
    assert fin2() == "result"


def test_run_finalizers_by_priority():
    calls = []
    fins = [util.Finalize(None, calls.append, args=(p,), exitpriority=p) for p in (1, 5, 3)]
    util._run_finalizers(2)
    assert calls == [5, 3]
    fins[0]()
    assert calls == [5, 3, 1]


def test_finalize_argument_errors():
    with pytest.raises(TypeError, match="exitpriority"):
        util.Finalize(Thing(), print, exitpriority="high")
    with pytest.raises(ValueError, match="neither"):
        util.Finalize(None, print)


def test_after_fork_registry_runs_in_order():
    seen = []

    class Obj:
        pass

    a, b = Obj(), Obj()
    util.register_after_fork(a, lambda o: seen.append("a"))
    util.register_after_fork(b, lambda o: seen.append("b"))
    util._run_after_forkers()
    assert seen[-2:] == ["a", "b"]


def test_logger_and_log_to_stderr():
    logger = util.get_logger()
    assert logger is util.get_logger()
    old = logger.level
    try:
        util.log_to_stderr(logging.INFO)
        assert logger.level == logging.INFO
        handlers = [h for h in logger.handlers if getattr(h, "_manyproc_stderr", False)]
        util.log_to_stderr()
        assert len([h for h in logger.handlers
                    if getattr(h, "_manyproc_stderr", False)]) == len(handlers) == 1
    finally:
        logger.setLevel(old)
        for h in list(logger.handlers):
            logger.removeHandler(h)
