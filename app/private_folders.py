"""The folders that a vit-serve keeps in the temporary directory while it runs: the private copy of the
checkpoint, the metrics of its processes, the model process's socket.

It removes them as it exits, but a vit-serve killed with SIGKILL (the kernel's out-of-memory killer, or
Docker's after the stop grace period) cannot. A container that restarts keeps its /tmp, and each crash
left a copy of the checkpoint there. So each folder names the process that made it, by pid, start time
(a pid alone repeats: a container's server is always pid 1) and pid namespace, and a vit-serve removes
the folders of its kind whose maker no longer runs before it makes its own. A folder made in another
pid namespace (a /tmp shared between containers) is left alone: its pid means nothing here. Where
there is no /proc to ask, folders are made as before and never removed by another run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from functools import cache
from pathlib import Path

OWNER = ".owner"  # in each folder: "PID START-TIME PID-NAMESPACE" of the process that made it


def private_folder(prefix: str) -> Path:
    """A new folder (mode 0700) in the temporary directory, marked as this process's, once the folders of
    the same prefix that processes no longer running left behind are removed. Without a writable temporary
    directory, vit-serve stops: uploads of over 1 MB are spooled there too."""
    try:
        temporary = Path(tempfile.gettempdir())
    except FileNotFoundError:  # no candidate is writable: a container whose root file system is read-only
        raise SystemExit(
            "cannot start: no writable temporary directory (TMPDIR, /tmp, /var/tmp, the working directory); "
            "set TMPDIR to a writable folder, or mount one at /tmp (an emptyDir, say)"
        ) from None
    for folder in temporary.glob(f"{prefix}*"):
        if _abandoned(folder):
            shutil.rmtree(folder, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=temporary))
    if (owner := _identity(os.getpid())) is not None:
        (folder / OWNER).write_text(owner)
    return folder


def _abandoned(folder: Path) -> bool:
    try:
        owner = (folder / OWNER).read_text()
        pid, _, namespace = owner.split()
    except (OSError, ValueError):  # not marked (being made, or made elsewhere), or not ours to read
        return False
    return namespace == _pid_namespace() and _identity(int(pid)) != owner


def _identity(pid: int) -> str | None:
    """The process's pid, start time (clock ticks after boot, /proc/PID/stat's 22nd field) and pid
    namespace, or None where /proc does not have it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    start_time = stat.rsplit(")", 1)[1].split()[19]  # counted after the command, which may hold spaces
    namespace = _pid_namespace()
    return f"{pid} {start_time} {namespace}" if namespace else None


@cache  # a process's pid namespace never changes
def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid").removeprefix("pid:")
    except OSError:
        return None
