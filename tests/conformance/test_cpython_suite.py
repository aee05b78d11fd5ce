"""Conformance: CPython's own multiprocessing test suite, run against manyproc.

Each start method runs in its own interpreter (``run_suite``), which records one
JSON line per test.  This test compares the outcomes with ``expected_failures.txt``:

* a failure not listed there fails the run (after one retry, to weed out flakes);
* a listed test that passes is reported, so the list can shrink;
* the counts per start method are printed for CI logs.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import manyproc

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
PER_TEST_TIMEOUT = float(os.environ.get("MANYPROC_CONFORMANCE_TEST_TIMEOUT", "60"))
RUN_BUDGET = float(os.environ.get("MANYPROC_CONFORMANCE_BUDGET", "1200"))
FAILING = {"fail", "error", "timeout", "crash"}
NEEDED = ("connection", "queues", "synchronize", "sharedctypes", "heap", "shared_memory",
          "managers", "pool")
MISSING = [m for m in NEEDED if importlib.util.find_spec(f"manyproc.{m}") is None]

pytestmark = [
    pytest.mark.timeout(RUN_BUDGET + 600),
    pytest.mark.leaks_allowed,  # the suite checks its own leftovers; it runs in a subprocess
    pytest.mark.skipif(importlib.util.find_spec("test._test_multiprocessing") is None,
                       reason="this Python was installed without its test suite"),
    pytest.mark.skipif(bool(MISSING), reason=f"manyproc modules not written yet: {MISSING}"),
]


def load_expected(method: str) -> dict[str, str]:
    """Patterns of tests expected to fail under ``method``, each with its reason."""
    expected: dict[str, str] = {}
    for raw in (HERE / "expected_failures.txt").read_text().splitlines():
        line, _, reason = raw.partition("#")
        fields = line.split()
        if len(fields) != 2:
            continue
        scope, pattern = fields
        if scope in ("*", method):
            expected[pattern] = reason.strip()
    return expected


def is_expected(test_id: str, expected: dict[str, str]) -> bool:
    return any(fnmatch.fnmatchcase(test_id, pattern) for pattern in expected)


def run_suite(method: str, results: Path, only: list[str] | None = None) -> dict[str, dict]:
    """Run the suite in subprocesses until every test has an outcome; return them by id."""
    outcomes: dict[str, dict] = {}
    deadline = time.monotonic() + RUN_BUDGET
    exclude = results.with_suffix(".exclude")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "src")]))
    for _attempt in range(50):
        exclude.write_text("\n".join(outcomes))
        cmd = [sys.executable, "-m", "tests.conformance.run_suite", method, str(results),
               "--timeout", str(PER_TEST_TIMEOUT), "--exclude-file", str(exclude)]
        if only is not None:
            cmd += ["--only", *only]
        remaining = max(deadline - time.monotonic(), 30.0)
        try:
            subprocess.run(cmd, cwd=ROOT, env=env, timeout=remaining,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        except subprocess.TimeoutExpired:
            pass
        in_flight = None
        finished = False
        for line in results.read_text().splitlines():
            record = json.loads(line)
            if "start" in record:
                in_flight = record["start"]
            elif "finished" in record:
                finished = True
            else:
                outcomes[record["id"]] = record
                if record["id"] == in_flight:
                    in_flight = None
        if finished or time.monotonic() >= deadline:
            break
        if in_flight is not None:  # the interpreter died or hung inside this test
            outcomes[in_flight] = {"id": in_flight, "outcome": "crash",
                                   "detail": "the suite's interpreter died in this test"}
        results.write_text("")
    return outcomes


@pytest.mark.parametrize("method", manyproc.get_all_start_methods())
def test_cpython_multiprocessing_suite(method: str, tmp_path: Path) -> None:
    expected = load_expected(method)
    outcomes = run_suite(method, tmp_path / f"{method}.jsonl")
    assert outcomes, "the suite ran no test at all"
    unexpected = sorted(t for t, r in outcomes.items()
                        if r["outcome"] in FAILING and not is_expected(t, expected))
    flaky: list[str] = []
    if unexpected:
        retry = run_suite(method, tmp_path / f"{method}-retry.jsonl", only=unexpected)
        flaky = [t for t in unexpected if retry.get(t, {}).get("outcome") == "pass"]
        unexpected = [t for t in unexpected if t not in flaky]
    now_passing = sorted(t for t, r in outcomes.items()
                         if r["outcome"] == "pass" and is_expected(t, expected)
                         and t not in flaky)
    counts: dict[str, int] = {}
    for record in outcomes.values():
        counts[record["outcome"]] = counts.get(record["outcome"], 0) + 1
    total = len(outcomes)
    summary = (f"[conformance {method}] {total} tests: {counts.get('pass', 0)} passed, "
               f"{counts.get('skip', 0)} skipped, "
               f"{sum(counts.get(k, 0) for k in FAILING)} failed "
               f"({len(unexpected)} unexpected, {len(flaky)} flaky on first run)")
    print("\n" + summary)
    report = ROOT / ".conformance"
    report.mkdir(exist_ok=True)
    (report / f"{method}.json").write_text(json.dumps(
        {"summary": summary, "outcomes": outcomes, "now_passing": now_passing,
         "flaky": flaky}, indent=1))
    if now_passing:
        print(f"[conformance {method}] listed as expected failures but passed "
              f"({len(now_passing)}), remove them from expected_failures.txt:")
        for test_id in now_passing:
            print("   ", test_id)
    details = "\n\n".join(f"{t}: {outcomes[t]['outcome']}\n{outcomes[t]['detail'][-1500:]}"
                          for t in unexpected[:15])
    assert not unexpected, (
        f"{len(unexpected)} conformance tests failed that are not in expected_failures.txt:\n"
        + "\n".join(unexpected) + "\n\n" + details)
