"""How many CPUs this process may use: its affinity mask, capped by its cgroup's CPU quota.

`os.cpu_count()` counts the node's cores. In a pod with a CPU limit, a thread pool sized from it
(torch, ONNX Runtime, OpenMP) runs more threads than the quota pays for, and the kernel throttles them
all at once, every period. kaito-serve (transformers backend), kaito-rag (embeddings) and kaito-tune
size their thread pools with `available_cpus()` instead.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")  # this process's cgroups, one line per hierarchy: "ID:controllers:/path"


def available_cpus(root: str | os.PathLike | None = None) -> int:
    """The CPUs in this process's affinity mask, at most its CPU quota rounded up; at least 1.
    `root`: where the cgroup file system is mounted (CGROUP_ROOT)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    quota = cpu_quota(root)
    return max(1, min(cpus, math.ceil(quota)) if quota is not None else cpus)


def cpu_quota(root: str | os.PathLike | None = None) -> float | None:
    """The least CPU quota (CPUs' worth of time per period) of this process's cgroup and its parents:
    cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`. None when there is none."""
    quotas = [q for folder in _folders(Path(root or CGROUP_ROOT)) if (q := _quota(folder)) is not None]
    return min(quotas) if quotas else None


def _folders(root: Path) -> Iterator[Path]:
    """The process's cgroup folders (from PROC_CGROUP) and their parents, under `root` and under
    v1's cpu controller mounts; the root itself always (a container sees its own cgroup there)."""
    try:
        with open(PROC_CGROUP) as f:
            paths = {line.rstrip("\n").split(":", 2)[2].lstrip("/") for line in f if line.count(":") >= 2}
    except OSError:
        paths = set()
    for base in (root, root / "cpu", root / "cpu,cpuacct"):
        for path in paths | {""}:
            folder = base / path
            while True:
                yield folder
                if folder == base:
                    break
                folder = folder.parent


def _quota(folder: Path) -> float | None:
    try:
        if (folder / "cpu.max").is_file():  # v2: "max 100000" or "<quota> <period>"
            quota, period = (folder / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        if (folder / "cpu.cfs_quota_us").is_file():  # v1: -1 when unlimited
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            period = int((folder / "cpu.cfs_period_us").read_text())
            return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError, ZeroDivisionError):  # unreadable: no quota known
        pass
    return None
