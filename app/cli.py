"""The vit-serve command: uvicorn with VIT_HOST, VIT_PORT, VIT_WORKERS, VIT_ACCESS_LOG and VIT_KEEP_ALIVE_S.

This module does not import torch: with several workers its process only supervises them, and torch
would slow every start and hold memory that never serves a request (start-up and memory: README, Benchmarks).
"""

from __future__ import annotations

import ctypes
import os

import uvicorn

from app.config import Settings, get_settings
from model.cpu import cpu_quota


def nvidia_gpu_visible() -> bool:
    """Whether the NVIDIA driver reports a GPU (CUDA_VISIBLE_DEVICES applies), asked without torch."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    return driver.cuInit(0) == 0 and driver.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0


# Each worker holds its own torch and weights (memory per process: README, Benchmarks): an unlimited
# container on a 64-core host must not start 64 of them unasked. Past this, workers get more threads.
AUTO_WORKER_LIMIT = 4


def worker_count(settings: Settings) -> int:
    """VIT_WORKERS, or for 0: one process per CPU of the quota (at most AUTO_WORKER_LIMIT) on the CPU, one on a GPU.

    A small model on the CPU runs faster as one single-threaded process per core than as one process
    with a thread per core: HTTP parsing and decoding then run beside the model instead of queueing
    behind one event loop. A GPU wants one process, so that one copy of the weights gets every batch.
    """
    if settings.workers:
        return settings.workers
    device = settings.device
    on_gpu = device.startswith("cuda") or (device == "auto" and nvidia_gpu_visible())
    return 1 if on_gpu else min(cpu_quota(), AUTO_WORKER_LIMIT)


def serve() -> None:
    settings = get_settings()
    workers = worker_count(settings)
    os.environ["VIT_WORKERS"] = str(workers)  # the workers read it to split the CPU quota between them
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=workers,
        access_log=settings.access_log,
        # Longer than clients and proxies keep an idle connection (httpx 5 s, nginx and cloud load
        # balancers 60 s), so that they, not the server, close it. With uvicorn's default of 5 s, equal
        # to httpx's, a client reusing a connection just as the server closed it met a reset.
        timeout_keep_alive=settings.keep_alive_s,
    )


if __name__ == "__main__":
    serve()
