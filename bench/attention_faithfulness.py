"""The deletion test of the attention methods (model/faithfulness.py) on Fashion-MNIST test images.

python -m bench.attention_faithfulness                 # 1,000 images, writes bench/results/attention_faithfulness.json
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path

import torch

from model import DEFAULT_CHECKPOINT
from model.checkpoint import load_checkpoint
from model.data import load_dataset
from model.evaluate import preprocess_dataset
from model.faithfulness import METHODS, RANDOM_SEEDS, deletion_table
from model.vit import VisionTransformer

RESULTS = Path(__file__).parent / "results"


def load_inputs(
    checkpoint_path: Path, count: int
) -> tuple[VisionTransformer, torch.Tensor, torch.Tensor, torch.Tensor]:
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
    result = {
        "checkpoint": args.checkpoint.name,
        "images": args.images,
        "random_seeds": RANDOM_SEEDS,
        **table,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    columns = [*METHODS, "random"]
    base = table["base_accuracy"]
    print(f"accuracy drop in points when the top patches are blanked ({args.images} images, base {base} %)")
    print("| blanked | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for fraction, row in table["drop_points"].items():
        print(f"| {fraction} | " + " | ".join(f"{row[name]:.1f}" for name in columns) + " |")


if __name__ == "__main__":
    main()
