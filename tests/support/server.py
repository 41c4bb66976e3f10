"""The real server (uvicorn or vit-serve, in a subprocess) on a free loopback port, for tests and benches."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
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
    return [
        sys.executable,
        "-m",
        "uvicorn",
        app,
        "--factory",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-access-log",
    ]


def vit_serve_command(port: int) -> tuple[list[str], dict[str, str]]:
    """What the Docker image runs (vit-serve, with its default worker count), on a loopback port."""
    return [sys.executable, "-m", "app.cli"], {
        "VIT_HOST": "127.0.0.1",
        "VIT_PORT": str(port),
        "VIT_ACCESS_LOG": "false",
    }


def rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (a vit-serve supervisor and its workers), from /proc."""
    return sum(_own_rss_kb(member) for member in process_tree(pid)) / 1024


def process_tree(pid: int) -> list[int]:
    """The process and its descendants, parents first; one that has left /proc when it is read is left out.

    A worker killed by a test, or a short-lived child, can be reaped between the listing of its
    parent's children and the reading of its own, and must not fail the test that reads the tree.
    """
    if not Path(f"/proc/{pid}").exists():
        return []
    return [pid] + [member for child in children(pid) for member in process_tree(child)]


def children(pid: int) -> list[int]:
    """The process's own children (not theirs); none once it has exited."""
    try:
        return [
            int(child)
            for task in Path(f"/proc/{pid}/task").iterdir()
            for child in (task / "children").read_text().split()
        ]
    except (FileNotFoundError, ProcessLookupError):
        return []


def running(pid: int) -> bool:
    """Alive and not a zombie (an exited child that init has not reaped yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def survivors(pids: list[int], timeout_s: float = 5.0) -> dict[int, str]:
    """The processes still running after up to `timeout_s`, with their command lines.

    A supervisor's helpers (multiprocessing's resource tracker) exit a moment after it, once they see it gone.
    """
    deadline = time.monotonic() + timeout_s
    while (alive := [pid for pid in pids if running(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return {pid: command_line(pid) for pid in alive}


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User plus system CPU time of a process, or of one of its threads, from /proc; 0 once it has exited."""
    path = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """Each thread's CPU time; the main thread's id is the process's."""
    try:
        threads = [int(name) for name in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return {}
    return {thread: cpu_seconds(pid, thread) for thread in threads}


def torch_loaded(pid: int) -> bool:
    """Whether the process has torch's library mapped: a worker that runs the model, past its imports (not the
    supervisor, a decoder process, or a front end of a model process)."""
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except FileNotFoundError:
        return "(exited)"


def listening_on_unix_socket(pid: int, name: str) -> bool:
    """Whether the process holds a Unix socket bound to a path ending in `name` (its listener or accepted ones)."""
    return not _unix_sockets(name).isdisjoint(_socket_inodes(pid))


def unix_connections(pid: int, name: str) -> int:
    """How many connected Unix sockets the process holds on a path ending in `name`: the connections that
    its listener there has accepted (a model process's front ends)."""
    return len(_unix_sockets(name, UNIX_CONNECTED) & _socket_inodes(pid))


def _unix_sockets(name: str, state: str | None = None) -> set[str]:
    """The inodes of the Unix sockets on a path ending in `name`, in `state` if given."""
    inodes = set()
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if line.endswith(name) and state in (None, fields[5]):
            inodes.add(fields[6])
    return inodes


UNIX_CONNECTED = "03"  # a state as /proc/net/unix writes it
TCP_LISTEN, TCP_ESTABLISHED = "0A", "01"  # states as /proc/net/tcp writes them


def listening_workers(server: Server, port: int, count: int, timeout_s: float = 30) -> dict[int, set[str]]:
    """Each process of the server that listens on the port, with its listening sockets, once `count` do.

    Ready means one worker is; the others may still be starting (a front end of a model process connects
    to it during its start-up, and listens after)."""
    deadline = time.monotonic() + timeout_s
    while True:
        held = tcp_sockets(process_tree(server.process.pid), port, TCP_LISTEN)
        listening = {pid: inodes for pid, inodes in held.items() if inodes}
        if len(listening) >= count or time.monotonic() > deadline:
            return listening
        time.sleep(0.1)


def wait_in_flight(server: Server, count: int, timeout_s: float = 10) -> None:
    """Until the server counts `count` requests in flight (GET /model's batching.in_flight): accepted, unanswered."""
    deadline = time.monotonic() + timeout_s
    while httpx.get(f"{server.base_url}/model", timeout=10).json()["batching"]["in_flight"] < count:
        assert time.monotonic() < deadline, f"{count} requests were never in flight together"
        time.sleep(0.02)


def tcp_sockets(pids: list[int], port: int, state: str) -> dict[int, set[str]]:
    """For each process, the inodes of the TCP sockets that it holds with local `port`, in `state`."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == state:
                inodes.add(fields[9])
    return {pid: inodes & _socket_inodes(pid) for pid in pids}


def _socket_inodes(pid: int) -> set[str]:
    """The inodes of the sockets among the process's descriptors; none once it has exited."""
    try:
        targets = [path.readlink().name for path in Path(f"/proc/{pid}/fd").iterdir()]
    except (FileNotFoundError, PermissionError):
        return set()
    return {target[8:-1] for target in targets if target.startswith("socket:[")}


def _own_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise ValueError(f"no VmRSS for process {pid}")


@dataclass
class Server:
    process: subprocess.Popen
    base_url: str
    ready_after_s: float  # from process start to the first 200 of /health/ready
    log: Path | None = None  # where its output goes, if not to a pipe

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])

    def stop(self, timeout_s: float = 10.0) -> tuple[int, str]:
        """SIGTERM, wait for the exit, and return the exit code and everything the server printed.

        Workers left running after it are killed first: they hold its output open, which would never end.
        """
        members = process_tree(self.process.pid) if self.process.poll() is None else []
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            returncode = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            returncode = self.process.wait()
        for pid in survivors(members[1:], timeout_s=1.0):
            os.kill(pid, signal.SIGKILL)
        return returncode, _output(self.process, self.log)


