"""Start-method selection and contexts (no processes started)."""

from __future__ import annotations

import sys

import pytest

import manyproc as mp
from manyproc import context


def test_all_start_methods_listed_default_first():
    methods = mp.get_all_start_methods()
    assert set(methods) == {"fork", "spawn", "forkserver"}
    assert methods[0] == context._platform_default_start_method()


def test_default_matches_the_running_python():
    expected = "spawn" if sys.platform == "darwin" else (
        "forkserver" if sys.version_info >= (3, 14) else "fork")
    assert context._platform_default_start_method() == expected


def test_get_context_by_name():
    for method in ("fork", "spawn", "forkserver"):
        ctx = mp.get_context(method)
        assert ctx.get_start_method() == method
        assert ctx.Process._start_method == method


def test_unknown_start_method():
    with pytest.raises(ValueError, match="cannot find context for 'threads'.*'fork'"):
        mp.get_context("threads")


def test_set_start_method_once_then_force():
    default = context._default_context
    saved = default._actual_context
    try:
        default._actual_context = None
        assert mp.get_start_method(allow_none=True) is None
        mp.set_start_method("spawn")
        assert mp.get_start_method() == "spawn"
        with pytest.raises(RuntimeError, match="context has already been set.*force=True"):
            mp.set_start_method("fork")
        mp.set_start_method("fork", force=True)
        assert mp.get_start_method() == "fork"
        mp.set_start_method(None, force=True)
        assert mp.get_start_method(allow_none=True) is None
        with pytest.raises(ValueError):
            mp.set_start_method("bogus", force=True)
    finally:
        default._actual_context = saved


def test_concrete_context_cannot_set_method():
    with pytest.raises(ValueError, match="concrete context"):
        mp.get_context("spawn").set_start_method("fork")


def test_public_names_cover_multiprocessing():
    import importlib

    stdlib = importlib.import_module("multiprocessing")
    missing = set(stdlib.__all__) - set(mp.__all__)
    assert not missing
    for name in mp.__all__:
        assert hasattr(mp, name), name


def test_forkserver_preload_validates():
    with pytest.raises(TypeError, match="list of strings"):
        mp.set_forkserver_preload("numpy")
