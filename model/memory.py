"""The memory this process may still take, from the kernel's account and its cgroup's, so that a run that
cannot hold its images is refused before it decodes them, rather than killed by the kernel after."""

from __future__ import annotations

from pathlib import Path

UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a number near 2**63


def available_memory(meminfo: Path = Path("/proc/meminfo"), cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes this process may still allocate: the kernel's MemAvailable and free swap, or less where its
    cgroup's limit leaves less. None where neither can be read (not Linux)."""
    budgets = [budget for budget in (_kernel_available(meminfo), _cgroup_available(cgroup)) if budget is not None]
    return min(budgets, default=None)


def _kernel_available(meminfo: Path) -> int | None:
    try:
        fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line)
        return 1024 * sum(int(fields[name].split()[0]) for name in ("MemAvailable", "SwapFree"))
    except (OSError, KeyError, ValueError):
        return None


def _cgroup_available(root: Path) -> int | None:
    """The limit less the usage that cannot be reclaimed: all but the inactive file cache, as `docker stats`
    counts it (the cache of files read once, the images among them, is given back under pressure)."""
    for limit, usage, stat, cache in (
        ("memory.max", "memory.current", "memory.stat", "inactive_file"),  # cgroup v2
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "memory/memory.stat", "total_inactive_file"),
    ):
        try:
            text = (root / limit).read_text().strip()
            if text == "max" or int(text) >= UNLIMITED:
                return None
            stats = dict(line.split() for line in (root / stat).read_text().splitlines())
            return int(text) - int((root / usage).read_text()) + int(stats.get(cache, 0))
        except (OSError, ValueError):
            continue
    return None


def sized(count: int) -> str:
    """A count of bytes as a person reads it: 30 KiB, 288.0 MiB, 7.5 GiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count / 2**10:.0f} KiB"
