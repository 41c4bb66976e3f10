"""A Docker engine, the images of the repo built with BuildKit, and Compose, for the Docker test.

Docker Hub and PyTorch's index may be out of reach (they are on the machines this project is tested
on). Then the base image is made from Debian's registry with debootstrap, as Debian makes its official
one, and torch comes from a CPU wheel that pip's own configuration finds on this machine, served as a
package index on loopback.
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BASE_IMAGE = "debian:bookworm-slim"
CA_BUNDLE = Path(os.environ.get("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt"))
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# The loopback index's port is part of TORCH_INDEX_URL, a build argument, and BuildKit reuses the torch
# layer only for the same arguments: on a random port every run would build and keep 1.3 GB of new layers.
LOCAL_INDEX_PORT = 29417


def run(*command: str, timeout_s: float = 600, env: dict | None = None) -> str:
    """The command's output (stdout and stderr); a failure raises with all of it."""
    result = subprocess.run(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout_s,
        env=os.environ | (env or {}), check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {result.returncode}:\n{result.stdout}")
    return result.stdout


def succeeds(*command: str, timeout_s: float = 300) -> bool:
    if shutil.which(command[0]) is None:
        return False
    return subprocess.run(command, capture_output=True, timeout=timeout_s, check=False).returncode == 0


def engine_running() -> bool:
    return succeeds("docker", "info", timeout_s=30)


def start_engine(timeout_s: float = 60) -> str | None:
    """A running Docker engine, started here if it is installed and we are root; else why there is none."""
    if engine_running():
        return None
    if shutil.which("dockerd") is None or os.geteuid() != 0:
        return "no Docker engine: dockerd is not installed, or not startable without root"
    log = Path(tempfile.gettempdir()) / "dockerd.log"
    with open(log, "ab") as output:  # dockerd keeps its own copy of the descriptor, and outlives this call
        subprocess.Popen(["dockerd"], stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if engine_running():
            return None
        time.sleep(0.5)
    return f"dockerd did not answer within {timeout_s} s (see {log})"


def build_command() -> tuple[list[str], dict[str, str]] | None:
    """A docker CLI that builds with BuildKit: buildx where installed, else a client of the 20.10 series
    (Debian's), which has BuildKit built in; newer clients need buildx for it."""
    if succeeds("docker", "buildx", "version"):
        return ["docker", "buildx", "build", "--load"], {}
    for client in ("docker", "/usr/bin/docker"):
        if succeeds(client, "version") and int(run(client, "version", "-f", "{{.Client.Version}}").split(".")[0]) < 23:
            return [client, "build"], {"DOCKER_BUILDKIT": "1"}
    return None


def compose_command() -> list[str] | None:
    """Compose v2 (the docker plugin) or v1 (Debian's docker-compose): the compose files are valid for both."""
    if succeeds("docker", "compose", "version"):
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def ensure_base_image() -> str | None:
    """debian:bookworm-slim from the hub, or made with debootstrap; None when it is there, else why not."""
    if succeeds("docker", "image", "inspect", BASE_IMAGE) or succeeds("docker", "pull", BASE_IMAGE):
        return None
    if shutil.which("debootstrap") is None or os.geteuid() != 0:
        return f"{BASE_IMAGE} cannot be pulled, and debootstrap (as root) is not there to make it"
    with tempfile.TemporaryDirectory() as root:
        run("debootstrap", "--variant=minbase", "bookworm", root, "http://deb.debian.org/debian", timeout_s=900)
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            shutil.rmtree(Path(root) / cache, ignore_errors=True)
        tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(
            ["docker", "import", "-c", 'CMD ["bash"]', "-", BASE_IMAGE],
            stdin=tar.stdout,
            stdout=subprocess.DEVNULL,
            check=True,
        )
        tar.wait()
    return None


def reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5):
            return True
    except OSError:
        return False


@contextmanager
def torch_build_args() -> Iterator[dict[str, str] | None]:
    """The Dockerfile's defaults when PyTorch's CPU index answers; else a CPU wheel from pip's find-links,
    served on loopback as an index (build with --network host). None when there is neither."""
    if reachable(f"{TORCH_CPU_INDEX}/torch/"):
        yield {}
        return
    wheel = _local_cpu_torch_wheel()
    if wheel is None:
        yield None
        return
    with tempfile.TemporaryDirectory() as index:
        project = Path(index) / "simple" / "torch"
        project.mkdir(parents=True)
        (project / wheel.name).symlink_to(wheel)
        (project / "index.html").write_text(f'<a href="{wheel.name}">{wheel.name}</a>\n')
        handler = functools.partial(_QuietHandler, directory=index)
        with _index_server(handler) as server:
            threading.Thread(target=server.serve_forever, daemon=True).start()
            version = re.match(r"torch-([^-]+)-", wheel.name).group(1).split("+")[0]
            # No torchvision: pip's indexes hold PyPI's, built against PyPI's CUDA torch, which does not import
            # beside a CPU one. The image is then built as TORCHVISION_VERSION's empty value leaves it.
            url = f"http://127.0.0.1:{server.server_port}/simple"
            yield {"TORCH_INDEX_URL": url, "TORCH_VERSION": version, "TORCHVISION_VERSION": ""}
            server.shutdown()


def _index_server(handler) -> http.server.ThreadingHTTPServer:
    """On LOCAL_INDEX_PORT, or on any free port where another program holds that one (a cold build then)."""
    try:
        return http.server.ThreadingHTTPServer(("127.0.0.1", LOCAL_INDEX_PORT), handler)
    except OSError:
        return http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)


