"""Training-step throughput of our ViT against timm's VisionTransformer, interleaved in one run.

Both models get the same config, the same initial weights, the same batches and the same AdamW
settings; rounds alternate which model goes first, so drifts in machine load hit both alike.

    python -m bench.train_speed                    # the shipped tiny config, batch 128, on the CPU
    python -m bench.train_speed --device cuda --batch-size 2048 --compile --output bench/results/train_speed_x.json

`--compile` runs both models through torch.compile, and `--cuda-graphs` replays each one's whole step
from a CUDA graph, as `vit-train --cuda-graphs` does. AdamW is fused on CUDA, as in vit-train. The
result also gives the seconds that one pass over Fashion-MNIST's 60,000 training images takes at that speed.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F

from model.device import autocast, resolve_device
from model.evaluate import timm_copy
from model.graphed_step import WARM_UP_STEPS, GraphedStep
from model.train_options import PRESETS
from model.vit import VisionTransformer, ViTConfig

RESULTS = Path(__file__).parent / "results"
FASHION_MNIST_TRAIN_IMAGES = 60_000


class StepTimer:
    """One model with its own optimizer, timed over a fixed list of batches."""

    def __init__(self, model: torch.nn.Module, device: torch.device, compile: bool, graphs: bool) -> None:
        model = model.to(device).train()
        self.model = torch.compile(model) if compile else model
        self.device = device
        self.graphs = graphs
        lr = torch.tensor(1e-3, device=device) if graphs else 1e-3  # graphed: AdamW reads it from the device
        fused = device.type == "cuda"
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05, fused=fused, capturable=graphs)
        self.step = GraphedStep(self.eager_step) if graphs else self.eager_step

    def eager_step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor]:
        with autocast(self.device, cache=not self.graphs):
            logits = self.model(images).float()
        loss = F.cross_entropy(logits, labels, label_smoothing=0.1)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return (loss.detach(),)

    def images_per_second(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        self.synchronize()
        started = time.perf_counter()
        for images, labels in batches:
            self.step(images, labels)
        self.synchronize()
        return sum(len(labels) for _, labels in batches) / (time.perf_counter() - started)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=PRESETS, default="tiny")
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--cuda-graphs", action="store_true", help="replay both models' steps from CUDA graphs")
    parser.add_argument("--steps", type=int, default=8, help="training steps per timed round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", type=Path, default=RESULTS / "train_speed.json")
    args = parser.parse_args()

    device = resolve_device(args.device)
    if args.cuda_graphs and device.type != "cuda":
        parser.error(f"--cuda-graphs needs a CUDA device, not {device}")
    config = ViTConfig(image_size=28, patch_size=args.patch_size, in_channels=1, num_classes=10, **PRESETS[args.model])
    torch.manual_seed(0)
    ours = VisionTransformer(config)
    theirs = timm_copy(ours)  # identical starting weights
    timers = {
        name: StepTimer(model, device, args.compile, args.cuda_graphs)
        for name, model in [("ours", ours), ("timm", theirs)]
    }
    generator = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(args.batch_size, 1, 28, 28, generator=generator).to(device),
            torch.randint(0, 10, (args.batch_size,), generator=generator).to(device),
        )
        for _ in range(args.steps)
    ]
    for timer in timers.values():  # warm-up: allocator, kernels, optimizer state, compilation, capture
        timer.images_per_second((batches * (WARM_UP_STEPS + 1))[: WARM_UP_STEPS + 1])

    samples: dict[str, list[float]] = {name: [] for name in timers}
    for round_index in range(args.rounds):
        order = list(timers) if round_index % 2 == 0 else list(reversed(timers))
        for name in order:
            samples[name].append(timers[name].images_per_second(batches))
    medians = {name: statistics.median(values) for name, values in samples.items()}
    ratio = medians["ours"] / medians["timm"]
    result = {
        "benchmark": "training steps (forward, backward, AdamW), fp32"
        + (" + bf16 autocast" if device.type == "cuda" else "")
        + (", torch.compile" if args.compile else "")
        + (", CUDA graphs" if args.cuda_graphs else "")
        + (", fused AdamW" if device.type == "cuda" else ""),
        "config": config.to_dict(),
        "batch_size": args.batch_size,
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "images_per_second_median": {name: round(value, 1) for name, value in medians.items()},
        "images_per_second_rounds": {name: [round(v, 1) for v in values] for name, values in samples.items()},
        "ours_over_timm": round(ratio, 3),
        "fashion_mnist_epoch_seconds": round(FASHION_MNIST_TRAIN_IMAGES / medians["ours"], 2),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{args.model}/{args.patch_size} batch {args.batch_size}{' compiled' if args.compile else ''}"
        f"{' graphed' if args.cuda_graphs else ''}: "
        f"ours {medians['ours']:.0f} img/s ({FASHION_MNIST_TRAIN_IMAGES / medians['ours']:.2f} s per Fashion-MNIST "
        f"epoch), timm {medians['timm']:.0f} img/s: ours/timm = {ratio:.3f} -> {args.output}"
    )


if __name__ == "__main__":
    main()
