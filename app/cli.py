"""The vit-serve command: uvicorn with VIT_HOST, VIT_PORT, VIT_WORKERS, VIT_ACCESS_LOG and VIT_KEEP_ALIVE_S,
and with VIT_MODEL_PROCESS the model process that its workers feed (app/model_process.py).

Every setting comes from the environment (app/config.py), as in the Docker image and the compose files;
`vit-serve --help` lists them. An argument such as `--port 9000` stops it with the variable to set instead:
a server that ignored it would listen somewhere the user does not expect.

This module does not import torch: with several workers its process only supervises them, and torch
would slow every start and hold memory that never serves a request (start-up and memory: README, Benchmarks).
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import logging
import logging.config
import multiprocessing
import os
import shutil
import signal
import socket
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from multiprocessing.connection import Connection
from pathlib import Path

import uvicorn
from pydantic import ValidationError
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Multiprocess

from app import gpus
from app.config import (
    ENV_FILE,
    METRICS_DIRECTORY_VARIABLE,
    Settings,
    conflicts,
    env_file_settings,
    environment_name,
    get_settings,
    settings_problems,
    unknown_variables,
)
from app.http_protocol import LimitedHttpToolsProtocol
from app.listeners import WorkerSocket, address, bound_socket, worker_sockets
from app.logs import log_config
from app.private_folders import private_folder
from model.cpu import cpu_quota
from model.metadata import CheckpointError, read_metadata

logger = logging.getLogger("app.cli")


# Each worker holds its own torch and weights (memory per process: README, Benchmarks): an unlimited
# container on a 64-core host must not start 64 of them unasked. Past this, workers get more threads.
AUTO_WORKER_LIMIT = 4
AUTO_FRONT_END_LIMIT = 16  # front ends of a model process hold no weights


def serves_on_gpu(settings: Settings) -> bool:
    """Whether the model runs on a GPU. For auto, as torch will decide in the process that runs it: a GPU that the
    driver reports but torch cannot use gave the GPU's layout (one model process, with one torch thread) to a
    model served from the CPU."""
    if settings.device == "auto":
        return gpus.nvidia_gpu_count() > 0 and auto_device_note(settings) is None
    return settings.device.startswith("cuda")


def auto_device_note(settings: Settings) -> str | None:
    """For auto, where the driver reports a GPU that torch cannot use: that the CPU serves, and why."""
    if settings.device != "auto" or gpus.nvidia_gpu_count() == 0 or (reason := gpus.unusable_gpu()) is None:
        return None
    return f"VIT_DEVICE=auto serves from the CPU: the NVIDIA driver reports a GPU, but {reason}"


def runs_model_process(settings: Settings) -> bool:
    """VIT_MODEL_PROCESS, or unset: on a GPU, where it serves about twice what workers with a CUDA context
    each do (README, GPU), and not on the CPU, where one process per core wins."""
    return serves_on_gpu(settings) if settings.model_process is None else settings.model_process


def worker_count(settings: Settings) -> int:
    """VIT_WORKERS, or for 0: one process per CPU of the quota (at most AUTO_WORKER_LIMIT) on the CPU; with a
    model process, one front end per CPU but one (at most AUTO_FRONT_END_LIMIT); one on a GPU without.

    A small model on the CPU runs faster as one single-threaded process per core than as one process
    with a thread per core: HTTP parsing and decoding then run beside the model instead of queueing
    behind one event loop. A GPU without a model process wants one process, so that one copy of the
    weights gets every batch.
    """
    if settings.workers:
        return settings.workers
    if runs_model_process(settings):  # front ends parse and decode only: one per CPU but the model process's
        return max(1, min(cpu_quota() - 1, AUTO_FRONT_END_LIMIT))
    return 1 if serves_on_gpu(settings) else min(cpu_quota(), AUTO_WORKER_LIMIT)


@contextmanager
def shared_metrics(processes: int) -> Iterator[None]:
    """With several processes, a fresh, empty PROMETHEUS_MULTIPROC_DIR for all of them (app/metrics.py), removed
    at exit: whichever process answers a scrape reports the sum, and nothing from an earlier run is counted."""
    if processes < 2:
        yield
        return
    folder = private_folder("vit-metrics-")
    os.environ[METRICS_DIRECTORY_VARIABLE] = str(folder)  # set before any of them imports prometheus_client
    try:
        yield
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def pinned_checkpoint(settings: Settings) -> Iterator[Path]:
    """Every process of this server, a restarted worker too, serves the checkpoint as it was at start.

    They load a private copy, read-only, whose sha256 is pinned (VIT_CHECKPOINT and
    VIT_CHECKPOINT_SHA256 in their environment). A restarted worker used to load whatever the path
    held then: a replaced file gave two models behind one address, a truncated one a worker that
    failed its start every few seconds while the others still answered ready.
    """
    source = settings.checkpoint
    try:
        read_metadata(source)  # a file that is no checkpoint of ours stops start-up here, named as the user named it
    except CheckpointError as error:
        raise SystemExit(f"cannot start: {error}") from None
    folder = private_folder("vit-checkpoint-")
    try:
        copy = folder / source.name
        try:
            shutil.copyfile(source, copy)
        except FileNotFoundError:
            raise SystemExit(f"cannot start: {source}: no such checkpoint file") from None
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):  # the copy's disk, not the checkpoint's, as it read
                raise SystemExit(
                    f"cannot start: no room in {folder.parent} for this server's copy of {source} ({error.strerror}); "
                    "free some there, or set TMPDIR to a folder that has it"
                ) from None
            raise SystemExit(f"cannot start: {source}: {error.strerror}") from None
        copy.chmod(0o444)
        with copy.open("rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
        if settings.checkpoint_sha256 and digest != settings.checkpoint_sha256.lower():
            raise SystemExit(
                f"cannot start: {source}: sha256 differs from VIT_CHECKPOINT_SHA256={settings.checkpoint_sha256}"
            )
        os.environ.update(VIT_CHECKPOINT=str(copy), VIT_CHECKPOINT_SHA256=digest)
        logger.info("serving %s (sha256 %s) from a copy taken at start, %s", source, digest, copy)
        yield copy
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def serve(argv: list[str] | None = None) -> None:
    parse_arguments(argv)
    from_file = env_file_settings()
    os.environ.update(from_file)  # the workers, spawned, and the model process inherit them
    settings = checked_settings()
    logging.config.dictConfig(log_config(settings.log_format, settings.root_path))
    if from_file:  # their names, never their values: VIT_API_KEY may be among them
        logger.info("settings from %s: %s", ENV_FILE.resolve(), ", ".join(sorted(from_file)))
    if note := auto_device_note(settings):
        logger.warning(note)
    for name, line in unknown_variables(os.environ).items():
        logger.warning(line)
        del os.environ[name]  # named once, here: the app of each worker names those it is given (app/main.py)
    workers, with_model_process = worker_count(settings), runs_model_process(settings)
    os.environ["VIT_WORKERS"] = str(workers)  # the workers read it to split the CPU quota between them
    with (
        pinned_checkpoint(settings),
        shared_metrics(workers + with_model_process),
        model_process(settings) if with_model_process else nullcontext() as model,
    ):
        if model is not None:
            os.environ["VIT_MODEL_SOCKET"] = model.socket_path  # the workers become its front ends
        get_settings.cache_clear()  # a single worker runs in this process and must read the above too
        config = uvicorn.Config(
            "app.main:create_app",
            factory=True,
            host=settings.host,
            port=settings.port,
            root_path=settings.root_path,
            workers=workers,
            access_log=settings.access_log,
            log_config=log_config(settings.log_format, settings.root_path),  # each worker applies it as it starts
            # Longer than clients and proxies keep an idle connection (httpx 5 s, nginx and cloud load
            # balancers 60 s), so that they, not the server, close it. With uvicorn's default of 5 s, equal
            # to httpx's, a client reusing a connection just as the server closed it met a reset.
            timeout_keep_alive=settings.keep_alive_s,
            http=LimitedHttpToolsProtocol,  # limits on a request's headers in time and size, and on a silent client
            # The drain (app/drain.py) has the first half of the grace period; connections still open
            # after the second half, a body still trickling in say, are cut.
            timeout_graceful_shutdown=settings.shutdown_grace_s / 2,
        )
        if workers == 1:
            serve_in_this_process(config)
        else:
            supervisor = Supervisor(config, worker_sockets(config), settings.shutdown_grace_s)
            supervisor.run()
            if supervisor.failed_start:
                raise SystemExit("a worker failed to start (its log says why): stopped")
    if model is not None and model.failed:
        raise SystemExit(f"the model process exited with status {model.process.exitcode}")


def serve_in_this_process(config: uvicorn.Config) -> None:
    """uvicorn's server in this process, returning after a stop on SIGTERM or SIGINT, as the Supervisor does.

    After its graceful shutdown, uvicorn restores the handlers it found and raises the signal again. With
    the default handler, SIGTERM then ended the process at once: the private copy of the checkpoint, the
    model process's folder and the metrics folder stayed behind in the temporary directory, and the exit
    status was 143 where several workers exit 0. While uvicorn runs, the handler that it finds and raises
    the signal to again is one that does nothing, and the cleanup of serve() follows.
    """
    # Bound before the app starts, as several workers' sockets are: uvicorn binds after the model has loaded
    # and warmed up, and a port in use was found only then, in another line and with uvicorn's status.
    listening = bound_socket(config.host, config.port, reuse_port=False)
    logger.info("listening on %s", address(listening))
    stop_signals = (signal.SIGINT, signal.SIGTERM)
    found = {number: signal.signal(number, lambda number, frame: None) for number in stop_signals}
    try:
        uvicorn.Server(config).run(sockets=[listening])
    finally:
        for number, handler in found.items():
            signal.signal(number, handler)


def parse_arguments(argv: list[str] | None) -> None:
    """--help, which lists the settings; any other argument is an error that names the variable to set."""
    parser = argparse.ArgumentParser(
        prog="vit-serve",
        description="Serve a ViT checkpoint over HTTP (/predict, /attention, /model, /metrics), with the "
        "settings below taken from the environment, VIT_PORT=9000 VIT_DEVICE=cuda vit-serve say, or from a .env "
        "file in the working directory for those the environment does not set.",
        epilog=settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _, unknown = parser.parse_known_args(argv)
    if not unknown:
        return
    name, _, value = unknown[0].removeprefix("--").partition("=")
    if not value and len(unknown) > 1 and not unknown[1].startswith("-"):
        value = unknown[1]
    variable = environment_name(name.replace("-", "_"))
    if variable is None:
        parser.error(
            f"unrecognized arguments: {' '.join(unknown)} (settings come from the environment; --help lists them)"
        )
    parser.error(f"settings come from the environment, not arguments: {variable}={value or '...'} vit-serve")


def settings_help() -> str:
    """Each setting's variable, default and description, for --help."""
    lines = ["settings (environment variables, with their defaults):"]
    for field, info in Settings.model_fields.items():
        default = "unset" if info.default is None else info.default if info.default != [] else "empty"
        lines.append(f"  {environment_name(field)}={default}")
        lines.extend(
            textwrap.wrap(info.description or "", width=100, initial_indent=" " * 6, subsequent_indent=" " * 6)
        )
    return "\n".join(lines)


