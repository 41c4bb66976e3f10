"""What one /attention call costs next to one /predict call, on the real server, in one run.

Requests alternate between the two endpoints, one at a time, so both see the same machine load.

    python -m bench.attention_cost           # writes bench/results/attention_cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

from tests.support.server import running_server

RESULTS = Path(__file__).parent / "results"
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ankle-boot.png"
CALLS = {
    "predict": ("/predict", {}),
    "attention rollout": ("/attention", {"method": "rollout"}),
    "attention gradient": ("/attention", {"method": "gradient"}),
}


def timed_post(client: httpx.Client, path: str, params: dict, image: bytes) -> float:
    started = time.perf_counter()
    response = client.post(path, params=params, files={"file": ("image.png", image, "image/png")})
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--output", type=Path, default=RESULTS / "attention_cost.json")
    args = parser.parse_args()
    image = EXAMPLE.read_bytes()
    latencies: dict[str, list[float]] = {name: [] for name in CALLS}
    with running_server({"VIT_DEVICE": "cpu"}) as server, httpx.Client(base_url=server.base_url, timeout=30) as client:
        for path, params in CALLS.values():  # warm-up
            timed_post(client, path, params, image)
        for _ in range(args.rounds):
            for name, (path, params) in CALLS.items():
                latencies[name].append(timed_post(client, path, params, image))
    medians_ms = {name: 1000 * statistics.median(values) for name, values in latencies.items()}
    ratios = {name: medians_ms[name] / medians_ms["predict"] for name in CALLS if name != "predict"}
    result = {
        "image": EXAMPLE.name,
        "rounds": args.rounds,
        "median_latency_ms": {name: round(value, 2) for name, value in medians_ms.items()},
        "ratio_to_predict": {name: round(value, 2) for name, value in ratios.items()},
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    for name, value in medians_ms.items():
        ratio = f" ({ratios[name]:.2f}x predict)" if name in ratios else ""
        print(f"{name}: median {value:.2f} ms{ratio}")


if __name__ == "__main__":
    main()
