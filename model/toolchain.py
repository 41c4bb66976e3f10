"""What torch.compile needs of the machine, found without torch: a C++ compiler and Python's headers, with
which Inductor builds its CPU kernels and Triton its GPU kernels' launchers. A slim image (Debian's, and ours)
has neither, and the first compiled call failed deep in Inductor, after the model had loaded, with a traceback:
"No working C++ compiler found", or "C++ compile error" where only Python.h was missing."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import sysconfig
from pathlib import Path


def cxx() -> str:
    """The compiler Inductor runs: $CXX, else g++ (clang++ on macOS)."""
    return os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")


def missing_for_compile() -> str | None:
    """What torch.compile lacks on this machine, in words, or None."""
    missing = []
    command = shlex.split(cxx())
    if not command or shutil.which(command[0]) is None:
        missing.append(f"a C++ compiler ({cxx()}; CXX names another)")
    include = Path(sysconfig.get_path("include"))
    if not (include / "Python.h").is_file():
        missing.append(f"Python's headers (no Python.h in {include})")
    if not missing:
        return None
    apt = "apt-get install g++ python3-dev"
    return f"{' and '.join(missing)}, with which torch.compile builds its kernels (Debian: {apt})"