def start_server(
    env: dict[str, str] | None = None,
    app: str | None = APP,
    timeout_s: float = 60.0,
    log: Path | None = None,
    cwd: Path | None = None,
    open_files: tuple[int, int] | None = None,
) -> Server:
    """Start the factory `app` under uvicorn, or for None the vit-serve command, and wait until it is ready.

    Its output is read at stop() from a pipe, or with `log` from that file: a pipe that nobody reads
    fills up and stops a server that logs every request. With `cwd`, it runs that checkout's source. With
    `open_files`, it starts with that soft and hard limit on open files (RLIMIT_NOFILE), as `ulimit -n` sets them.
    """

    def limit_open_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, open_files)

    port = free_port()
    command, command_env = vit_serve_command(port) if app is None else (uvicorn_command(app, port), {})
    with log.open("wb") if log else nullcontext(subprocess.PIPE) as stdout:  # the child keeps its own copy
        source = {"PYTHONPATH": str(cwd)} if cwd else {}
        process = subprocess.Popen(
            command,
            env=os.environ | command_env | source | (env or {}),
            stdout=stdout,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            preexec_fn=None if open_files is None else limit_open_files,  # noqa: PLW1509 - one system call, no lock
        )
    return ready_server(process, f"http://127.0.0.1:{port}", log, timeout_s)


def ready_server(
    process: subprocess.Popen, base_url: str, log: Path | None, timeout_s: float, health: str = "/health/ready"
) -> Server:
    """The server that `process`, just started, runs, once `health` answers 200; killed if it is not ready in time."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{_output(process, log)}")
        try:
            if httpx.get(f"{base_url}{health}", timeout=1).status_code == 200:
                return Server(process, base_url, time.monotonic() - started, log)
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"the server was not ready within {timeout_s} s")


def _output(process: subprocess.Popen, log: Path | None) -> str:
    """Everything an exited server printed, from its pipe or its log file."""
    return (process.stdout.read() if log is None else log.read_bytes()).decode(errors="replace")


@contextmanager
def running_server(
    env: dict[str, str] | None = None, app: str | None = APP, open_files: tuple[int, int] | None = None
) -> Iterator[Server]:
    """A started server that is stopped however the block ends."""
    server = start_server(env, app, open_files=open_files)
    try:
        yield server
    finally:
        server.stop()
