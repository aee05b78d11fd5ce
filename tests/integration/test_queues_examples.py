"""The queue and pipe examples run as a user runs them and print what they promise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(120)

EXPECTED = {
    "queue_workers_sentinels.py": ["squares: [0, 1, 4, 9", "exit codes: [0, 0, 0]"],
    "joinable_queue_producer_consumer.py": ["all 10 orders processed",
                                            "consumers exited with [0, 0]"],
    "pipe_parent_child.py": ["('mul', 6, 7) -> 42", "bytes travel as they are",
                             "child exit code: 0"],
    "ticket_dispatcher.py": ["ticket 11 -> desk", "all handled: True"],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs(name):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, str(ROOT / "examples" / name)], capture_output=True,
                          text=True, timeout=90, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr
    for line in EXPECTED[name]:
        assert line in done.stdout, done.stdout
    assert "Traceback" not in done.stderr, done.stderr
