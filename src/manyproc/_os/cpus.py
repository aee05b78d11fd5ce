"""How many CPUs this process may really use: affinity and container quotas, not the host's.

``os.cpu_count()`` reports the machine; a process pinned to two cores, or a
container limited to 1.5 CPUs by its cgroup, gets oversubscribed when a pool
sizes itself by it.  :func:`usable_cpu_count` takes the smallest of:

* the CPUs in the scheduler affinity mask (``os.sched_getaffinity``, Linux);
* the cgroup v2 ``cpu.max`` quota or the cgroup v1 ``cfs_quota_us / cfs_period_us``
  of this process's own cgroup, rounded up;
* ``PYTHON_CPU_COUNT`` if set (the variable Python 3.13 honours).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

_CGROUP_ROOT = "/sys/fs/cgroup"


@dataclass(frozen=True)
class CpuBudget:
    """The CPU count chosen and where each limit came from (shown in pool statistics)."""

    count: int
    machine: int
    affinity: int | None
    cgroup_quota: float | None
    env_override: int | None


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _own_cgroup_paths(proc_cgroup: str | None = None) -> list[tuple[str, str]]:
    """Return ``(version, directory)`` pairs for this process's cgroups, innermost first."""
    text = proc_cgroup if proc_cgroup is not None else _read("/proc/self/cgroup")
    if not text:
        return []
    found: list[tuple[str, str]] = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            found.append(("v2", os.path.join(_CGROUP_ROOT, path.lstrip("/"))))
        elif "cpu" in controllers.split(","):
            for name in ("cpu,cpuacct", "cpu", "cpuacct,cpu"):
                base = os.path.join(_CGROUP_ROOT, name)
                if os.path.isdir(base):
                    found.append(("v1", os.path.join(base, path.lstrip("/"))))
                    break
    return found


def parse_cpu_max(text: str | None) -> float | None:
    """Quota in CPUs from a cgroup v2 ``cpu.max`` line (``"max 100000"`` means none)."""
    if not text:
        return None
    fields = text.split()
    if not fields or fields[0] == "max":
        return None
    try:
        quota = int(fields[0])
        period = int(fields[1]) if len(fields) > 1 else 100000
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return quota / period


def cgroup_cpu_quota(proc_cgroup: str | None = None) -> float | None:
    """The tightest CPU quota along this process's cgroup path, in CPUs, or None."""
    best: float | None = None
    for version, directory in _own_cgroup_paths(proc_cgroup):
        # walk up: a parent's limit applies too
        current = directory
        while current.startswith(_CGROUP_ROOT) and len(current) >= len(_CGROUP_ROOT):
            if version == "v2":
                quota = parse_cpu_max(_read(os.path.join(current, "cpu.max")))
            else:
                q, p = (_read(os.path.join(current, "cpu.cfs_quota_us")),
                        _read(os.path.join(current, "cpu.cfs_period_us")))
                quota = None
                if q and p and q.lstrip("-").isdigit() and p.isdigit() and int(q) > 0:
                    quota = int(q) / max(int(p), 1)
            if quota is not None:
                best = quota if best is None else min(best, quota)
            parent = os.path.dirname(current)
            if parent == current:
                break
            current = parent
    return best


def cpu_budget() -> CpuBudget:
    """Work out how many CPUs a pool of this process should use, and why."""
    machine = os.cpu_count() or 1
    affinity = None
    if hasattr(os, "sched_getaffinity"):
        try:
            affinity = len(os.sched_getaffinity(0))
        except OSError:
            affinity = None
    quota = cgroup_cpu_quota()
    env = os.environ.get("PYTHON_CPU_COUNT")
    env_override = int(env) if env and env.isdigit() and int(env) > 0 else None
    count = machine
    if affinity:
        count = min(count, affinity)
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    if env_override is not None:
        count = env_override
    return CpuBudget(count=max(1, count), machine=machine, affinity=affinity,
                     cgroup_quota=quota, env_override=env_override)


def usable_cpu_count() -> int:
    """The number of CPUs this process may really use (at least 1)."""
    return cpu_budget().count
