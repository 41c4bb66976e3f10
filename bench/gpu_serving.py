"""Serving speed on a GPU: vit-serve's layouts under wrk on the same machine, beside the model alone.

Layouts, each vit-serve with the shipped model and otherwise default settings:
- default: on CUDA, one model process fed by front ends that parse and decode (VIT_MODEL_PROCESS), its
  forward pass replayed from CUDA graphs (VIT_CUDA_GRAPHS); then with 8 front ends instead of one per
  CPU but one, which leaves cores to wrk and the model process; then with the graphs captured from
  torch.compile's kernels (VIT_COMPILE), which fuse the many small ones that a batch of one waits on.
  (Batches of up to 128 instead of 32, and no graphs, were measured and lost: bench/results/gpu_check.md.)
- workers N: N uvicorn workers and no model process, each worker with its own CUDA context, model,
  CUDA graphs and batchers; 8, then one per CPU but one.
Levels: /predict at 1, 32 and 512 connections, /attention (rollout) at 128. The in-process ceiling is
the model alone on the same device at several batch sizes, in the same run.

    python -m bench.gpu_serving --output gpu-check/gpu_serving.json      # what bench/gpu_check.sh runs
    python -m bench.gpu_serving --device cpu --seconds 2 --layouts default   # a dry run without a GPU
    python -m bench.gpu_serving --layouts default "default, 8 front ends" --rounds 2   # an A/B, alternated
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import torch
from prometheus_client.parser import text_string_to_metric_families

from app.cli import MODEL_SOCKET, runs_model_process, worker_count
from app.config import Settings
from app.inference import InferenceEngine
from app.served import ExplainItem, MapRequest
from bench.model_speed import interleaved_images_per_second
from bench.server_speed import IMAGE, require_wrk, run_wrk
from model import DEFAULT_CHECKPOINT
from model.checkpoint import load_checkpoint
from model.cpu import cpu_quota
from model.device import resolve_device
from tests.support.server import (
    TCP_ESTABLISHED,
    TCP_LISTEN,
    Server,
    cpu_seconds,
    listening_on_unix_socket,
    process_tree,
    start_server,
    tcp_sockets,
    thread_cpu_seconds,
    torch_loaded,
    unix_connections,
)

LAYOUTS = {
    "default": {},
    # The default with the two thread hand-overs of a lone batch taken out, which a request at one
    # connection pays as wake-ups of idle cores (app.batcher.InferenceThread).
    "default, lone batches inline": {"VIT_INLINE_LONE_BATCHES": "true"},
    "default, 8 front ends": {"VIT_WORKERS": "8"},
    "workers 8": {"VIT_MODEL_PROCESS": "false", "VIT_WORKERS": "8"},
    # Without the hop to a model process, the fastest at one connection; with as many HTTP processes as
    # the default has front ends (one per CPU but one), perhaps enough at 512.
    "workers, one per CPU but one": {
        "VIT_MODEL_PROCESS": "false",
        "VIT_WORKERS": str(worker_count(Settings(model_process=True, workers=0))),
    },
    "default, compiled": {"VIT_COMPILE": "true"},
    # Both cuts to a lone request's wait at once: fewer, fused kernels in the replayed graph (a batch of
    # one runs dozens of tiny ones) and no thread hand-overs. The candidate for the CUDA default where the
    # default misses the p50 at one connection; "default, compiled" and "default, lone batches inline"
    # say which cut paid.
    "default, compiled, lone batches inline": {"VIT_COMPILE": "true", "VIT_INLINE_LONE_BATCHES": "true"},
}
# (path, connections, wrk threads)
LEVELS = (("/predict", 1, 1), ("/predict", 32, 4), ("/predict", 512, 8), ("/attention?method=rollout", 128, 4))
TARGETS = {"/predict c=512 req/s": 10_000, "/predict c=32 req/s": 3_000, "/attention c=128 req/s": 2_000}
P50_AT_1_MS = 2.0
LAYOUT_ESTIMATE_S = 60  # what one layout is expected to take, until one has been measured
# The server's own timings, read from /metrics around each level: (histogram, the label that says where)
TIMINGS = {
    "server_ms": ("vit_request_duration_seconds", "route"),
    "queue_ms": ("vit_queue_seconds", "batcher"),
    "batch_ms": ("vit_compute_seconds", "batcher"),
    "batch_size": ("vit_batch_size", "batcher"),
}


def wait_for_every_process(server: Server, workers: int, model_process: bool, timeout_s: float = 120) -> None:
    """Ready means one worker is; the others may still be starting. Wait until every worker has loaded the
    model or, with a model process, until every front end has connected to it (front ends never load torch),
    and until each listens: a worker that has loaded the model may not listen yet, and process_roles would
    leave it out of the HTTP processes whose CPU time is counted."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        members = process_tree(server.process.pid)
        if model_process:
            started = sum(unix_connections(pid, MODEL_SOCKET) for pid in members)
        else:
            started = sum(torch_loaded(pid) for pid in members)
        if started >= workers and len(process_roles(server)["http"]) >= workers:
            return
        time.sleep(0.2)


