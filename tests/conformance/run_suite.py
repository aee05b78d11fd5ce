"""Run CPython's multiprocessing suite against manyproc for one start method.

Usage: python -m tests.conformance.run_suite METHOD RESULTS.jsonl [--only ID ...]
       [--timeout SECONDS]

Writes one JSON line per test (``{"id", "outcome", "seconds", "detail"}``) as it
goes, after a ``{"start": id}`` line, so that a crash or a hang still tells which
test was running.  A test that runs past the per-test timeout is interrupted with
SIGALRM and recorded as ``timeout``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback
import unittest
from typing import Any, TextIO


class TestTimedOut(BaseException):
    """Raised inside a test that ran past its time limit."""


def _short_id(test: unittest.TestCase) -> str:
    test_id = test.id()
    parts = test_id.split(".")
    return ".".join(parts[-2:]) if len(parts) >= 2 else test_id


class JsonLinesResult(unittest.TestResult):
    """Records each outcome as a JSON line; arms a per-test alarm."""

    def __init__(self, out: TextIO, timeout: float) -> None:
        super().__init__()
        self.out = out
        self.timeout = timeout
        self.started = 0.0
        self.outcome: dict[str, Any] = {}

    def _write(self, record: dict[str, Any]) -> None:
        self.out.write(json.dumps(record) + "\n")
        self.out.flush()

    def startTest(self, test: unittest.TestCase) -> None:  # noqa: N802
        super().startTest(test)
        self.started = time.monotonic()
        self.outcome = {"id": _short_id(test), "outcome": "pass", "detail": ""}
        self._write({"start": self.outcome["id"]})
        signal.setitimer(signal.ITIMER_REAL, self.timeout)

    def stopTest(self, test: unittest.TestCase) -> None:  # noqa: N802
        signal.setitimer(signal.ITIMER_REAL, 0)
        self.outcome["seconds"] = round(time.monotonic() - self.started, 3)
        self._write(self.outcome)
        super().stopTest(test)

    def _failed(self, kind: str, err: Any) -> None:
        exc_type = err[0]
        if exc_type is TestTimedOut:
            kind = "timeout"
        self.outcome["outcome"] = kind
        self.outcome["detail"] = "".join(traceback.format_exception(*err))[-3000:]

    def addError(self, test: Any, err: Any) -> None:  # noqa: N802
        super().addError(test, err)
        if isinstance(test, unittest.TestCase):
            self._failed("error", err)
        else:  # an error in setUpClass / setUpModule: recorded under the class name
            self._write({"id": str(test), "outcome": "error",
                         "detail": "".join(traceback.format_exception(*err))[-3000:]})

    def addFailure(self, test: Any, err: Any) -> None:  # noqa: N802
        super().addFailure(test, err)
        self._failed("fail", err)

    def addSkip(self, test: Any, reason: str) -> None:  # noqa: N802
        super().addSkip(test, reason)
        self.outcome["outcome"] = "skip"
        self.outcome["detail"] = reason

    def addExpectedFailure(self, test: Any, err: Any) -> None:  # noqa: N802
        super().addExpectedFailure(test, err)
        self.outcome["outcome"] = "skip"
        self.outcome["detail"] = "expected failure in CPython"

    def addUnexpectedSuccess(self, test: Any) -> None:  # noqa: N802
        super().addUnexpectedSuccess(test)
        self.outcome["outcome"] = "pass"

    def addSubTest(self, test: Any, subtest: Any, err: Any) -> None:  # noqa: N802
        super().addSubTest(test, subtest, err)
        if err is not None:
            self._failed("fail" if issubclass(err[0], test.failureException) else "error", err)


def _on_alarm(signum: int, frame: Any) -> None:
    raise TestTimedOut("test ran past the conformance per-test timeout")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("method")
    parser.add_argument("results")
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--exclude-file", default=None,
                        help="file of test ids (one per line) not to run again")
    args = parser.parse_args(argv)

    os.environ["MANYPROC_CONFORMANCE_METHOD"] = args.method
    signal.signal(signal.SIGALRM, _on_alarm)
    from tests.conformance import suite

    loader = unittest.TestLoader()
    tests = loader.loadTestsFromModule(suite)
    if args.only is not None:
        wanted = set(args.only)
        classes = {w.split(".")[0] for w in wanted}
        selected = unittest.TestSuite()
        for case in _iter_cases(tests):
            short = _short_id(case)
            if short in wanted or short.split(".")[0] in classes and (
                    short.split(".")[0] + ".*") in wanted:
                selected.addTest(case)
        tests = loader.suiteClass([selected])
    if args.exclude_file:
        with open(args.exclude_file) as f:
            excluded = {line.strip() for line in f if line.strip()}
        kept = unittest.TestSuite(
            case for case in _iter_cases(tests) if _short_id(case) not in excluded)
        tests = loader.suiteClass([kept])
    with open(args.results, "a", buffering=1) as out:
        result = JsonLinesResult(out, args.timeout)
        module_suite = unittest.TestSuite([tests])
        suite.setUpModule()
        try:
            module_suite.run(result)
        finally:
            suite.tearDownModule()
            out.write(json.dumps({"finished": True}) + "\n")
    return 0


def _iter_cases(suite: unittest.TestSuite) -> Any:
    for item in suite:
        if isinstance(item, unittest.TestSuite):
            yield from _iter_cases(item)
        else:
            yield item


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Threads a failed test left blocked must not keep the interpreter from exiting.
    os._exit(code)
