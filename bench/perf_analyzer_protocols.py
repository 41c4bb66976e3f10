"""The Open Inference Protocol's three ways in, measured by Triton's perf_analyzer against one `vit-serve`:
REST (`-i http`), gRPC (`-i grpc`) and gRPC streaming (`-i grpc --streaming`), with the README's image.

For each worker count asked (0: vit-serve's default), one server with VIT_GRPC_PORT set; the three are measured
in two rounds, in the order ABCCBA, so that a machine that slows down during the run weighs on all alike, and
each figure is the mean of the two rounds.

perf_analyzer sends all its calls over one gRPC connection, and the kernel spreads connections, not calls,
over vit-serve's processes (SO_REUSEPORT): over gRPC it reaches one of them, over HTTP each of its connections
may reach another. With one worker, the three meet on even terms.

    pip install perf-analyzer     # Linux with glibc 2.38 or later
    python -m bench.perf_analyzer_protocols --workers 0 1   # bench/results/perf_analyzer_protocols_cpu.json
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from bench.server_speed import IMAGE, RESULTS
from model import DEFAULT_CHECKPOINT
from tests.support.server import free_port, start_server

PROTOCOLS = {"http": [], "grpc": [], "grpc streaming": ["--streaming"]}
ORDER = ["http", "grpc", "grpc streaming", "grpc streaming", "grpc", "http"]
CONCURRENCIES = (1, 8)


def input_data(folder: Path) -> Path:
    """perf_analyzer's --input-data for the image: its b64 is the binary tensor data, each element's length first."""
    png = IMAGE.read_bytes()
    element = base64.b64encode(struct.pack("<I", len(png)) + png).decode()
    path = folder / "image.json"
    path.write_text(json.dumps({"data": [{"image": {"b64": element, "shape": [1]}}]}))
    return path


def run_perf_analyzer(analyzer: str, url: str, protocol: str, data: Path, folder: Path, seconds: float) -> dict:
    """{concurrency: {"infer_per_s", "p50_ms", "p99_ms"}} from perf_analyzer's CSV."""
    report = folder / "report.csv"
    command = [analyzer, "-m", DEFAULT_CHECKPOINT.stem, "-u", url, "-i", protocol.split()[0], *PROTOCOLS[protocol]]
    command += ["--input-data", str(data), "--shape", "image:1", "--shape", "pixels:1,1,28,28"]
    command += ["--concurrency-range", f"{CONCURRENCIES[0]}:{CONCURRENCIES[-1]}:{CONCURRENCIES[-1] - CONCURRENCIES[0]}"]
    command += ["--measurement-interval", str(int(seconds * 1000)), "--stability-percentage", "1000", "-f", str(report)]
    subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    with report.open() as rows:
        return {
            row["Concurrency"]: {
                "infer_per_s": float(row["Inferences/Second"]),
                "p50_ms": int(row["p50 latency"]) / 1000,
                "p99_ms": int(row["p99 latency"]) / 1000,
            }
            for row in csv.DictReader(rows)
        }


def measure(analyzer: str, workers: int, seconds: float) -> dict:
    grpc_port = free_port()
    env = {"VIT_DEVICE": "cpu", "VIT_GRPC_PORT": str(grpc_port), "VIT_WORKERS": str(workers)}
    server = start_server(env, app=None)
    urls = {"http": server.base_url.removeprefix("http://"), "grpc": f"127.0.0.1:{grpc_port}"}
    runs: dict[str, list[dict]] = {protocol: [] for protocol in PROTOCOLS}
    try:
        with tempfile.TemporaryDirectory() as folder:
            data = input_data(Path(folder))
            for protocol in ORDER * 2:
                url = urls[protocol.split()[0]]
                runs[protocol].append(run_perf_analyzer(analyzer, url, protocol, data, Path(folder), seconds))
                figures = "  ".join(
                    f"c={c} {level['infer_per_s']:6.1f}/s p50 {level['p50_ms']:5.1f} ms"
                    for c, level in runs[protocol][-1].items()
                )
                print(f"workers={workers} {protocol:>15}  {figures}")
    finally:
        server.stop()
    means = {
        protocol: {
            concurrency: {
                figure: round(statistics.mean(run[concurrency][figure] for run in protocol_runs), 2)
                for figure in ("infer_per_s", "p50_ms", "p99_ms")
            }
            for concurrency in protocol_runs[0]
        }
        for protocol, protocol_runs in runs.items()
    }
    return {"means": means, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[0], help="VIT_WORKERS of each server (0: default)")
    parser.add_argument("--seconds", type=float, default=3.0, help="perf_analyzer's measurement interval")
    parser.add_argument("--out", type=Path, default=RESULTS / "perf_analyzer_protocols_cpu.json")
    arguments = parser.parse_args()
    analyzer = shutil.which("perf_analyzer")
    if analyzer is None:
        parser.exit(1, "perf_analyzer is not installed: pip install perf-analyzer (Linux with glibc 2.38 or later)\n")
    result = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": len(os.sched_getaffinity(0)), "python": platform.python_version()},
        "order": ORDER * 2,
        "servers": {
            f"workers={workers}": measure(analyzer, workers, arguments.seconds) for workers in arguments.workers
        },
    }
    arguments.out.parent.mkdir(parents=True, exist_ok=True)
    arguments.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {arguments.out}")


if __name__ == "__main__":
    main()
