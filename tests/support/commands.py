"""The project's commands run as a user runs them: a Python process of their own, from any folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_module(module: str, *arguments: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m module arguments...` with the checkout importable, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, arguments)],
        capture_output=True,
        text=True,
        check=False,
        cwd=cwd,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
        timeout=600,
    )
