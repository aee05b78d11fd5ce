"""Process objects under every start method, as users use them."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

import manyproc as mp

pytestmark = pytest.mark.timeout(60)


def write_file(path, text):
    with open(path, "a") as f:
        f.write(text)


def report_identity(path):
    me = mp.current_process()
    parent = mp.parent_process()
    write_file(path, f"{me.name}|{me.pid == os.getpid()}|{parent.name}|{parent.pid}|"
                     f"{bytes(me.authkey).hex()}|{me.daemon}")


def exit_with(code):
    sys.exit(code)


def raise_value_error():
    raise ValueError("boom in child")


def sleep_forever():
    time.sleep(60)


def start_grandchild(path):
    p = mp.Process(target=report_identity, args=(path,))
    p.start()
    p.join()


def try_child_from_daemon(path):
    try:
        mp.Process(target=time.sleep, args=(0,)).start()
    except AssertionError as exc:
        write_file(path, f"AssertionError: {exc}")


class Worker(mp.Process):
    def __init__(self, path):
        super().__init__()
        self.path = path

    def run(self):
        write_file(self.path, f"subclass ran in {self.name}")


def test_target_runs_with_args_and_kwargs(ctx, tmp_path):
    path = tmp_path / "out"
    p = ctx.Process(target=write_file, args=(path,), kwargs={"text": "hello"})
    assert p.exitcode is None and p.pid is None
    p.start()
    p.join(30)
    assert p.exitcode == 0
    assert path.read_text() == "hello"


def test_subclass_run(ctx, tmp_path):
    path = tmp_path / "out"
    p = Worker(path)
    # a subclass of manyproc.Process uses the default context; run it under ctx too
    q = type("CtxWorker", (ctx.Process,), {"run": Worker.run})()
    q.path = path
    p.start()
    p.join(30)
    q.start()
    q.join(30)
    assert p.exitcode == 0 and q.exitcode == 0
    text = path.read_text()
    assert "subclass ran in Worker-" in text and "subclass ran in CtxWorker-" in text


def test_identity_in_child(ctx, tmp_path):
    path = tmp_path / "out"
    p = ctx.Process(target=report_identity, args=(path,), name="Custom")
    p.start()
    p.join(30)
    name, pid_ok, parent_name, parent_pid, authkey, daemon = path.read_text().split("|")
    assert name == "Custom" and pid_ok == "True"
    assert parent_name == "MainProcess" and int(parent_pid) == os.getpid()
    assert authkey == bytes(mp.current_process().authkey).hex()
    assert daemon == "False"


def test_nested_names(ctx, tmp_path):
    path = tmp_path / "out"
    p = ctx.Process(target=start_grandchild, args=(path,))
    p.start()
    p.join(30)
    assert p.exitcode == 0
    name, _, parent_name, parent_pid, _, _ = path.read_text().split("|")
    assert name == f"Process-{p._identity[0]}:1"
    assert parent_name == p.name and int(parent_pid) == p.pid


@pytest.mark.parametrize("code,expected", [(0, 0), (None, 0), (3, 3), ("bye", 1)])
def test_sys_exit_codes(ctx, code, expected):
    p = ctx.Process(target=exit_with, args=(code,))
    p.start()
    p.join(30)
    assert p.exitcode == expected


def test_exception_gives_exit_code_1(ctx):
    p = ctx.Process(target=raise_value_error)
    p.start()
    p.join(30)
    assert p.exitcode == 1


@pytest.mark.parametrize("how,code", [("terminate", -signal.SIGTERM), ("kill", -signal.SIGKILL)])
def test_terminate_and_kill(ctx, how, code):
    p = ctx.Process(target=sleep_forever)
    p.start()
    assert p.is_alive()
    p.join(0.05)
    assert p.exitcode is None
    getattr(p, how)()
    p.join(30)
    assert p.exitcode == code
    assert not p.is_alive()
    assert f"exitcode=-SIG{'TERM' if how == 'terminate' else 'KILL'}" in repr(p)


def test_sentinel_and_active_children(ctx):
    from manyproc._os.waiting import wait_readable

    p = ctx.Process(target=time.sleep, args=(0.2,))
    with pytest.raises(ValueError, match="not started"):
        p.sentinel
    p.start()
    assert p in mp.active_children()
    assert wait_readable([p.sentinel], 30) == [p.sentinel]
    p.join(30)
    assert p not in mp.active_children()


def test_daemon_cannot_have_children(ctx, tmp_path):
    path = tmp_path / "out"
    p = ctx.Process(target=try_child_from_daemon, args=(path,), daemon=True)
    assert p.daemon
    p.start()
    p.join(30)
    assert "daemonic processes are not allowed to have children" in path.read_text()


def test_misuse_errors(ctx):
    p = ctx.Process(target=time.sleep, args=(0.5,))
    with pytest.raises(AssertionError, match="can only join a started process"):
        p.join()
    p.start()
    with pytest.raises(AssertionError, match="cannot start a process twice"):
        p.start()
    with pytest.raises(AssertionError, match="process has already started"):
        p.daemon = True
    with pytest.raises(ValueError, match="still running"):
        p.close()
    p.join(30)
    p.close()
    p.close()  # closing twice is fine
    for action in (p.start, p.is_alive, p.join, p.terminate, p.kill):
        with pytest.raises(ValueError, match="process object is closed"):
            action()
    with pytest.raises(ValueError, match="process object is closed"):
        p.exitcode
    assert "closed" in repr(p)


def test_non_callable_target_is_refused():
    with pytest.raises(TypeError, match="must be callable.*Process\\(target=f, args"):
        mp.Process(target=42)


def test_lambda_and_closure_targets(ctx, tmp_path):
    path = tmp_path / "out"
    suffix = "-closure"

    def closure():
        write_file(path, "closure" + suffix)

    for target in (lambda: write_file(path, "lambda;"), closure):
        p = ctx.Process(target=target)
        p.start()
        p.join(30)
        assert p.exitcode == 0
    assert path.read_text() == "lambda;closure-closure"


def test_unpicklable_args_explained(start_method):
    import threading

    if start_method == "fork":
        pytest.skip("fork pickles nothing")
    ctx = mp.get_context(start_method)
    before = set(mp.active_children())
    p = ctx.Process(target=write_file, args=("x", {"lock": threading.Lock()}))
    with pytest.raises(TypeError) as info:
        p.start()
    message = str(info.value)
    assert "Process args[1]['lock']" in message
    assert "manyproc.Lock" in message
    assert set(mp.active_children()) == before


def test_pid_and_ident(ctx):
    p = ctx.Process(target=time.sleep, args=(0,))
    p.start()
    assert p.pid == p.ident and isinstance(p.pid, int)
    p.join(30)
    assert mp.current_process().pid == os.getpid()


def test_cpu_count():
    assert mp.cpu_count() == os.cpu_count()
