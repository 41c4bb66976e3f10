"""Serving speed: our batching server against the tutorial endpoint, under wrk, in one run.

Starts each server (real uvicorn, shipped checkpoint, CPU) and drives /predict with wrk (Debian's
`wrk` package, one thread, a multipart body from bench/wrk_multipart.lua) at several concurrencies:

- naive:      bench/naive_server.py under `uvicorn`, one forward pass per request (what a user would
              otherwise write); "naive x2" is the same with two processes (WEB_CONCURRENCY=2);
- batched:    our server as the Docker image runs it (`vit-serve`, default settings: one worker
              process per CPU of the quota, one torch thread each, dynamic batching);
- batched x1: the same with one process (VIT_WORKERS=1), which gets the whole quota as torch threads;
- batch-1:    vit-serve with VIT_MAX_BATCH_SIZE=1, for reference;
- in-process: the model alone, batched and single-image, with all the quota's threads, before and after
              the servers; the better of the two runs is the ceiling.

    python -m bench.server_speed                      # writes bench/results/server_speed.json and .png
    python -m bench.server_speed --name int8 --env VIT_QUANTIZE=int8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import matplotlib
import torch

matplotlib.use("Agg")

import matplotlib.pyplot as plt

from bench.model_speed import interleaved_images_per_second
from model import DEFAULT_CHECKPOINT
from model.checkpoint import load_checkpoint
from model.cpu import cpu_quota
from tests.support.server import Server, process_tree, rss_mb, start_server, torch_loaded

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
IMAGE = ROOT / "examples" / "ankle-boot.png"
LUA = ROOT / "bench" / "wrk_multipart.lua"
CONCURRENCIES = (1, 8, 32, 128)
READINESS_STARTS = 3


def batching_stats(server: Server) -> dict | None:
    response = httpx.get(f"{server.base_url}/model", timeout=10)
    return response.json()["batching"]["stats"]["predict"] if response.status_code == 200 else None


def mean_batch_size(before: dict | None, after: dict | None) -> float | None:
    """Images per forward pass between two readings of /model; a server without /model (naive) runs one each."""
    if before is None or after is None:
        return 1.0
    batches = after["batches"] - before["batches"]
    return round((after["requests"] - before["requests"]) / batches, 2) if batches else None


def require_wrk() -> None:
    """Stop at once where wrk is missing, before any server starts, rather than with a traceback at the first run."""
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not on the PATH: apt-get install wrk (bench/gpu_check.sh unpacks Debian's package)")


def run_wrk(url: str, concurrency: int, seconds: float, threads: int = 1) -> dict:
    command = [
        "wrk",
        f"-t{min(threads, concurrency)}",
        f"-c{concurrency}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA),
        url,
    ]
    env = os.environ | {"WRK_IMAGE": str(IMAGE)}
    output = subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout
    summary = json.loads(output.strip().splitlines()[-1])
    return {
        "requests": summary["requests"],
        "requests_per_s": round(summary["requests"] / (summary["duration_us"] / 1e6), 1),
        "p50_ms": summary["p50_us"] / 1000,
        "p95_ms": summary["p95_us"] / 1000,
        "p99_ms": summary["p99_us"] / 1000,
        "mean_ms": round(summary["mean_us"] / 1000, 3),
        "non_2xx": summary["non_2xx"],
        "socket_errors": summary["socket_errors"],
    }


def measure_server(name: str, env: dict, seconds: float, app: str | None = None) -> dict:
    """One server's levels; app is a factory to run under `uvicorn`, or None for vit-serve."""
    env = env | {"VIT_DEVICE": "cpu"}
    # Start-up time of one start varies by a second on a shared machine: the median of three starts.
    ready_after = []
    for _ in range(READINESS_STARTS - 1):
        trial = start_server(env, app)
        trial.stop()
        ready_after.append(trial.ready_after_s)
    server = start_server(env, app)
    ready_after.append(server.ready_after_s)
    try:
        time.sleep(2.0)  # let every worker finish starting and start-up garbage settle before reading memory
        result = {
            "settings": env,
            "ready_after_s": round(statistics.median(ready_after), 2),
            "ready_after_s_each": [round(seconds, 2) for seconds in ready_after],
            "idle_rss_mb": round(rss_mb(server.process.pid), 1),
            "levels": {},
        }
        # /model answers for whichever worker takes the request, so only one process gives whole counts
        # (decoder processes hold no model: they never load torch).
        one_process = sum(map(torch_loaded, process_tree(server.process.pid))) == 1
        url = f"{server.base_url}/predict"
        run_wrk(url, 8, 1)  # warm-up
        for concurrency in CONCURRENCIES:
            before = batching_stats(server) if one_process else None
            level = run_wrk(url, concurrency, seconds)
            level["mean_batch_size"] = mean_batch_size(before, batching_stats(server)) if one_process else None
            result["levels"][str(concurrency)] = level
            print(
                f"{name:>10} c={concurrency:<3} {level['requests_per_s']:7.1f} req/s  p50 {level['p50_ms']:6.1f}  "
                f"p95 {level['p95_ms']:6.1f}  p99 {level['p99_ms']:6.1f} ms  batch {level['mean_batch_size']}"
            )
        result["loaded_rss_mb"] = round(rss_mb(server.process.pid), 1)
        return result
    finally:
        server.stop()


