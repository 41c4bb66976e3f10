"""Serving speed of other checkpoints beside the shipped one: /predict under wrk, rounds alternated, in one run.

A larger model that would replace the shipped one must keep /predict's p50 at one connection on the CPU
within 2x of the shipped model's; otherwise it ships as a second checkpoint (model/weights/README.md).
vit-serve (default settings, CPU) runs once per checkpoint, all at once, and each round drives /predict
at 1 and 32 connections on each in turn, so that a shared machine's swings shift all of them alike.
What to read are the ratios to the shipped model within each round, and their median.

    python -m bench.checkpoint_speed --candidate small runs/long/model.safetensors \\
        --candidate "small, int8" runs/long/model.safetensors VIT_QUANTIZE=int8 --name checkpoint_speed_small

Speed does not depend on the weights: any checkpoint of a preset measures that preset, such as
`vit-train --model small --epochs 1 --warmup-epochs 0 --train-limit 512 --out-dir runs/small-speed`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path

import torch

from bench.server_speed import IMAGE, RESULTS, ROOT, require_wrk, run_wrk
from model import DEFAULT_CHECKPOINT
from model.cpu import cpu_quota
from model.metadata import CheckpointError, read_metadata
from tests.support.server import start_server

SHIPPED = "shipped"
LEVELS = ((1, 1), (32, 2))  # (connections, wrk threads)
P50_RATIO_LIMIT = 2.0


@contextmanager
def serving(servers: dict[str, tuple[Path, dict[str, str]]], folder: Path) -> Iterator[dict[str, str]]:
    """vit-serve for each checkpoint at once, on the CPU with default settings: their /predict URLs by name.

    They run side by side and take turns under wrk, so that no round waits on a start; an idle server
    costs the others no CPU.
    """
    with ExitStack() as stack:
        urls = {}
        for name, (path, settings) in servers.items():
            env = settings | {"VIT_CHECKPOINT": str(path), "VIT_DEVICE": "cpu", "VIT_ACCESS_LOG": "true"}
            server = start_server(env, app=None, timeout_s=300, log=folder / f"server-{len(urls)}.log")
            stack.callback(server.stop, timeout_s=30)
            urls[name] = f"{server.base_url}/predict"
            run_wrk(urls[name], 8, 2)  # every worker warm
        yield urls


def measure(url: str, seconds: float) -> dict:
    """p50 at one connection and requests/s at 32."""
    levels = {connections: run_wrk(url, connections, seconds, threads) for connections, threads in LEVELS}
    return {"p50_ms_c1": levels[1]["p50_ms"], "requests_per_s_c32": levels[32]["requests_per_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--candidate",
        nargs="+",
        action="append",
        required=True,
        metavar="NAME PATH [VIT_X=VALUE ...]",
        help="a checkpoint to compare with the shipped one, by name, with settings of its own if any",
    )
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=int, default=5, help="wrk duration per level")
    parser.add_argument("--name", default="checkpoint_speed", help="results go to bench/results/NAME.json")
    args = parser.parse_args()
    require_wrk()
    servers = {SHIPPED: (DEFAULT_CHECKPOINT, {})}
    for name, *rest in args.candidate:
        if not rest or name in servers:
            parser.error(f"--candidate {name}: give a name of its own, then the checkpoint's path")
        path, *settings = rest
        if not all(setting.startswith("VIT_") and "=" in setting for setting in settings):
            parser.error(f"--candidate {name}: settings go as VIT_NAME=VALUE, not {' '.join(settings)}")
        servers[name] = (Path(path), dict(setting.split("=", 1) for setting in settings))
    try:  # an unusable checkpoint fails here, before any round
        configs = {name: read_metadata(path)["config"] for name, (path, _) in servers.items()}
    except CheckpointError as error:
        parser.error(str(error))
    rounds: dict[str, list[dict]] = {name: [] for name in servers}
    with tempfile.TemporaryDirectory(prefix="vit-bench-") as folder, serving(servers, Path(folder)) as urls:
        for number in range(args.rounds):
            for name, url in urls.items():
                rounds[name].append(measure(url, args.seconds))
                print(f"round {number + 1} {name:>16}: {rounds[name][-1]}", flush=True)
    results = {}
    for name, (path, env) in servers.items():
        pairs = list(zip(rounds[name], rounds[SHIPPED], strict=True))
        results[name] = {
            "path": str(path.resolve().relative_to(ROOT) if path.resolve().is_relative_to(ROOT) else path),
            "config": configs[name],
            "settings": env,
            "rounds": rounds[name],
            "p50_ms_c1": round(statistics.median(row["p50_ms_c1"] for row in rounds[name]), 2),
            "requests_per_s_c32": round(statistics.median(row["requests_per_s_c32"] for row in rounds[name]), 1),
            "p50_ratio_to_shipped": round(
                statistics.median(own["p50_ms_c1"] / base["p50_ms_c1"] for own, base in pairs), 2
            ),
            "requests_per_s_ratio_to_shipped": round(
                statistics.median(own["requests_per_s_c32"] / base["requests_per_s_c32"] for own, base in pairs), 2
            ),
        }
    result = {
        "machine": f"{platform.machine()}, {cpu_quota()} CPUs",
        "torch": torch.__version__,
        "image": IMAGE.name,
        "load_generator": "wrk, multipart body, keep-alive connections",
        "server": "vit-serve, default settings on the CPU",
        "rounds": args.rounds,
        "checkpoints": results,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    for name, row in results.items():
        within = row["p50_ratio_to_shipped"] <= P50_RATIO_LIMIT
        verdict = "" if name == SHIPPED else f"  p50 {'within' if within else 'beyond'} {P50_RATIO_LIMIT:g}x"
        print(
            f"{name:>16}: p50 at c=1 {row['p50_ms_c1']:.2f} ms (x{row['p50_ratio_to_shipped']}), "
            f"{row['requests_per_s_c32']:.0f} req/s at c=32 (x{row['requests_per_s_ratio_to_shipped']}){verdict}"
        )
    print(f"-> {RESULTS / args.name}.json")


if __name__ == "__main__":
    main()
