"""The ``manyproc`` command line: a thin face over the public API.

``manyproc info`` shows what a pool would see on this machine (start methods, CPU
budget and where its limits come from); ``manyproc run-demo`` runs the demo.
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Sequence


def _info() -> int:
    import manyproc
    from manyproc._os.cpus import cpu_budget

    budget = cpu_budget()
    rows = [
        ("manyproc", manyproc.__version__),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("platform", platform.platform()),
        ("start methods", ", ".join(manyproc.get_all_start_methods())),
        ("default start method", manyproc.get_start_method()),
        ("cpus in the machine", str(budget.machine)),
        ("cpus in affinity mask", str(budget.affinity)),
        ("cgroup cpu quota", "none" if budget.cgroup_quota is None else f"{budget.cgroup_quota:g}"),
        ("PYTHON_CPU_COUNT", "unset" if budget.env_override is None else str(budget.env_override)),
        ("pool size by default", str(budget.count)),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``manyproc`` console script and of ``python -m manyproc``."""
    parser = argparse.ArgumentParser(prog="manyproc", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("info", help="show start methods and the CPU budget a pool would use")
    args = parser.parse_args(argv)
    if args.command in (None, "info"):
        return _info()
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
