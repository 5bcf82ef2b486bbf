"""Thread sizing from what the process may run on: affinity, cgroup quota, the pod's CPU limit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from synerdiff.engine.cpus import cgroup_quota, cpu_budget

AFFINITY = len(os.sched_getaffinity(0))


def v2(tmp_path: Path, text: str) -> Path:
    (tmp_path / "cpu.max").write_text(text)
    return tmp_path


def v1(tmp_path: Path, quota: int, period: int) -> Path:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(f"{period}\n")
    return tmp_path


def test_cgroup_quotas_v2_and_v1(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    assert cgroup_quota(v2(tmp_path / "a", "150000 100000\n")) == 1.5
    (tmp_path / "b").mkdir()
    assert cgroup_quota(v2(tmp_path / "b", "max 100000\n")) is None
    (tmp_path / "c").mkdir()
    assert cgroup_quota(v1(tmp_path / "c", 50000, 100000)) == 0.5
    (tmp_path / "d").mkdir()
    assert cgroup_quota(v1(tmp_path / "d", -1, 100000)) is None
    (tmp_path / "e").mkdir()
    assert cgroup_quota(tmp_path / "e") is None  # no cgroup files: no quota


@pytest.mark.parametrize(
    ("cpu_max", "limit", "expected"),
    [
        (None, None, AFFINITY),
        ("max 100000", None, AFFINITY),
        ("100000 100000", None, 1),
        ("50000 100000", None, 1),  # half a CPU still runs one thread
        (None, "1", 1),
        (None, "0.25", 1),
        (None, "not-a-number", AFFINITY),
        (f"{400000 * AFFINITY} 100000", None, AFFINITY),  # a quota above the affinity mask does not add threads
    ],
)
def test_the_budget_is_the_least_of_affinity_quota_and_limit(tmp_path: Path, cpu_max: str | None, limit: str | None, expected: int) -> None:
    if cpu_max is not None:
        v2(tmp_path, cpu_max)
    env = {} if limit is None else {"SYNERDIFF_CPU_LIMIT": limit}
    assert cpu_budget(env, root=tmp_path) == expected
