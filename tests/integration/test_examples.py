"""Every example in examples/ runs as a user runs it: exit code 0, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"

# Run elsewhere with their own checks: the queue/pipe examples (test_queues_examples.py) and
# the remote manager pair (test_remote_manager.py) which needs a server and workers.
ELSEWHERE = {"queue_workers_sentinels.py", "joinable_queue_producer_consumer.py",
             "pipe_parent_child.py", "ticket_dispatcher.py", "remote_manager_server.py",
             "remote_manager_worker.py"}
NEEDS = {"dask_pool.py": "distributed"}

pytestmark = pytest.mark.timeout(180)


@pytest.mark.parametrize(
    "name", sorted(p.name for p in EXAMPLES.glob("*.py") if p.name not in ELSEWHERE))
def test_example_runs(name):
    if name in NEEDS:
        pytest.importorskip(NEEDS[name])
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True,
                          text=True, timeout=150, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stdout.strip(), "the example printed nothing"