def _local_cpu_torch_wheel() -> Path | None:
    found = subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", "global.find-links"], capture_output=True, text=True, check=False
    )
    folders = found.stdout.split()
    wheels = sorted(wheel for folder in folders for wheel in Path(folder).glob("torch-*+cpu-cp311-*.whl"))
    return wheels[-1] if wheels else None


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def build_image(
    command: list[str], env: dict[str, str], tag: str, context: Path, args: dict, dockerfile: str = "Dockerfile"
) -> tuple[float, str]:
    """Build with the host's CA bundle as the `ca` secret (pip needs it behind a TLS proxy): seconds taken,
    and BuildKit's log. The image that had the tag before is removed, so that runs leave no untagged images."""
    replaced = _image_id(tag)
    started = time.monotonic()
    build = [*command, "--progress", "plain", "--network", "host", "-t", tag, "-f", str(context / dockerfile)]
    build += [item for name, value in args.items() for item in ("--build-arg", f"{name}={value}")]
    if CA_BUNDLE.is_file():
        build += ["--secret", f"id=ca,src={CA_BUNDLE}"]
    log = run(*build, str(context), env=env, timeout_s=1800)
    seconds = time.monotonic() - started
    if replaced not in (None, _image_id(tag)):
        succeeds("docker", "image", "rm", replaced)  # fails, harmlessly, where a container still uses it
    return seconds, log


def cached_steps(log: str) -> list[str]:
    """The Dockerfile instructions that a build took from BuildKit's cache, read from its plain log:
    `#7 [stage-0 4/11] RUN pip install ...` names step #7, and `#7 CACHED` says where it came from."""
    steps = dict(re.findall(r"^(#\d+) \[[^]]*\] (.+)$", log, re.MULTILINE))
    return [steps[step] for step in re.findall(r"^(#\d+) CACHED$", log, re.MULTILINE) if step in steps]


def _image_id(tag: str) -> str | None:
    inspect = ["docker", "image", "inspect", "-f", "{{.Id}}", tag]
    found = subprocess.run(inspect, capture_output=True, text=True, check=False)
    return found.stdout.strip() if found.returncode == 0 else None


def health(container: str) -> str:
    return run("docker", "inspect", "-f", "{{.State.Health.Status}}", container).strip()


def wait_healthy(containers: list[str], timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while (states := [health(container) for container in containers]) != ["healthy"] * len(containers):
        if time.monotonic() > deadline:
            logs = "".join(run("docker", "logs", "--tail", "30", container) for container in containers)
            states = dict(zip(containers, states, strict=True))
            raise AssertionError(f"not healthy within {timeout_s} s: {states}\n{logs}")
        time.sleep(1)


class Compose:
    """One Compose project of the repo's files, publishing on `port` (VIT_PUBLISHED_PORT), and gRPC on `grpc_port`
    (VIT_PUBLISHED_GRPC_PORT)."""

    def __init__(self, command: list[str], root: Path, project: str, port: int, grpc_port: int) -> None:
        self.command, self.root, self.project, self.port, self.grpc_port = command, root, project, port, grpc_port

    def run(self, files: list[str], *arguments: str, env: dict[str, str] | None = None) -> str:
        """Compose's command on `files`, in this shell's environment with `env` added, as a user's shell sets it."""
        paths = [item for name in files for item in ("-f", str(self.root / name))]
        env = {"VIT_PUBLISHED_PORT": str(self.port), "VIT_PUBLISHED_GRPC_PORT": str(self.grpc_port)} | (env or {})
        return run(*self.command, "-p", self.project, *paths, *arguments, env=env)

    def containers(self, files: list[str], service: str) -> list[str]:
        return self.run(files, "ps", "-q", service).split()