def process_roles(server: Server) -> dict[str, list[int]]:
    """vit-serve's processes that do the work: the model process, if any, and those that answer HTTP (each
    worker listens on a socket of its own; vit-serve itself does when it runs one worker)."""
    members = process_tree(server.process.pid)
    model = [member for member in members if listening_on_unix_socket(member, MODEL_SOCKET)]
    listening = tcp_sockets(members, server.port, TCP_LISTEN)
    return {"model": model, "http": [member for member in members if listening[member]]}


def cpu_by_role(roles: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds so far: the HTTP processes together, the model process's event loop and its other threads
    (the inference thread, torch's), and wrk (this process's finished children)."""
    spent = {"HTTP processes": sum(cpu_seconds(pid) for pid in roles["http"])}
    for pid in roles["model"]:
        threads = thread_cpu_seconds(pid)
        spent["model process, event loop"] = threads.pop(pid, 0.0)
        spent["model process, other threads"] = sum(threads.values())
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    spent["wrk"] = children.ru_utime + children.ru_stime
    return spent


def timing_totals(base_url: str) -> dict[tuple[str, str], float]:
    """The sums and counts so far of the histograms in TIMINGS, by route or batcher, over every process.

    Not /metrics' own: each call is a request to it, which would keep its totals moving for ever."""
    totals: dict[tuple[str, str], float] = {}
    watched = {histogram: label for histogram, label in TIMINGS.values()}
    for family in text_string_to_metric_families(httpx.get(f"{base_url}/metrics", timeout=10).text):
        if family.name not in watched:
            continue
        for sample in family.samples:
            if not sample.name.endswith(("_sum", "_count")):
                continue
            where = sample.labels[watched[family.name]]
            if where != "/metrics":
                totals[sample.name, where] = totals.get((sample.name, where), 0.0) + sample.value
    return totals


def settled_timing_totals(base_url: str, timeout_s: float = 10.0) -> dict[tuple[str, str], float]:
    """timing_totals once they stop moving: requests that wrk left in flight when it stopped are answered
    after it, and would otherwise count in the next level."""
    totals, deadline = timing_totals(base_url), time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(0.25)
        totals, previous = timing_totals(base_url), totals
        if totals == previous:
            break
    return totals


def where_time_went(before: dict, after: dict, path: str) -> dict[str, float | None]:
    """Means over one level: the time a request spent in the server's middleware (from its headers to its
    answer), in the batcher's queue, and a batch's forward pass and size. What the client saw beyond
    server_ms went to the socket and uvicorn's parsing; beyond queue_ms plus batch_ms, to the front end."""
    where = {"route": path, "batcher": path.removeprefix("/")}
    means = {}
    for name, (histogram, label) in TIMINGS.items():
        key = where[label]
        count = after.get((f"{histogram}_count", key), 0.0) - before.get((f"{histogram}_count", key), 0.0)
        total = after.get((f"{histogram}_sum", key), 0.0) - before.get((f"{histogram}_sum", key), 0.0)
        scale = 1 if name == "batch_size" else 1e3
        means[name] = round(scale * total / count, 3) if count else None
    return means


def measure_layout(name: str, env: dict, device: str, seconds: float) -> dict:
    # The access log stays on, as by default (the tests' harness turns it off); it goes to a file.
    env = env | {"VIT_DEVICE": device, "VIT_ACCESS_LOG": "true"}
    settings = Settings(**{key.removeprefix("VIT_").lower(): value for key, value in env.items()})
    with tempfile.TemporaryDirectory(prefix="vit-bench-") as folder:
        server = start_server(env, app=None, timeout_s=300, log=Path(folder) / "server.log")
        try:
            wait_for_every_process(server, worker_count(settings), runs_model_process(settings))
            run_wrk(f"{server.base_url}/predict", 64, 3, threads=4)  # every process warm and connected
            return {"settings": env, "levels": measure_levels(name, server, seconds)}
        finally:
            server.stop(timeout_s=30)


def measure_levels(name: str, server: Server, seconds: float) -> dict:
    roles = process_roles(server)
    levels = {}
    for path, connections, threads in LEVELS:
        route = path.split("?")[0]
        timings_before = settled_timing_totals(server.base_url)
        before = cpu_by_role(roles)
        with ThreadPoolExecutor(1) as pool:
            spread = pool.submit(connections_held, roles["http"], server.port, connections, 0.9 * seconds)
            level = run_wrk(f"{server.base_url}{path}", connections, seconds, threads=threads)
            level["connections_per_http_process"] = spread.result()
        after = cpu_by_role(roles)
        timings_after = settled_timing_totals(server.base_url)
        # Which process runs out first: CPU time per request, where one core gives 1e6 us a second.
        level["cpu_us_per_request"] = {
            role: round(1e6 * (after[role] - before[role]) / max(1, level["requests"]), 1) for role in after
        }
        level["means"] = {"client_ms": level.pop("mean_ms")} | where_time_went(timings_before, timings_after, route)
        levels[f"{route} c={connections}"] = level
        # Also as cores kept busy at this rate: the role that nears its share of the machine is the limit.
        cpu = ", ".join(
            f"{role} {spent:.0f} ({spent * level['requests_per_s'] / 1e6:.2f} cores)"
            for role, spent in level["cpu_us_per_request"].items()
        )
        means = ", ".join(f"{part} {value}" for part, value in level["means"].items())
        print(
            f"{name:>21} {route:<10} c={connections:<3} {level['requests_per_s']:9.1f} req/s  "
            f"p50 {level['p50_ms']:7.2f}  p99 {level['p99_ms']:7.2f} ms  non-2xx {level['non_2xx']}  "
            f"CPU us/request: {cpu}  means: {means}  connections by process: {level['connections_per_http_process']}"
        )
    return levels


def connections_held(pids: list[int], port: int, connections: int, within_s: float) -> list[int]:
    """How many connections to the port each process holds, most first, once all `connections` have been
    accepted (busy processes take a while), or as within_s ends. Keep-alive connections stay where they are."""
    deadline = time.monotonic() + within_s
    while True:
        held = sorted((len(inodes) for inodes in tcp_sockets(pids, port, TCP_ESTABLISHED).values()), reverse=True)
        if sum(held) >= connections or time.monotonic() > deadline:
            return held
        time.sleep(0.1)


def median_seconds(call: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def served_batch_ms(device: str, repeats: int = 200) -> dict[str, float]:
    """The engine's /predict batch as a server's inference thread runs it, with the server's default settings
    (CUDA graphs on CUDA): uint8 images in, then the copy to the device, normalisation, the forward pass,
    softmax, and the probabilities back as lists. Median milliseconds: what a c=1 request waits on the model.
    Then a full /attention batch of rollout maps, as the level at 128 connections asks for them: beside the
    server's own batch_ms there, what the inference thread lost to the rest of its process."""
    engine = InferenceEngine(Settings(device=device))
    preprocess = engine.checkpoint.preprocess
    shape = preprocess.image_shape
    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)  # as a front end decodes
    medians = {
        f"batch {size}": round(1e3 * median_seconds(lambda size=size: engine.predict_batch([image] * size), repeats), 3)
        for size in (1, 32)
    }
    rollouts = [ExplainItem(image, MapRequest(method="rollout"))] * engine.settings.max_batch_size
    medians[f"attention batch {len(rollouts)}"] = round(
        1e3 * median_seconds(lambda: engine.explain_batch(rollouts), repeats // 4), 3
    )
    print("served batch, the engine alone:", ", ".join(f"{name} {ms} ms" for name, ms in medians.items()))
    return medians


# Echoes each byte it reads until its input closes; a fresh interpreter, so nothing of this one is forked.
ECHO = "import os\nwhile byte := os.read(0, 1):\n    os.write(1, byte)"


def process_round_trip_us(repeats: int = 2000) -> float:
    """Median microseconds for a byte to go to another process and back over pipes: the cost of the two
    wake-ups that every hop between processes pays, which a c=1 request pays several times (wrk to a front
    end, to the model process, and back). Idle cores of a virtual machine can take far longer to wake."""
    echo = subprocess.Popen([sys.executable, "-c", ECHO], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    to_echo, from_echo = echo.stdin.fileno(), echo.stdout.fileno()
    median = round(1e6 * median_seconds(lambda: (os.write(to_echo, b"x"), os.read(from_echo, 1)), repeats), 1)
    echo.stdin.close()
    echo.wait(5)
    print(f"process round trip over a pipe: {median} us")
    return median


def in_process(device: torch.device, seconds: float) -> dict:
    model = load_checkpoint(DEFAULT_CHECKPOINT, device).model
    config = model.config
    shape = (config.in_channels, config.image_size, config.image_size)
    ceiling = {}
    for precision in ("fp32", "bf16") if device.type == "cuda" else ("fp32",):
        for size in (1, 32, 256, 2048):
            inputs = torch.randn(size, *shape, device=device)
            images_per_s = interleaved_images_per_second({"model": model}, inputs, precision, seconds)["model"]
            ceiling[f"{precision} batch {size}"] = round(images_per_s, 1)
    return ceiling


def check(layout: dict) -> dict:
    levels = layout["levels"]
    met = {target: levels[target.removesuffix(" req/s")]["requests_per_s"] >= bar for target, bar in TARGETS.items()}
    met[f"/predict p50 at c=1 <= {P50_AT_1_MS} ms"] = levels["/predict c=1"]["p50_ms"] <= P50_AT_1_MS
    met["no 5xx or 503"] = all(level["non_2xx"] == 0 and level["socket_errors"] == 0 for level in levels.values())
    return met


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument(
        "--rounds", type=int, default=1, help="measure the layouts this many times, in turn: a machine drifts"
    )
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    parser.add_argument("--output", type=Path, default=Path("bench/results/gpu_serving.json"))
    parser.add_argument(
        "--deadline", type=float, help="a UNIX time to end by: a layout that would not fit before it is skipped"
    )
    args = parser.parse_args()
    require_wrk()
    device = resolve_device(args.device)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpus": cpu_quota(),
        "torch": torch.__version__,
        "image": IMAGE.name,
        "load_generator": "wrk on the same machine, keep-alive connections, a multipart PNG body",
        "uvicorn": uvicorn_picks(),
        "layouts": {},
        "in_process_images_per_s": {"before": in_process(device, 1.0)},
        "served_batch_ms": served_batch_ms(args.device),
        "process_round_trip_us": process_round_trip_us(),
        "nvidia_smi": _nvidia_smi(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    layouts = result["layouts"]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    longest_s = LAYOUT_ESTIMATE_S
    runs = [
        (name, f"{name}, round {turn}" if turn > 1 else name)
        for turn in range(1, args.rounds + 1)
        for name in args.layouts
    ]
    for name, run in runs:
        if args.deadline is not None and time.time() + longest_s > args.deadline:
            print(f"{run}: skipped, {longest_s:.0f} s would pass the deadline")
            layouts[run] = {"settings": LAYOUTS[name], "skipped": "out of time"}
            continue
        started = time.monotonic()
        try:
            layouts[run] = measure_layout(run, LAYOUTS[name], args.device, args.seconds)
            layouts[run]["targets"] = check(layouts[run])
        except (RuntimeError, subprocess.CalledProcessError) as error:  # one that fails costs the others nothing
            print(f"{run}: failed: {error}")
            layouts[run] = {"settings": LAYOUTS[name], "error": str(error)[-4000:]}
        longest_s = max(longest_s, time.monotonic() - started)
        args.output.write_text(json.dumps(result, indent=2) + "\n")  # what a check cut short still has
    result["in_process_images_per_s"]["after"] = in_process(device, 1.0)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    for name, layout in layouts.items():
        verdicts = [f"{'PASS' if ok else 'FAIL'} {target}" for target, ok in layout.get("targets", {}).items()]
        print(f"{name}: {', '.join(verdicts) or layout.get('skipped', 'did not start')}")
    print(f"-> {args.output}")


def uvicorn_picks() -> str:
    """What uvicorn's --http auto and --loop auto run here: its C parser and uvloop where they are installed."""
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return f"{http} on {'uvloop' if importlib.util.find_spec('uvloop') else 'asyncio'}"


def _nvidia_smi() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    return subprocess.run(query, capture_output=True, text=True, check=False).stdout.strip()


if __name__ == "__main__":
    main()