def checked_settings() -> Settings:
    """The settings, or an exit with one line for each problem: a value that is not valid, or one that this
    machine or another setting rules out (app.config.conflicts), found before any process starts."""
    try:
        settings = get_settings()
        problems = conflicts(settings, on_cuda=serves_on_gpu(settings))
        if problem := missing_gpu(settings.device):
            problems.append(problem)
        if settings.grpc_port == settings.port:  # both bind with SO_REUSEPORT: the kernel would take either's side
            problems.append(
                f"VIT_GRPC_PORT is VIT_PORT's port, {settings.port}: HTTP and gRPC need one each (the image: 8000 and "
                "8001)"
            )
    except ValidationError as error:
        problems = settings_problems(error)
    if problems:
        raise SystemExit("\n".join(f"vit-serve: {problem}" for problem in problems))
    return settings


def missing_gpu(device: str) -> str | None:
    """Why the GPU that VIT_DEVICE names is not there, found before any worker fails to start on it."""
    if not device.startswith("cuda"):
        return None
    count, ordinal = gpus.nvidia_gpu_count(), int(device.partition(":")[2] or 0)
    if ordinal < count:
        reason = gpus.unusable_gpu()
        return None if reason is None else f"VIT_DEVICE={device} was asked for, but {reason}"
    reported = {0: "no GPU", 1: "1 GPU, cuda:0"}.get(count, f"{count} GPUs, cuda:0 to cuda:{count - 1}")
    return f"VIT_DEVICE={device} was asked for, but the NVIDIA driver reports {reported}"


