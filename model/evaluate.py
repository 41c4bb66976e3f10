"""Score a checkpoint on a test set: ``python -m model.evaluate --checkpoint runs/fmnist/model.safetensors``.

Prints overall and per-class accuracy and writes a confusion-matrix PNG. Every image goes through
``model/preprocess.py``, the path that uploads to the server take.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model.checkpoint import load_checkpoint
from model.data import DATASETS, ImageDataset, load_dataset
from model.device import autocast, resolve_device
from model.images import PreprocessConfig
from model.plots import plot_confusion_matrix
from model.preprocess import normalize, pixels_to_image, preprocess_image


@torch.inference_mode()
def evaluate(
    model: nn.Module, dataset: ImageDataset, preprocess: PreprocessConfig, device: torch.device, batch_size: int = 1000
) -> tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy (a fraction) of images already at the model's size (training)."""
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        images = normalize(dataset.images[start : start + batch_size].to(device), preprocess)
        labels = dataset.labels[start : start + batch_size].to(device)
        with autocast(device):
            logits = model(images).float()
        total_loss += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
    return total_loss / len(dataset), correct / len(dataset)


def preprocess_dataset(dataset: ImageDataset, preprocess: PreprocessConfig) -> torch.Tensor:
    """Every image through the serving preprocessing: (N, C, H, W) float."""
    return torch.stack([preprocess_image(pixels_to_image(pixels), preprocess) for pixels in dataset.images])


@torch.inference_mode()
def predict(model: nn.Module, inputs: torch.Tensor, device: torch.device, batch_size: int = 500) -> torch.Tensor:
    """Top-1 class indices, in fp32 whatever the device, as the server computes them."""
    model.eval()
    return torch.cat([model(batch.to(device)).argmax(1).cpu() for batch in inputs.split(batch_size)])


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(true, predicted) counts."""
    return torch.bincount(labels * num_classes + predictions, minlength=num_classes**2).reshape(
        num_classes, num_classes
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--dataset", choices=DATASETS, default="fashion-mnist")
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--confusion-matrix", type=Path, help="PNG to write (default: CHECKPOINT_STEM-confusion.png here)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> float:
    args = parse_args(argv)
    checkpoint = load_checkpoint(args.checkpoint, resolve_device(args.device))
    dataset = load_dataset(args.dataset, "test", args.data_dir, checkpoint.preprocess)
    predictions = predict(
        checkpoint.model, preprocess_dataset(dataset, checkpoint.preprocess), resolve_device(args.device)
    )
    matrix = confusion_matrix(dataset.labels, predictions, len(checkpoint.classes))
    accuracy = 100.0 * matrix.diag().sum().item() / len(dataset)
    print(f"{args.checkpoint}: {accuracy:.2f} % top-1 on {len(dataset)} {args.dataset} test images")
    width = max(len(name) for name in checkpoint.classes)
    for index, name in enumerate(checkpoint.classes):
        total = matrix[index].sum().item()
        print(f"  {name:<{width}}  {100.0 * matrix[index, index].item() / max(total, 1):6.2f} %  ({total} images)")
    figure_path = args.confusion_matrix or Path(f"{args.checkpoint.stem}-confusion.png")
    plot_confusion_matrix(
        matrix.numpy(), checkpoint.classes, figure_path, f"{checkpoint.name}: {accuracy:.2f} % on {args.dataset}"
    )
    print(f"confusion matrix: {figure_path}")
    return accuracy


if __name__ == "__main__":
    main()
