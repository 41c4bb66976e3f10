"""Inference throughput of our ViT against timm's VisionTransformer at several batch sizes, interleaved.

python -m bench.model_speed                                   # fp32 on the CPU
python -m bench.model_speed --device cuda --precision bf16    # on a GPU
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from model import DEFAULT_CHECKPOINT
from model.checkpoint import load_checkpoint
from model.device import Precision, autocast, cast_for_autocast, resolve_device
from model.evaluate import timm_copy

RESULTS = Path(__file__).parent / "results"
BATCH_SIZES = (1, 8, 64, 256)
PRECISIONS = ("fp32", "bf16", "fp16")


def forward_time(model: torch.nn.Module, inputs: torch.Tensor, precision: Precision) -> float:
    """Seconds for one forward pass."""
    device = inputs.device
    with torch.inference_mode(), autocast(device, precision):
        started = time.perf_counter()
        model(inputs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - started


def interleaved_images_per_second(models: dict, inputs: torch.Tensor, precision: Precision, budget_s: float) -> dict:
    """Alternate single forward passes of each model until `budget_s` is spent; median img/s of each.

    Passes alternate one by one (and which goes first alternates too), so the load drifts of a shared
    machine fall on both models alike.
    """
    for model in models.values():  # warm-up: allocator, kernels
        for _ in range(3):
            forward_time(model, inputs, precision)
    times: dict[str, list[float]] = {name: [] for name in models}
    names, started = list(models), time.perf_counter()
    while time.perf_counter() - started < budget_s or len(times[names[0]]) < 5:
        for name in names:
            times[name].append(forward_time(models[name], inputs, precision))
        names.reverse()
    return {name: len(inputs) / statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    parser.add_argument("--seconds", type=float, default=8.0, help="time spent per batch size")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()

    device = resolve_device(args.device)
    if args.precision == "fp16" and device.type != "cuda":
        parser.error("--precision fp16 runs on CUDA only; the CPU's mixed precision is bf16")
    ours = load_checkpoint(args.checkpoint, device).model
    theirs = timm_copy(ours)  # in eval mode, as ours is
    for model in (ours, theirs):  # mixed precision as the server runs it: weights cast once, not at every pass
        cast_for_autocast(model, args.precision)
    # A second copy of timm's model, timed like the others: how far two identical models differ in one run.
    models = {"ours": ours, "timm": theirs, "timm copy": copy.deepcopy(theirs)}
    config = ours.config
    results = {}
    for batch_size in BATCH_SIZES:
        inputs = torch.randn(batch_size, config.in_channels, config.image_size, config.image_size, device=device)
        medians = interleaved_images_per_second(models, inputs, args.precision, args.seconds)
        results[str(batch_size)] = {
            "ours": round(medians["ours"], 1),
            "timm": round(medians["timm"], 1),
            "ours_over_timm": round(medians["ours"] / medians["timm"], 3),
            "timm_copy_over_timm": round(medians["timm copy"] / medians["timm"], 3),
        }
        print(
            f"batch {batch_size:>3}: ours {medians['ours']:8.0f} img/s, timm {medians['timm']:8.0f} img/s, "
            f"ratio {medians['ours'] / medians['timm']:.3f} "
            f"(timm's copy / timm: {medians['timm copy'] / medians['timm']:.3f})"
        )
    device_name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.machine()}), {torch.get_num_threads()} threads"
    )
    output = args.output or RESULTS / f"model_speed_{device.type}_{args.precision}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(
        json.dumps(
            {
                "benchmark": "inference forward passes, images/s (median pass time, passes of all models interleaved)",
                "checkpoint": args.checkpoint.name,
                "config": config.to_dict(),
                "device": device_name,
                "precision": args.precision,
                "weights": "fp32" if args.precision == "fp32" else "linear and convolution weights cast once",
                "torch": torch.__version__,
                "images_per_second": results,
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
            },
            indent=2,
        )
        + "\n"
    )
    print(f"-> {output}")


if __name__ == "__main__":
    main()
