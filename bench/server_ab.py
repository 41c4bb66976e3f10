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
    python -m bench.server_ab . . --second-env VIT_INLINE_LONE_BATCHES=true --small --connections 1   # a setting
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from bench.gpu_serving import cpu_by_role, process_roles, wait_for_every_process
from bench.server_speed import require_wrk, run_wrk
from model import DEFAULT_CHECKPOINT
from model.cpu import cpu_quota
from tests.support.server import Server, start_server

# cpu_by_role's roles that the report counts, by the names it gives them
COUNTED_ROLES = {"HTTP processes": "http", "model process, event loop": "model_loop"}
# The layout that puts one front end's costs in view: a model process, one front end, one torch thread.
DEFAULTS = {
    "VIT_DEVICE": "cpu",
    "VIT_MODEL_PROCESS": "true",
    "VIT_WORKERS": "1",
    "VIT_TORCH_THREADS": "1",
    "VIT_ACCESS_LOG": "true",
}


def start(tree: Path, env: dict[str, str], log: Path) -> Server:
    """vit-serve from `tree`'s source, ready, with every process that loads torch past its imports."""
    server = start_server(env, app=None, timeout_s=120, log=log, cwd=tree)
    wait_for_every_process(server, int(env["VIT_WORKERS"]), env["VIT_MODEL_PROCESS"] == "true")
    return server


def compare(
    trees: list[Path], envs: list[dict[str, str]], path: str, connections: int, seconds: float, rounds: int, logs: Path
) -> dict:
    servers: list[Server] = []
    try:
        for index, (tree, env) in enumerate(zip(trees, envs, strict=True)):
            servers.append(start(tree, env, logs / f"server-{index}.log"))
        roles = [process_roles(server) for server in servers]
        for server in servers:
            run_wrk(f"{server.base_url}{path}", connections, 2, threads=2)  # warm
        rows: list[dict[str, list[float]]] = [{} for _ in trees]
        for _ in range(rounds):
            for server, role, row in zip(servers, roles, rows, strict=True):
                before = cpu_by_role(role)
                level = run_wrk(f"{server.base_url}{path}", connections, seconds, threads=2)
                after = cpu_by_role(role)
                for name in ("requests_per_s", "p50_ms", "p99_ms"):
                    row.setdefault(name, []).append(level[name])
                for role_name, name in COUNTED_ROLES.items():
                    us = 1e6 * (after.get(role_name, 0.0) - before.get(role_name, 0.0)) / max(1, level["requests"])
                    row.setdefault(f"{name}_cpu_us_per_request", []).append(us)
    finally:
        for server in servers:
            server.stop(timeout_s=60)
    labels = [_commit(tree) for tree in trees]
    if len(envs) > 1 and (added := {name: value for name, value in envs[1].items() if envs[0].get(name) != value}):
        labels[1] += " with " + " ".join(f"{name}={value}" for name, value in added.items())  # a setting compared
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
    parser.add_argument(
        "--second-env", action="append", default=[], help="VIT_NAME=value for the second tree only (repeatable)"
    )
    parser.add_argument("--small", action="store_true", help="the tests' two-block model instead of the shipped one")
    parser.add_argument("--path", default="/predict")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=3.0, help="per round")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--output", type=Path, help="write the result here as JSON")
    args = parser.parse_args()
    require_wrk()
    env = DEFAULTS | dict(setting.split("=", 1) for setting in args.env)
    trees = [tree.resolve() for tree in args.trees]
    with tempfile.TemporaryDirectory() as folder:
        if args.small:
            from tests.support.models import save_small_checkpoint

            env["VIT_CHECKPOINT"] = str(save_small_checkpoint(Path(folder) / "small.safetensors"))
        env.setdefault("VIT_CHECKPOINT", str(DEFAULT_CHECKPOINT))
        second = dict(setting.split("=", 1) for setting in args.second_env)
        envs = [env | second if index == 1 else env for index in range(len(trees))]
        results = compare(trees, envs, args.path, args.connections, args.seconds, args.rounds, Path(folder))
    for label, row in results.items():
        print(
            label,
            "  ".join(f"{name} {value['median']} (x{value['ratio_to_first']})" for name, value in row.items()),
        )
    report = {
        "machine": f"{platform.machine()}, {cpu_quota()} CPUs",
        "settings": env | {"VIT_CHECKPOINT": Path(env["VIT_CHECKPOINT"]).name},
        "second_tree_settings": second,
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
