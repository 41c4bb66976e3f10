"""What torch.compile needs of the machine, found without torch: on the CPU a C++ compiler, with which Inductor
builds its kernels; on CUDA a C compiler, with which Triton builds its kernels' launchers; and Python's headers
for either. A slim image (Debian's, and ours) has none of them, and the first compiled call failed deep in
Inductor, after the model had loaded, with a traceback: "No working C++ compiler found", or "C++ compile error"
where only Python.h was missing. The kernels are then loaded from Inductor's folder in the temporary one, which
`docker run --read-only --tmpfs /tmp` mounts noexec: there the traceback said "failed to map segment from shared
object"."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path


def _compiler(on_cuda: bool) -> tuple[str, str | None]:
    """The compiler as it is asked for, and where it is (None: nowhere): Triton's $CC, else gcc or clang;
    Inductor's $CXX, else g++ (clang++ on macOS)."""
    if on_cuda:
        if chosen := os.environ.get("CC"):
            return chosen, shutil.which(chosen)
        return "gcc or clang; CC names another", shutil.which("gcc") or shutil.which("clang")
    chosen = os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")
    command = shlex.split(chosen)
    return f"{chosen}; CXX names another", shutil.which(command[0]) if command else None


def missing_for_compile(on_cuda: bool) -> str | None:
    """What torch.compile lacks on this machine, for the CPU or CUDA, in words, or None."""
    missing = []
    asked, found = _compiler(on_cuda)
    if found is None:
        missing.append(f"a {'C' if on_cuda else 'C++'} compiler ({asked})")
    include = Path(sysconfig.get_path("include"))
    if not (include / "Python.h").is_file():
        missing.append(f"Python's headers (no Python.h in {include})")
    if missing:
        apt = f"apt-get install {'gcc' if on_cuda else 'g++'} python3-dev"
        return f"{' and '.join(missing)}, with which torch.compile builds its kernels (Debian: {apt})"
    folder = _kernel_folder()
    if _runs_no_programs(folder):
        return (
            f"a folder where the kernels it builds may run, and {folder} is on a file system mounted noexec: mount "
            "it with exec (docker run --tmpfs /tmp:exec), or name another folder in TORCHINDUCTOR_CACHE_DIR"
        )
    return None


def _kernel_folder() -> Path:
    """Where Inductor writes and loads its kernels: TORCHINDUCTOR_CACHE_DIR, else a folder of the temporary one."""
    return Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or tempfile.gettempdir()).absolute()


def _runs_no_programs(folder: Path) -> bool:
    """Whether the folder, or its nearest ancestor that exists, is on a file system mounted noexec."""
    noexec = getattr(os, "ST_NOEXEC", 0)  # Linux's flag; elsewhere nothing is refused
    existing = next(path for path in (folder, *folder.parents) if path.exists())
    return bool(os.statvfs(existing).f_flag & noexec)
