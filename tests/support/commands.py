"""The project's commands run as a user runs them: a Python process of their own, from any folder."""

from __future__ import annotations

import os
import resource
import select
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_module(
    module: str, *arguments: str | Path, cwd: Path | None = None, max_file_bytes: int | None = None
) -> subprocess.CompletedProcess:
    """`python -m module arguments...` with the checkout importable, its output captured. With max_file_bytes,
    a write that would make a file larger fails with EFBIG (RLIMIT_FSIZE), as a write to a full disk fails."""

    def limit_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the signal kills the process at the write
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    return subprocess.run(
        [sys.executable, "-m", module, *map(str, arguments)],
        capture_output=True,
        text=True,
        check=False,
        cwd=cwd,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
        timeout=600,
        preexec_fn=None if max_file_bytes is None else limit_files,
    )


NOBODY = 65534


def as_unprivileged_user(function: Callable[[], str], timeout_s: float = 120) -> str:
    """function() as a user that file permissions apply to: under root, for which they do not, in a forked
    child that has become `nobody`, as a container's user is not the owner of a mounted file.

    The fork copies one thread of a process that has several (torch's): a lock that another held stays held in
    the child, and Python warns of it. Should the child hang so, it is killed after timeout_s, and the test fails
    rather than the run waiting for ever."""
    if os.geteuid() != 0:
        return function()
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe and never returns
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            answer = function()
            status = 0
        except BaseException as error:  # noqa: BLE001 - any failure is the parent's to report
            answer, status = f"{type(error).__name__}: {error}", 1
        os.write(writer, answer.encode())
        os._exit(status)
    os.close(writer)
    with os.fdopen(reader, "rb") as answer:
        if not select.select([answer], [], [], timeout_s)[0]:  # it writes once, as it ends
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
            raise TimeoutError(f"as user {NOBODY}: no answer within {timeout_s} s")
        text = answer.read().decode()
    _, status = os.waitpid(child, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"as user {NOBODY}: {text}")
    return text
