"""How many connections a serving process may hold: its open-file limit (RLIMIT_NOFILE), of which each
connection takes one.

Linux's default soft limit is 1024; so is a container's under Docker 25 and containerd 2 (1024 soft, 524288
hard), and macOS's is 256. Past it, uvloop (libuv) accepts each new connection and closes it at once, to keep
its loop from spinning, and logs nothing: with 1,000 idle connections held open, a worker reset every new
client without a line in its log. So each serving process raises its soft limit to its hard one at start, as
Go's runtime does for every program, and where the hard one is low too, it says so.
"""

from __future__ import annotations

import resource

# macOS has no hard limit (RLIM_INFINITY) and refuses a soft one above its kernel's per-process maximum;
# OPEN_MAX, 10240, is within it.
MACOS_OPEN_MAX = 10240
FEW_OPEN_FILES = 4096  # below this even after raising, start-up warns


def raise_open_files_limit() -> int:
    """The soft limit raised to the hard one, or to MACOS_OPEN_MAX where that is refused; the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for wanted in (hard, MACOS_OPEN_MAX):
        if wanted == resource.RLIM_INFINITY or wanted <= soft:
            continue
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):
            continue
        return wanted
    return soft


def few_open_files(limit: int) -> str | None:
    """The warning for a limit that stays low, or None."""
    if limit >= FEW_OPEN_FILES:
        return None
    return (
        f"this process may open {limit} files (RLIMIT_NOFILE, its hard limit): it holds fewer connections than "
        "that at once, and resets each one past them without a line in the log; raise the hard limit (ulimit -Hn, "
        "docker run --ulimit nofile=65536, ulimits in Compose, LimitNOFILE in a systemd unit)"
    )
