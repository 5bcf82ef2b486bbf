"""How many CPU threads the engine's torch should use: what this process may really run on.

torch defaults to one intra-op thread per core of the machine, and its OpenMP threads spin
while they wait. In a container limited to fewer CPUs than the node has (a CFS quota), or
beside another busy process, spinning threads steal each other's time slices: on 2 shared
cores a lone 50-step request took 25-27 s instead of 1.7-1.9 s. So the count comes from the
CPU affinity mask, the cgroup's CPU quota and the pod's CPU limit (`SYNERDIFF_CPU_LIMIT`,
which the operator sets from the container's limit), whichever is least; the engine runs one
thread fewer than that (the server's own thread needs a CPU too), and the OpenMP wait policy
is made passive where the process starts (`synerdiff serve`, the engine image).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_quota(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs allowed by the cgroup's CFS quota (v2 `cpu.max`, or v1), None when unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def cpu_budget(env: dict[str, str] | None = None, root: Path = CGROUP_ROOT) -> int:
    """The threads worth running: the least of affinity, cgroup quota and SYNERDIFF_CPU_LIMIT, at least 1."""
    env = dict(os.environ) if env is None else env
    limits: list[float] = [float(len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else float(os.cpu_count() or 1)]
    quota = cgroup_quota(root)
    if quota is not None:
        limits.append(quota)
    try:
        limit = float(env.get("SYNERDIFF_CPU_LIMIT", ""))
        if limit > 0:
            limits.append(limit)
    except ValueError:
        pass
    # A fractional quota still gets its share of a thread; round up, as the kubelet's Downward API does.
    return max(1, math.ceil(min(limits) - 1e-9))
