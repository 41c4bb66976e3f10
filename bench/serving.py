"""Start the real server (uvicorn in a subprocess) on a free loopback port, for benches and tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

APP = "app.main:create_app"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def uvicorn_command(app: str = APP, port: int | None = None) -> list[str]:
    """The command line that serves `app` (a factory) on a loopback port."""
    port = port or free_port()
    return [sys.executable, "-m", "uvicorn", app, "--factory", "--host", "127.0.0.1", "--port", str(port), "--no-access-log"]


def rss_mb(pid: int) -> float:
    """Resident memory of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS for process {pid}")


@dataclass
class Server:
    process: subprocess.Popen
    base_url: str
    ready_after_s: float  # from process start to the first 200 of /health/ready

    def stop(self, timeout_s: float = 10.0) -> tuple[int, str]:
        """SIGTERM, wait for the exit, and return the exit code and everything the server printed."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            returncode = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            returncode = self.process.wait()
        return returncode, self.process.stdout.read().decode(errors="replace")


def start_server(env: dict[str, str] | None = None, app: str = APP, timeout_s: float = 60.0) -> Server:
    port = free_port()
    process = subprocess.Popen(
        uvicorn_command(app, port),
        env=os.environ | (env or {}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    started = time.monotonic()
    base_url = f"http://127.0.0.1:{port}"
    while time.monotonic() - started < timeout_s:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{process.stdout.read().decode()}")
        try:
            if httpx.get(f"{base_url}/health/ready", timeout=1).status_code == 200:
                return Server(process, base_url, time.monotonic() - started)
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"the server was not ready within {timeout_s} s")


@contextmanager
def running_server(env: dict[str, str] | None = None, app: str = APP) -> Iterator[Server]:
    server = start_server(env, app)
    try:
        yield server
    finally:
        server.stop()
