"""Deletion test of the attention methods: blank the patches a map ranks highest, and watch accuracy fall.

A map that points at what the model uses should hurt accuracy more, when its top patches are blanked,
than blanking random patches does. Runs on Fashion-MNIST test images with the shipped checkpoint.

    python -m bench.attention_faithfulness                 # 1,000 images, writes bench/results/attention_faithfulness.json
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path

import torch

from model import DEFAULT_CHECKPOINT
from model.attention import attention_gradients, attention_map
from model.checkpoint import load_checkpoint
from model.data import load_dataset
from model.evaluate import preprocess_dataset
from model.vit import VisionTransformer

RESULTS = Path(__file__).parent / "results"
METHODS = ("last", "rollout", "gradient")
FRACTIONS = (0.1, 0.2, 0.3)
RANDOM_SEEDS = 5


def method_maps(model: VisionTransformer, inputs: torch.Tensor, method: str, batch_size: int = 250) -> torch.Tensor:
    """(B, grid, grid) maps of one method; gradient maps explain each image's top-1 class."""
    maps = []
    for batch in inputs.split(batch_size):
        if method == "gradient":
            _, attentions, gradients, _ = attention_gradients(model, batch)
        else:
            with torch.inference_mode():
                _, attentions = model.forward_with_attention(batch)
            gradients = None
        maps.append(attention_map(method, attentions, gradients))
    return torch.cat(maps)


def blank_top_patches(inputs: torch.Tensor, maps: torch.Tensor, fraction: float, blank: torch.Tensor) -> torch.Tensor:
    """Set the `fraction` of patches the maps rank highest to `blank` (black, once normalised)."""
    B, _, H, _ = inputs.shape
    grid = maps.shape[-1]
    patch = H // grid
    count = round(fraction * grid * grid)
    top = maps.flatten(1).topk(count, dim=1).indices  # (B, count)
    mask = torch.zeros(B, grid * grid, dtype=torch.bool).scatter(1, top, True).view(B, 1, grid, grid)
    mask = mask.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)  # (B, 1, H, W)
    return torch.where(mask, blank.view(1, -1, 1, 1), inputs)


@torch.inference_mode()
def accuracy(model: VisionTransformer, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    predictions = torch.cat([model(batch).argmax(1) for batch in inputs.split(500)])
    return (predictions == labels).double().mean().item()


def deletion_table(model: VisionTransformer, inputs: torch.Tensor, labels: torch.Tensor, blank: torch.Tensor) -> dict:
    """Accuracy drop (points) per method and fraction, beside the mean drop of random rankings."""
    base = accuracy(model, inputs, labels)
    grid = model.config.grid_size
    rankings = {method: method_maps(model, inputs, method) for method in METHODS}
    generator = torch.Generator().manual_seed(0)
    random_rankings = [torch.rand(len(inputs), grid, grid, generator=generator) for _ in range(RANDOM_SEEDS)]
    table: dict = {"base_accuracy": round(100 * base, 2), "drop_points": {}}
    for fraction in FRACTIONS:
        row = {m: 100 * (base - accuracy(model, blank_top_patches(inputs, rankings[m], fraction, blank), labels)) for m in METHODS}
        random_drops = [base - accuracy(model, blank_top_patches(inputs, r, fraction, blank), labels) for r in random_rankings]
        row["random"] = 100 * sum(random_drops) / len(random_drops)
        table["drop_points"][f"{round(100 * fraction)}%"] = {name: round(value, 2) for name, value in row.items()}
    return table


def load_inputs(checkpoint_path: Path, count: int) -> tuple[VisionTransformer, torch.Tensor, torch.Tensor, torch.Tensor]:
    checkpoint = load_checkpoint(checkpoint_path)
    test = load_dataset("fashion-mnist", "test").subset(count)
    inputs = preprocess_dataset(test, checkpoint.preprocess)
    mean, std = torch.tensor(checkpoint.preprocess.mean), torch.tensor(checkpoint.preprocess.std)
    return checkpoint.model, inputs, test.labels, (0.0 - mean) / std  # black, normalised


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--output", type=Path, default=RESULTS / "attention_faithfulness.json")
    args = parser.parse_args()
    model, inputs, labels, blank = load_inputs(args.checkpoint, args.images)
    table = deletion_table(model, inputs, labels, blank)
    result = {"checkpoint": args.checkpoint.name, "images": args.images, "random_seeds": RANDOM_SEEDS, **table,
              "date": datetime.now(UTC).isoformat(timespec="seconds")}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    columns = [*METHODS, "random"]
    print(f"accuracy drop in points when the top patches are blanked ({args.images} images, base {table['base_accuracy']} %)")
    print("| blanked | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for fraction, row in table["drop_points"].items():
        print(f"| {fraction} | " + " | ".join(f"{row[name]:.1f}" for name in columns) + " |")


if __name__ == "__main__":
    main()