def measure_in_process(threads: int, batch_size: int, seconds: float) -> dict:
    """The model alone: batched images/s and the single-image forward time, with the server's threads."""
    torch.set_num_threads(threads)
    model = load_checkpoint(DEFAULT_CHECKPOINT).model
    config = model.config
    shape = (config.in_channels, config.image_size, config.image_size)
    images_per_s = {
        size: interleaved_images_per_second({"model": model}, torch.randn(size, *shape), "fp32", seconds)["model"]
        for size in (1, batch_size)
    }
    return {
        "batched_images_per_s": round(images_per_s[batch_size], 1),
        "single_forward_ms": round(1000 / images_per_s[1], 3),
    }


def ceiling(runs: list[dict], batch_size: int) -> dict:
    """The best of the in-process runs, so that noise during one of them cannot lower the bar."""
    return {
        "batch_size": batch_size,
        "batched_images_per_s": max(run["batched_images_per_s"] for run in runs),
        "single_forward_ms": min(run["single_forward_ms"] for run in runs),
        "runs": runs,
    }


def plot(servers: dict, path: Path) -> None:
    figure, (throughput, p95) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    for name, result in servers.items():
        levels = result["levels"]
        concurrency = [int(c) for c in levels]
        throughput.plot(concurrency, [levels[c]["requests_per_s"] for c in levels], marker="o", label=name)
        p95.plot(concurrency, [levels[c]["p95_ms"] for c in levels], marker="o", label=name)
    throughput.set(xscale="log", xlabel="concurrent connections", ylabel="requests/s", title="throughput")
    p95.set(xscale="log", yscale="log", xlabel="concurrent connections", ylabel="p95 latency (ms)", title="p95 latency")
    for axes in (throughput, p95):
        axes.set_xticks(list(CONCURRENCIES), [str(c) for c in CONCURRENCIES])
        axes.grid(alpha=0.3)
        axes.legend()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def save(name: str, result: dict) -> None:
    """bench/results/NAME.json, and NAME.png of its servers' throughput and p95."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result["servers"], RESULTS / f"{name}.png")


def check_targets(servers: dict, in_process: dict) -> dict:
    """The targets, for the server as users run it (vit-serve with its defaults)."""
    naive_32 = servers["naive"]["levels"]["32"]["requests_per_s"]
    batched = servers["batched"]
    at_32 = batched["levels"]["32"]["requests_per_s"]
    return {
        ">= 4x naive at c=32": at_32 >= 4 * naive_32,
        "at c=32 >= 50% of in-process batched": at_32 >= 0.5 * in_process["batched_images_per_s"],
        "p50 at c=1 <= single forward + 3 ms": batched["levels"]["1"]["p50_ms"] <= in_process["single_forward_ms"] + 3,
        "ready within 3 s": batched["ready_after_s"] <= 3.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="server_speed", help="results go to bench/results/NAME.json and NAME.png")
    parser.add_argument("--seconds", type=int, default=8, help="wrk duration per concurrency")
    parser.add_argument("--env", action="append", default=[], help="extra VIT_ settings for our server, NAME=VALUE")
    args = parser.parse_args()
    require_wrk()
    extra = dict(item.split("=", 1) for item in args.env)
    threads = int(extra.get("VIT_TORCH_THREADS", "0")) or cpu_quota()
    batch_size = int(extra.get("VIT_MAX_BATCH_SIZE", "32"))
    in_process_runs = [measure_in_process(threads, batch_size, 3.0)]  # once before the servers, once after
    naive = "bench.naive_server:create_app"
    servers = {
        "naive": measure_server("naive", extra, args.seconds, app=naive),
        "naive x2": measure_server("naive x2", extra | {"WEB_CONCURRENCY": "2"}, args.seconds, app=naive),
        "batched": measure_server("batched", extra, args.seconds),
        "batched x1": measure_server("batched x1", extra | {"VIT_WORKERS": "1"}, args.seconds),
        "batch-1": measure_server("batch-1", extra | {"VIT_MAX_BATCH_SIZE": "1"}, args.seconds),
    }
    in_process_runs.append(measure_in_process(threads, batch_size, 3.0))
    in_process = ceiling(in_process_runs, batch_size)
    targets = check_targets(servers, in_process)
    result = {
        "machine": f"{platform.machine()}, {cpu_quota()} CPUs",
        "torch": torch.__version__,
        "image": IMAGE.name,
        "load_generator": "wrk -t1, multipart body, keep-alive connections",
        "settings": extra,
        "servers": servers,
        "in_process": in_process,
        "targets": targets,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    save(args.name, result)
    print(
        f"in-process: {in_process['batched_images_per_s']} img/s at batch {in_process['batch_size']}, "
        f"single forward {in_process['single_forward_ms']} ms"
    )
    for target, met in targets.items():
        print(f"{'PASS' if met else 'FAIL'}  {target}")
    print(f"-> {RESULTS / args.name}.json, .png")


if __name__ == "__main__":
    main()
