"""CPU budget: affinity and cgroup quotas (no processes)."""

from __future__ import annotations

from manyproc._os import cpus


def test_parse_cpu_max():
    assert cpus.parse_cpu_max("max 100000") is None
    assert cpus.parse_cpu_max("150000 100000") == 1.5
    assert cpus.parse_cpu_max("50000") == 0.5
    assert cpus.parse_cpu_max("") is None
    assert cpus.parse_cpu_max("garbage here") is None
    assert cpus.parse_cpu_max("-1 100000") is None


def test_cgroup_v2_quota_read_along_the_path(tmp_path, monkeypatch):
    root = tmp_path / "cgroup"
    inner = root / "outer" / "inner"
    inner.mkdir(parents=True)
    (root / "outer" / "cpu.max").write_text("300000 100000\n")
    (inner / "cpu.max").write_text("max 100000\n")
    monkeypatch.setattr(cpus, "_CGROUP_ROOT", str(root))
    assert cpus.cgroup_cpu_quota("0::/outer/inner\n") == 3.0


def test_budget_uses_the_tightest_limit(monkeypatch):
    monkeypatch.setattr(cpus.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(cpus, "cgroup_cpu_quota", lambda: 1.5)
    monkeypatch.delenv("PYTHON_CPU_COUNT", raising=False)
    budget = cpus.cpu_budget()
    assert budget.count == 2 and budget.machine == 64 and budget.affinity == 4
    monkeypatch.setenv("PYTHON_CPU_COUNT", "7")
    assert cpus.usable_cpu_count() == 7
