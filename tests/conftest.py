"""Shared fixtures: start-method parametrization and the leak check every test runs under."""

from __future__ import annotations

import time

import psutil
import pytest

import manyproc

START_METHODS = manyproc.get_all_start_methods()

# Long-lived helpers of a process family are not leaks: they are started once and
# stop when the test session ends.
_SERVICE_MARKERS = ("manyproc.forkserver", "forkserver import _server_main", "resource_tracker",
                    "_os.tracker", "tracker import")


def _is_service(proc: psutil.Process) -> bool:
    try:
        cmdline = " ".join(proc.cmdline())
    except (psutil.Error, OSError):
        return False
    return any(marker in cmdline for marker in _SERVICE_MARKERS)


def _live_children() -> list[psutil.Process]:
    me = psutil.Process()
    found = []
    for child in me.children(recursive=True):
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
        except psutil.Error:
            continue
        if not _is_service(child):
            found.append(child)
    return found


def _shm_entries() -> set[str]:
    """Named segments and semaphores this test session (process family) has now."""
    from manyproc import resource_tracker

    return set(resource_tracker._named_objects())


@pytest.fixture(params=START_METHODS)
def start_method(request: pytest.FixtureRequest) -> str:
    """Each start method of this platform in turn."""
    return str(request.param)


@pytest.fixture
def ctx(start_method: str) -> manyproc.context.BaseContext:
    """A manyproc context for each start method in turn."""
    return manyproc.get_context(start_method)


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest):
    """Fail a test that leaves a child process or a shared-memory segment behind."""
    shm_before = _shm_entries()
    yield
    if request.node.get_closest_marker("leaks_allowed"):
        return
    deadline = time.monotonic() + 5.0
    leftovers = _live_children()
    while leftovers and time.monotonic() < deadline:
        time.sleep(0.05)
        manyproc.active_children()  # reaps ended children
        leftovers = _live_children()
    if leftovers:
        described = []
        for proc in leftovers:
            try:
                described.append(f"pid {proc.pid}: {' '.join(proc.cmdline())[:120]}")
                proc.kill()
            except psutil.Error:
                pass
        pytest.fail("test left child processes running: " + "; ".join(described))
    new_shm = _shm_entries() - shm_before
    while new_shm and time.monotonic() < deadline:
        time.sleep(0.05)
        new_shm = _shm_entries() - shm_before
    if new_shm:
        pytest.fail(f"test left shared memory or semaphores behind in /dev/shm: {sorted(new_shm)}")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "leaks_allowed: the test checks leak handling itself")