class Supervisor(Multiprocess):
    """uvicorn's supervisor of several workers, with a shutdown that ends within VIT_SHUTDOWN_GRACE_S.

    On SIGTERM or SIGINT it closes its own copy of the listening socket at once, where the workers share
    one (app/listeners.py). It used to keep it until the workers had exited, so once they had closed
    theirs, new clients waited in a backlog that no process would accept. A worker still running when
    the grace period is over is killed.
    """

    OUT_OF_MEMORY_HINT = (
        "; SIGKILL is what the kernel sends when memory runs out, and each worker loads the model and warms it up "
        "with a batch of VIT_MAX_BATCH_SIZE"
    )

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket | WorkerSocket], grace_s: float) -> None:
        super().__init__(config, sockets)
        self.grace_s = grace_s
        self.serving: set[int] = set()  # the workers that have finished their start-up, by pid
        self.killed_starting = False

    def keep_subprocess_alive(self) -> None:
        """uvicorn's restart of a worker that died, unless it was killed by a signal before it ever served.

        A start-up that the kernel ends, most often its out-of-memory killer with SIGKILL, would end the
        same way at every restart: uvicorn restarted such a worker forever, saying only that it had died.
        """
        for worker in self.processes:
            if worker.pid in self.serving or self.should_exit.is_set():
                continue
            if worker.process.is_alive():
                if worker.is_ready(timeout=self.config.timeout_worker_healthcheck):
                    self.serving.add(worker.pid)
            elif worker.exitcode is not None and worker.exitcode < 0:
                killer = signal.Signals(-worker.exitcode).name
                hint = self.OUT_OF_MEMORY_HINT if killer == "SIGKILL" else ""  # a SIGSEGV is a crash, not memory
                logger.error("worker [%d] was killed by %s while starting up%s", worker.pid, killer, hint)
                self.killed_starting = True
                self.should_exit.set()
                return
        super().keep_subprocess_alive()

    def handle_term(self) -> None:
        self._stop_listening()
        super().handle_term()

    def handle_int(self) -> None:
        self._stop_listening()
        super().handle_int()

    def _stop_listening(self) -> None:
        for sock in self.sockets:
            sock.close()  # the workers' copies stay open while they drain, answering 503

    def join_all(self) -> None:
        deadline = time.monotonic() + self.grace_s
        for worker in self.processes:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                logger.warning("worker %d still running after %s s: killed", worker.pid, self.grace_s)
                worker.kill()
                worker.process.join()

    @property
    def failed_start(self) -> bool:
        """uvicorn stops restarting workers once one exits with its start-up failure status; this class too,
        once one is killed while starting up."""
        return self.killed_starting or any(worker.exitcode == STARTUP_FAILURE for worker in self.processes)


