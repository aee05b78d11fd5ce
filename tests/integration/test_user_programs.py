"""Programs written the way users write them for multiprocessing, run with manyproc."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from .scripts import run_script

pytestmark = pytest.mark.timeout(120)

PROGRAMS = Path(__file__).parent / "user_programs"

EXPECTED = {
    "process_queue_pipe.py": ["[42, None, 'hello']", "[42, None, 'hello']", "function f",
                              "exitcodes ok True"],
    "lock_value_array.py": ["[0, 1, 2, 3, 4]", "3.1415927", "[0, -1, -2, -3, -4, -5, -6, -7, -8, -9]"],
    "manager_dict_list.py": ["[('2', 2), (0.25, None), (1, '1')]", "[9, 8, 7, 6, 5, 4, 3, 2, 1, 0]"],
    "pool_basics.py": ["[0, 1, 4, 9, 16, 25, 36, 49, 64, 81]", "400", "True", "4",
                       "We lacked patience", "worker error came back: bad value 3", "[8, 9]",
                       "[0, 1, 4, 9, 16]", "pool closed"],
    "pool_lambda.py": ["[100, 101, 102, 103, 104]", "lambda ran"],
    "listener_client.py": ["connection accepted from", "[2.25, None, 'junk', <class 'float'>]",
                           "b'hello'", "done"],
    "executor_basics.py": ["(97, True), (100, False)]", "[(7, True), (8, False), (9, False), (11, True)]"],
}


NEEDS = {"pool_basics.py": "pool", "pool_lambda.py": "pool", "executor_basics.py": "futures"}


@pytest.mark.parametrize("program", sorted(EXPECTED))
def test_user_program(program, start_method, tmp_path):
    needed = NEEDS.get(program)
    if needed and importlib.util.find_spec(f"manyproc.{needed}") is None:
        pytest.skip(f"manyproc.{needed} is not written yet")
    source = (PROGRAMS / program).read_text()
    result = run_script(tmp_path, source, start_method, name=program)
    assert result.returncode == 0, result.stderr
    lines = iter(result.stdout.splitlines())
    for expected in EXPECTED[program]:
        for line in lines:
            if expected in line:
                break
        else:
            pytest.fail(f"{expected!r} not in the output, in order:\n{result.stdout}\n{result.stderr}")
    assert "Traceback" not in result.stderr, result.stderr
