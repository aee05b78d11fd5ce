"""Run small user programs in a fresh interpreter, as a user would from a terminal."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[2] / "src")


def run_script(tmp_path: Path, source: str, *args: str, timeout: float = 60,
               name: str = "prog.py", cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Write ``source`` to a file and run it with this interpreter; return the result."""
    script = tmp_path / name
    script.write_text(textwrap.dedent(source))
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or tmp_path, env=env)
