"""The CPU budget of this process, read without torch so that a supervising process can size itself cheaply."""

from __future__ import annotations

import math
import os
from pathlib import Path


def runnable_cpus() -> int:
    """CPUs this process may run on: its affinity, so a container's cpuset, not the host's count. macOS and
    Windows have no affinity to read (no os.sched_getaffinity), and every command stopped there with an
    AttributeError: there, all of the machine's CPUs."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def beyond_runnable_cpus(count: int) -> str | None:
    """Why `count` threads or processes are too many, or None: beyond the CPUs this process may run on they
    only wait on one another, and at 100000 torch's threads crashed a server's worker (SIGSEGV) and its decoder
    processes hung its start-up."""
    if count <= (cpus := runnable_cpus()):
        return None
    cpus_named = "the 1 CPU" if cpus == 1 else f"the {cpus} CPUs"
    return f"more than {cpus_named} this process may run on, which is as many as can run at once"


def local_processes() -> int:
    """The processes that torchrun starts on this machine (LOCAL_WORLD_SIZE), one without torchrun."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def cpu_quota() -> int:
    """CPUs this process may use: the container's CFS quota if one is set, else its CPU affinity.

    torch sizes its thread pool from the host's core count, which oversubscribes a container limited
    to fewer CPUs than the machine has.
    """
    available = runnable_cpus()
    for path, parse in (
        (Path("/sys/fs/cgroup/cpu.max"), _cgroup_v2_quota),
        (Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), _cgroup_v1_quota),
    ):
        if path.exists():
            quota = parse(path)
            if quota is not None:
                return max(1, min(available, math.ceil(quota)))
    return available


def cpu_share() -> int:
    """CPUs for each of the training processes that torchrun starts on this machine (local_processes): its
    quota split between them, at least 1. Each process sized its decoding threads
    and its augmentation workers from the whole machine, and eight of them ran eight times the cores."""
    return max(1, cpu_quota() // local_processes())


def _cgroup_v2_quota(path: Path) -> float | None:
    quota, period = path.read_text().split()[:2]
    return None if quota == "max" else int(quota) / int(period)


def _cgroup_v1_quota(path: Path) -> float | None:
    quota = int(path.read_text())
    period = int((path.parent / "cpu.cfs_period_us").read_text())
    return None if quota <= 0 else quota / period
