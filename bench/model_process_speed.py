"""The model process alone: how many requests a second it answers, and its CPU time per request, by thread.

Client processes stand in for vit-serve's front ends: each connects as a front end does (the same
RemoteBackend) and keeps `--window` /predict inputs in flight, so that no HTTP or decoding is counted.
Then one of them keeps one input in flight: its round trip is what a request at one connection waits
on the model process, the batch included; the rest of that request's time is the front end's.
With `--small` the model is the tests' two-block one, whose forward pass costs next to nothing on the
CPU: what is left is the path itself (messages, batching, the hand-over to the inference thread),
which is what bounds a GPU's model process when the forward pass is a CUDA graph replay. VIT_
settings in the environment reach the model process.

    VIT_TORCH_THREADS=1 python -m bench.model_process_speed --small --device cpu   # the path's own cost
    VIT_TORCH_THREADS=1 python -m bench.model_process_speed --small --rgb-size 224  # with 150 KB images
    python -m bench.model_process_speed --device cuda                               # the shipped model
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import torch

from model import DEFAULT_CHECKPOINT
from model.cpu import cpu_quota
from tests.support.server import cpu_seconds, thread_cpu_seconds


def front_end(socket_path: str, window: int, seconds: float, start: multiprocessing.Event, report: Connection) -> None:
    """One stand-in front end: connect, wait for the start, keep `window` inputs in flight for `seconds`."""
    from app.remote_backend import RemoteBackend

    async def run() -> dict:
        backend = await RemoteBackend.connect(socket_path, timeout_s=300)
        preprocess = backend.model.preprocess
        shape = preprocess.image_shape
        pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)  # as a front end decodes
        await asyncio.gather(*(backend.submit("predict", pixels, 10.0) for _ in range(window)))  # warm
        report.send("connected")
        await asyncio.get_running_loop().run_in_executor(None, start.wait)
        round_trips: list[float] = []
        cpu_before, started = time.process_time(), time.monotonic()
        deadline = started + seconds

        async def keep_asking() -> None:
            while (sent := time.monotonic()) < deadline:
                await backend.submit("predict", pixels, 10.0)
                round_trips.append(time.monotonic() - sent)

        await asyncio.gather(*(keep_asking() for _ in range(window)))
        elapsed = time.monotonic() - started
        stats = await backend.stats()
        await backend.stop()
        return {
            "answered": len(round_trips),
            "seconds": elapsed,
            "cpu_s": time.process_time() - cpu_before,
            "round_trip_ms": {
                "p50": round(1e3 * statistics.median(round_trips), 3),
                "p99": round(1e3 * statistics.quantiles(round_trips, n=100)[98], 3),
            },
            "stats": stats,
        }

    from uvicorn.loops.auto import auto_loop_factory

    with asyncio.Runner(loop_factory=auto_loop_factory()) as runner:  # a front end's loop: uvloop where installed
        report.send(runner.run(run()))


def measure(device: str, checkpoint: Path, front_ends: int, window: int, seconds: float, settings: dict) -> dict:
    from app.cli import ModelProcess

    os.environ.update(
        {"VIT_DEVICE": device, "VIT_CHECKPOINT": str(checkpoint), "VIT_WORKERS": str(front_ends)}
        | {f"VIT_{name.upper()}": str(value) for name, value in settings.items()}
    )
    model = ModelProcess(on_unexpected_exit=lambda: None)
    try:
        pid = model.process.pid
        with front_end_processes(model.socket_path, front_ends, window, seconds) as (start, pipes):
            before, threads_before = cpu_seconds(pid), thread_cpu_seconds(pid)
            start.set()
            time.sleep(seconds)
            after, threads_after = cpu_seconds(pid), thread_cpu_seconds(pid)
            reports = [pipe.recv() for pipe in pipes]
        with front_end_processes(model.socket_path, 1, 1, seconds) as (start, pipes):
            start.set()
            [alone] = [pipe.recv() for pipe in pipes]
    finally:
        model.stop(30)
    answered = sum(report["answered"] for report in reports)
    per_request = 1e6 / answered
    threads = {}
    for thread, spent in threads_after.items():
        used = spent - threads_before.get(thread, 0.0)
        if used > 0.01 * seconds:
            threads["event loop" if thread == pid else f"thread {thread}"] = round(used * per_request, 1)
    predict = reports[0]["stats"]["predict"]
    return {
        "requests_per_s": round(sum(report["answered"] / report["seconds"] for report in reports), 1),
        "model_process_cpu_us_per_request": round((after - before) * per_request, 1),
        "model_process_threads_cpu_us_per_request": threads,
        "front_end_cpu_us_per_request": round(sum(report["cpu_s"] for report in reports) * per_request, 1),
        "mean_batch_size": round(predict["mean_batch_size"], 2),
        "round_trip_ms_one_in_flight": alone["round_trip_ms"],
    }


@contextmanager
def front_end_processes(
    socket_path: str, count: int, window: int, seconds: float
) -> Iterator[tuple[multiprocessing.synchronize.Event, list[Connection]]]:
    """`count` stand-in front ends, connected and warm: set the event to start them, then read their reports."""
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    pipes, clients = [], []
    try:
        for _ in range(count):
            ours, theirs = context.Pipe()
            client = context.Process(target=front_end, args=(socket_path, window, seconds, start, theirs))
            client.start()
            pipes.append(ours)
            clients.append(client)
        for pipe in pipes:
            assert pipe.recv() == "connected"
        yield start, pipes
    finally:
        for client in clients:
            client.join(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--small", action="store_true", help="the tests' two-block model instead of the shipped one")
    parser.add_argument("--rgb-size", type=int, help="with --small: the model takes RGB images of this size")
    parser.add_argument("--front-ends", type=int, default=2)
    parser.add_argument("--window", type=int, default=64, help="inputs each front end keeps in flight")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--output", type=Path, help="write the result here as JSON")
    args = parser.parse_args()
    if args.rgb_size and not args.small:
        parser.error("--rgb-size needs --small")
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = DEFAULT_CHECKPOINT
        if args.small:
            from tests.support.models import save_small_checkpoint

            checkpoint = save_small_checkpoint(Path(folder) / "small.safetensors", rgb_size=args.rgb_size)
        result = measure(
            args.device,
            checkpoint,
            args.front_ends,
            args.window,
            args.seconds,
            {"max_batch_size": args.max_batch_size},
        )
    result = {
        "machine": f"{platform.machine()}, {cpu_quota()} CPUs",
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "model": ("tests' two-block model" if args.small else DEFAULT_CHECKPOINT.name)
        + (f", RGB {args.rgb_size} x {args.rgb_size}" if args.rgb_size else ""),
        "front_ends": args.front_ends,
        "window": args.window,
        "max_batch_size": args.max_batch_size,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    } | result
    trip = result["round_trip_ms_one_in_flight"]
    print(f"round trip, one input in flight: p50 {trip['p50']} ms, p99 {trip['p99']} ms")
    print(json.dumps(result, indent=2))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
