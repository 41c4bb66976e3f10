"""Serving speed: our server against LitServe serving the same checkpoint, under wrk, in one run.

- ours:        `vit-serve` with its defaults (one worker process per CPU of the quota, one torch thread each);
- litserve:    bench/litserve_api.py, LitServe's defaults on the CPU (one inference worker, all the quota's
               torch threads), with batches of up to VIT_MAX_BATCH_SIZE's default, 32, gathered for at most
               1 ms: with LitServe's default batch_timeout, 0, each worker polls its queue without a pause
               and spends a whole core doing it;
- litserve xN: the same with one inference worker per CPU of the quota, one torch thread each, as ours.

Each is started, checked to give our top class, and driven through /predict by wrk (bench/wrk_multipart.lua)
at the same concurrencies as bench/server_speed.py, twice, in the order ABCCBA, so that a machine that slows
down during the run weighs on all alike; a level's figures are the mean of its two rounds.

    pip install litserve
    python -m bench.server_vs_litserve            # writes bench/results/server_vs_litserve.json and .png
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import httpx
import torch

from bench.server_speed import CONCURRENCIES, IMAGE, RESULTS, ROOT, require_wrk, run_wrk, save
from model.cpu import cpu_quota
from tests.support.server import Server, free_port, ready_server, start_server

BATCH_SIZE = 32  # VIT_MAX_BATCH_SIZE's default
FIGURES = ("requests_per_s", "p50_ms", "p95_ms", "p99_ms")


def start_litserve(workers: int, torch_threads: int, batch_timeout_s: float, timeout_s: float = 120.0) -> Server:
    """bench/litserve_api.py under LitServe, ready once its /health answers."""
    port, log = free_port(), Path(tempfile.mkstemp(prefix="litserve-", suffix=".log")[1])
    code = (
        "from bench.litserve_api import serve; "
        f"serve({port}, {workers}, {torch_threads}, {BATCH_SIZE}, {batch_timeout_s})"
    )
    with log.open("wb") as output:  # the child keeps its own copy
        process = subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env=os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))},
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    return ready_server(process, f"http://127.0.0.1:{port}", log, timeout_s, health="/health")  # "ok" once ready


def top_class(server: Server) -> str:
    """The top label for the image: LitServe answers {"predictions": [...]}, ours {"results": [{...}]}."""
    response = httpx.post(f"{server.base_url}/predict", files={"file": (IMAGE.name, IMAGE.read_bytes())}, timeout=30)
    response.raise_for_status()
    answer = response.json()
    return (answer["results"][0] if "results" in answer else answer)["predictions"][0]["label"]


def measure(server: Server, name: str, seconds: float) -> dict:
    url = f"{server.base_url}/predict"
    run_wrk(url, 8, 1)  # warm-up
    levels = {}
    for concurrency in CONCURRENCIES:
        levels[str(concurrency)] = level = run_wrk(url, concurrency, seconds)
        print(
            f"{name:>12} c={concurrency:<3} {level['requests_per_s']:7.1f} req/s  p50 {level['p50_ms']:6.1f}  "
            f"p95 {level['p95_ms']:6.1f}  p99 {level['p99_ms']:6.1f} ms  non-2xx {level['non_2xx']}"
        )
    return levels


def mean_levels(rounds: list[dict]) -> dict:
    return {
        concurrency: {figure: round(statistics.mean(r[concurrency][figure] for r in rounds), 2) for figure in FIGURES}
        | {"non_2xx": sum(r[concurrency]["non_2xx"] for r in rounds)}
        for concurrency in rounds[0]
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="server_vs_litserve", help="results go to bench/results/NAME.json and .png")
    parser.add_argument("--seconds", type=int, default=8, help="wrk duration per concurrency and round")
    parser.add_argument(
        "--batch-timeout-ms", type=float, default=1.0, help="LitServe's batch_timeout, in ms (0 polls without a pause)"
    )
    args = parser.parse_args()
    require_wrk()
    try:
        litserve_version = importlib.metadata.version("litserve")
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit("LitServe is not installed: pip install litserve") from None
    cpus = cpu_quota()
    starts = {
        "ours": lambda: start_server({"VIT_DEVICE": "cpu"}, app=None),
        "litserve": lambda: start_litserve(1, cpus, args.batch_timeout_ms / 1000),
        f"litserve x{cpus}": lambda: start_litserve(cpus, 1, args.batch_timeout_ms / 1000),
    }
    order = [*starts, *reversed(starts)]  # ABCCBA
    rounds: dict[str, list[dict]] = {name: [] for name in starts}
    ready_after: dict[str, list[float]] = {name: [] for name in starts}
    expected = None
    for name in order:
        server = starts[name]()
        try:
            label = top_class(server)
            expected = expected or label
            if label != expected:
                raise SystemExit(f"{name} answers {label!r} for {IMAGE.name}, where the first server said {expected!r}")
            ready_after[name].append(round(server.ready_after_s, 2))
            rounds[name].append(measure(server, name, args.seconds))
        finally:
            server.stop()
            if server.log is not None:
                server.log.unlink()
    servers = {
        name: {"ready_after_s": ready_after[name], "levels": mean_levels(rounds[name]), "rounds": rounds[name]}
        for name in starts
    }
    best_litserve = {
        concurrency: max(servers[name]["levels"][concurrency]["requests_per_s"] for name in starts if name != "ours")
        for concurrency in servers["ours"]["levels"]
    }
    ratios = {
        concurrency: round(servers["ours"]["levels"][concurrency]["requests_per_s"] / best, 2)
        for concurrency, best in best_litserve.items()
    }
    result = {
        "machine": f"{platform.machine()}, {cpus} CPUs",
        "torch": torch.__version__,
        "litserve": litserve_version,
        "image": IMAGE.name,
        "load_generator": "wrk -t1, multipart body, keep-alive connections; two rounds, ABCCBA",
        "litserve_batching": {"max_batch_size": BATCH_SIZE, "batch_timeout_s": args.batch_timeout_ms / 1000},
        "servers": servers,
        "ours_over_best_litserve_requests_per_s": ratios,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    save(args.name, result)
    for concurrency, ratio in ratios.items():
        print(f"c={concurrency}: ours {ratio}x the better LitServe's requests/s")
    print(f"-> {RESULTS / args.name}.json, .png")


if __name__ == "__main__":
    main()