MODEL_SOCKET = "model.sock"  # the model process's socket, in a private folder of its own


class ModelProcess:
    """The model process of VIT_MODEL_PROCESS, watched: `on_unexpected_exit` runs if it exits while serving."""

    def __init__(self, on_unexpected_exit: Callable[[], None]) -> None:
        self.folder = private_folder("vit-model-")  # mode 0700: only this user reaches the socket
        self.socket_path = str(self.folder / MODEL_SOCKET)
        context = multiprocessing.get_context("spawn")
        self._lifeline, lifeline = context.Pipe()  # the model process stops when this end closes
        self.process = context.Process(target=_run_model_process, args=(self.socket_path, lifeline), name="vit-model")
        self.process.start()
        lifeline.close()
        self.stopping = self.failed = False
        self._on_unexpected_exit = on_unexpected_exit
        threading.Thread(target=self._watch, name="vit-model-watch", daemon=True).start()

    def _watch(self) -> None:
        self.process.join()
        if not self.stopping:
            self.failed = True
            shutil.rmtree(self.folder, ignore_errors=True)  # front ends still waiting for it see that it has gone
            self._on_unexpected_exit()

    def stop(self, timeout_s: float) -> None:
        """Close the lifeline; the model process finishes what it holds and exits (or is killed after timeout_s)."""
        self.stopping = True
        self._lifeline.close()
        self.process.join(timeout_s)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        shutil.rmtree(self.folder, ignore_errors=True)


@contextmanager
def model_process(settings: Settings) -> Iterator[ModelProcess]:
    # If it exits while serving, the server stops too: uvicorn's own shutdown, on this process's SIGTERM.
    model = ModelProcess(on_unexpected_exit=lambda: os.kill(os.getpid(), signal.SIGTERM))
    try:
        yield model
    finally:
        model.stop(settings.shutdown_grace_s)


def _run_model_process(socket_path: str, lifeline: Connection) -> None:
    from app.model_process import main  # here, in the spawned process: the supervisor never imports torch

    main(socket_path, lifeline)


if __name__ == "__main__":
    serve()
