"""What one Fashion-MNIST image costs to train, in floating-point operations, for each model vit-train builds.

Counted by torch's FlopCounterMode (matrix products and convolutions) on the CPU, so the figures hold on
any device: a forward pass, and a training step's forward and backward. A distilled run adds its
teacher's forward pass to every student step, so the two columns side by side say what `--teacher`
costs before any GPU time is spent on it.

    python -m bench.train_flops --output bench/results/train_flops.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from model.teacher import TEACHERS, build_teacher
from model.train_options import PRESETS
from model.vit import VisionTransformer, ViTConfig, count_parameters

IMAGE_SIZE, CHANNELS, CLASSES = 28, 1, 10  # Fashion-MNIST
BATCH = 8


def flops_per_image(model: nn.Module, train: bool) -> float:
    images = torch.randn(BATCH, CHANNELS, IMAGE_SIZE, IMAGE_SIZE)
    with FlopCounterMode(display=False) as counter:
        if train:
            model(images).sum().backward()
        else:
            with torch.no_grad():
                model(images)
    return counter.get_total_flops() / BATCH


def models(patch_sizes: list[int]) -> dict[str, nn.Module]:
    built: dict[str, nn.Module] = {}
    for preset, sizes in PRESETS.items():
        for patch_size in patch_sizes:
            config = ViTConfig(IMAGE_SIZE, patch_size, CHANNELS, CLASSES, **sizes)
            built[f"{preset}, patch {patch_size}"] = VisionTransformer(config)
    for teacher in TEACHERS:
        built[teacher] = build_teacher(teacher, CHANNELS, CLASSES)
    return built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patch-sizes", type=int, nargs="+", default=[4, 2])
    parser.add_argument("--output", type=Path, help="write the table here as JSON")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = {}
    for name, model in models(args.patch_sizes).items():
        rows[name] = {
            "parameters": count_parameters(model),
            "forward_gflops_per_image": round(flops_per_image(model.eval(), train=False) / 1e9, 4),
            "training_gflops_per_image": round(flops_per_image(model.train(), train=True) / 1e9, 4),
        }
        row = rows[name]
        print(
            f"{name:18s} {row['parameters']:>10,} parameters  forward {row['forward_gflops_per_image']:.3f}"
            f"  training step {row['training_gflops_per_image']:.3f} GFLOP per image"
        )
    if args.output:
        args.output.write_text(json.dumps({"image": "28 x 28 x 1", "models": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
