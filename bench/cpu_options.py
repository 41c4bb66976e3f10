"""What the CPU serving options buy: bf16 autocast, int8 dynamic quantization and torch.compile, speed and accuracy.

    python -m bench.cpu_options          # writes bench/results/cpu_options.json

Each variant is built the way the server builds it (VIT_PRECISION=bf16, VIT_QUANTIZE=int8, VIT_COMPILE=true),
timed interleaved with the others at batch 1, 8 and 32, and scored on the 10,000 Fashion-MNIST test images.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path

import torch

from app.config import Settings
from app.inference import InferenceEngine
from bench.model_speed import interleaved_images_per_second
from model.data import load_dataset
from model.device import cpu_computes_bf16
from model.evaluate import predict, preprocess_dataset

RESULTS = Path(__file__).parent / "results"
VARIANTS = {"fp32": {}, "bf16": {"precision": "bf16"}, "int8": {"quantize": "int8"}, "compiled": {"compile": True}}
BATCH_SIZES = (1, 8, 32)


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    warnings.filterwarnings("ignore")
    engines, start_up = {}, {}
    for name, options in VARIANTS.items():
        started = time.perf_counter()
        engines[name] = InferenceEngine(Settings(device="cpu", **options))  # builds and warms up, as the server does
        start_up[name] = round(time.perf_counter() - started, 1)
    forwards = {name: engine.forward for name, engine in engines.items()}
    config = engines["fp32"].model.config
    speed = {}
    for batch_size in BATCH_SIZES:
        inputs = torch.randn(batch_size, config.in_channels, config.image_size, config.image_size)
        speed[str(batch_size)] = {
            name: round(value, 1) for name, value in interleaved_images_per_second(forwards, inputs, "fp32", 8).items()
        }
    test = load_dataset("fashion-mnist", "test")
    inputs = preprocess_dataset(test, engines["fp32"].checkpoint.preprocess)
    accuracy = {
        name: round(100 * (predict(forward, inputs, torch.device("cpu")) == test.labels).double().mean().item(), 2)
        for name, forward in forwards.items()
    }
    result = {
        "images_per_second": speed,
        "test_accuracy": accuracy,
        "start_up_s": start_up,
        "torch_threads": torch.get_num_threads(),
        "cpu_computes_bf16": cpu_computes_bf16(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cpu_options.json").write_text(json.dumps(result, indent=2) + "\n")
    for name in VARIANTS:
        print(
            f"{name:>9}: "
            + ", ".join(f"batch {size} {speed[str(size)][name]:7.0f} img/s" for size in BATCH_SIZES)
            + ", "
            f"accuracy {accuracy[name]} %, start-up {start_up[name]} s"
        )


if __name__ == "__main__":
    main()
