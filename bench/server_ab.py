"""Two versions of the server under wrk, in alternating rounds of one run: what a change buys.

Each tree is a checkout of this repository (`git worktree add /tmp/before HEAD~1`, say); each runs
`vit-serve` from its own source, with the same settings. The rounds alternate between them, so both
see the same noise of a shared machine, and every figure is also given as the median of its rounds'
ratios to the first tree's. Per tree: requests/s, p50 and p99, and the CPU time per request of the
processes that answer HTTP and of the model process's event loop (where one runs), the limits of
the machine's cores.

    git worktree add /tmp/before HEAD~1
    python -m bench.server_ab /tmp/before . --small --output bench/results/server_ab.json
    python -m bench.server_ab /tmp/before . --env VIT_MODEL_PROCESS=false --env VIT_WORKERS=2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

from bench.gpu_serving import process_roles
from bench.server_speed import run_wrk
from model import DEFAULT_CHECKPOINT
from model.cpu import cpu_quota
from tests.support.server import cpu_seconds, free_port, process_tree, torch_loaded

# The layout that puts one front end's costs in view: a model process, one front end, one torch thread.
DEFAULTS = {"VIT_DEVICE": "cpu", "VIT_MODEL_PROCESS": "true", "VIT_WORKERS": "1", "VIT_TORCH_THREADS": "1"}


def start(tree: Path, env: dict[str, str], timeout_s: float = 120) -> tuple[subprocess.Popen, str]:
    """vit-serve from `tree`'s source, ready, with every process that loads torch past its imports."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "app.cli"],
        cwd=tree,
        env=os.environ | env | {"VIT_HOST": "127.0.0.1", "VIT_PORT": str(port), "PYTHONPATH": str(tree)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"vit-serve from {tree} exited with {process.returncode}")
        try:
            stats = httpx.get(f"{url}/model", timeout=1)
            if stats.status_code == 200:
                workers = int(env.get("VIT_WORKERS", "1")) + (env.get("VIT_MODEL_PROCESS") == "true")
                if sum(torch_loaded(pid) for pid in process_tree(process.pid)) >= workers:
                    return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"vit-serve from {tree} was not ready within {timeout_s} s")


def spent(roles: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds so far of the HTTP processes together, and of the model process's event loop thread."""
    return {
        "http": sum(cpu_seconds(pid) for pid in roles["http"]),
        "model_loop": sum(cpu_seconds(pid, thread=pid) for pid in roles["model"]),
    }


def compare(trees: list[Path], env: dict[str, str], path: str, connections: int, seconds: float, rounds: int) -> dict:
    servers = [start(tree, env) for tree in trees]
    try:
        roles = [process_roles(process.pid) for process, _ in servers]
        for _, url in servers:
            run_wrk(f"{url}{path}", connections, 2, threads=2)  # warm
        rows: list[dict[str, list[float]]] = [{} for _ in trees]
        for _ in range(rounds):
            for (_, url), role, row in zip(servers, roles, rows, strict=True):
                before = spent(role)
                level = run_wrk(f"{url}{path}", connections, seconds, threads=2)
                after = spent(role)
                for name in ("requests_per_s", "p50_ms", "p99_ms"):
                    row.setdefault(name, []).append(level[name])
                for name in before:
                    us = 1e6 * (after[name] - before[name]) / max(1, level["requests"])
                    row.setdefault(f"{name}_cpu_us_per_request", []).append(us)
    finally:
        for process, _ in servers:
            process.terminate()
        for process, _ in servers:
            process.wait(60)
    labels = [_commit(tree) for tree in trees]
    if len(set(labels)) < len(labels):  # the same commit twice: tell them apart by where they are
        labels = [f"{label} ({tree})" for label, tree in zip(labels, trees, strict=True)]
    results = {}
    for label, row in zip(labels, rows, strict=True):
        results[label] = {
            name: {
                "median": round(statistics.median(values), 2),
                "ratio_to_first": round(statistics.median(v / f for v, f in zip(values, rows[0][name], strict=True)), 3)
                if all(rows[0][name])
                else None,
                "rounds": [round(value, 2) for value in values],
            }
            for name, values in row.items()
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="+", type=Path, help="checkouts of this repository; the first is the baseline")
    parser.add_argument("--env", action="append", default=[], help="VIT_NAME=value for every server (repeatable)")
    parser.add_argument("--small", action="store_true", help="the tests' two-block model instead of the shipped one")
    parser.add_argument("--path", default="/predict")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=3.0, help="per round")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--output", type=Path, help="write the result here as JSON")
    args = parser.parse_args()
    env = DEFAULTS | dict(setting.split("=", 1) for setting in args.env)
    trees = [tree.resolve() for tree in args.trees]
    with tempfile.TemporaryDirectory() as folder:
        if args.small:
            from tests.support.models import save_small_checkpoint

            env["VIT_CHECKPOINT"] = str(save_small_checkpoint(Path(folder) / "small.safetensors"))
        env.setdefault("VIT_CHECKPOINT", str(DEFAULT_CHECKPOINT))
        results = compare(trees, env, args.path, args.connections, args.seconds, args.rounds)
    for label, row in results.items():
        print(
            label,
            "  ".join(f"{name} {value['median']} (x{value['ratio_to_first']})" for name, value in row.items()),
        )
    report = {
        "machine": f"{platform.machine()}, {cpu_quota()} CPUs",
        "settings": env | {"VIT_CHECKPOINT": Path(env["VIT_CHECKPOINT"]).name},
        "path": args.path,
        "connections": args.connections,
        "seconds_per_round": args.seconds,
        "rounds": args.rounds,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "results": results,
    }
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n")


def _commit(tree: Path) -> str:
    """The tree's commit, with "+changes" where it differs from it."""

    def git(*arguments: str) -> str:
        return subprocess.run(["git", *arguments], cwd=tree, capture_output=True, text=True, check=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + ("+changes" if git("status", "--porcelain") else "")


if __name__ == "__main__":
    main()
