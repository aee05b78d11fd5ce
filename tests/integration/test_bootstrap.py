"""The child bootstrap: main-module import, tracebacks, exit hooks, orphan handling."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from .scripts import run_script

pytestmark = pytest.mark.timeout(90)


def test_classic_hello_program(tmp_path, start_method):
    result = run_script(tmp_path, f"""
        import manyproc as mp

        def hello(name):
            print('Hello', name)

        if __name__ == '__main__':
            mp.set_start_method({start_method!r})
            p = mp.Process(target=hello, args=('Alice',))
            p.start()
            p.join()
            print('exitcode', p.exitcode)
        """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["Hello Alice", "exitcode 0"]


def test_main_guard_and_main_functions(tmp_path, start_method):
    result = run_script(tmp_path, f"""
        import manyproc as mp
        print('module level runs in', mp.current_process().name)

        class Greeter:
            def greet(self):
                print('greeting from', mp.current_process().name, __name__)

        if __name__ == '__main__':
            mp.set_start_method({start_method!r})
            p = mp.Process(target=Greeter().greet)
            p.start(); p.join()
            print('main done')
        """)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines.count("main done") == 1
    assert "greeting from Process-1" in lines[-2] if start_method == "fork" else True
    assert any(line.startswith("greeting from Process-1") for line in lines)
    if start_method == "spawn":
        # the child re-imports the script as __mp_main__, so module-level code runs again
        assert "module level runs in Process-1" in lines


def test_traceback_printed_and_exit_code(tmp_path, start_method):
    result = run_script(tmp_path, f"""
        import manyproc as mp

        def fail():
            raise KeyError('missing thing')

        if __name__ == '__main__':
            mp.set_start_method({start_method!r})
            p = mp.Process(target=fail)
            p.start(); p.join()
            print('exitcode', p.exitcode)
        """)
    assert "exitcode 1" in result.stdout
    assert "Process Process-1:" in result.stderr
    assert "Traceback (most recent call last):" in result.stderr
    assert "KeyError: 'missing thing'" in result.stderr
    assert "in fail" in result.stderr


def test_atexit_and_finalizers_run_and_output_flushed(tmp_path, start_method):
    result = run_script(tmp_path, f"""
        import atexit, sys
        import manyproc as mp
        from manyproc import util

        class Resource:
            pass

        def child():
            atexit.register(print, 'atexit in child')
            r = Resource()
            util.Finalize(r, print, args=('finalizer in child',), exitpriority=1)
            sys.stdout.write('unflushed output')  # no newline, no flush

        if __name__ == '__main__':
            mp.set_start_method({start_method!r})
            atexit.register(print, 'atexit in parent')
            p = mp.Process(target=child)
            p.start(); p.join()
        """)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "unflushed output" in out
    assert out.count("finalizer in child") == 1
    assert out.count("atexit in child") == 1
    assert out.count("atexit in parent") == 1  # the child did not run the parent's handler


def test_sys_path_and_cwd_carried_to_child(tmp_path, start_method):
    extra = tmp_path / "extra_pkg_dir"
    extra.mkdir()
    (extra / "helper_mod_xyz.py").write_text("VALUE = 41\n")
    workdir = tmp_path / "work"
    workdir.mkdir()
    result = run_script(tmp_path, f"""
        import os, sys
        import manyproc as mp

        def child(q_path):
            import helper_mod_xyz
            with open(q_path, 'w') as f:
                f.write(f'{{helper_mod_xyz.VALUE + 1}} {{os.getcwd()}}')

        if __name__ == '__main__':
            mp.set_start_method({start_method!r})
            sys.path.append({str(extra)!r})
            os.chdir({str(workdir)!r})
            p = mp.Process(target=child, args=('out.txt',))
            p.start(); p.join()
            print(open('out.txt').read())
        """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"42 {workdir}"


def test_child_does_not_outlive_killed_parent(tmp_path, start_method):
    pid_file = tmp_path / "child.pid"
    script = tmp_path / "parent.py"
    script.write_text(f"""
import os, sys, time
sys.path.insert(0, {os.path.join(os.path.dirname(__file__), '..', '..', 'src')!r})
import manyproc as mp

def child(path):
    with open(path, 'w') as f:
        f.write(str(os.getpid()))
    time.sleep(120)

if __name__ == '__main__':
    mp.set_start_method({start_method!r})
    p = mp.Process(target=child, args=({str(pid_file)!r},))
    p.start()
    time.sleep(120)
""")
    import subprocess
    import sys

    parent = subprocess.Popen([sys.executable, str(script)])
    try:
        deadline = time.monotonic() + 30
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline, "child never started"
            time.sleep(0.05)
        child_pid = int(pid_file.read_text())
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 10
        while psutil.pid_exists(child_pid):
            try:
                if psutil.Process(child_pid).status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            assert time.monotonic() < deadline, "the orphaned child is still running"
            time.sleep(0.05)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
