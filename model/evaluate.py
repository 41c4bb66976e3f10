"""Accuracy of a model on an in-memory dataset, through the same normalisation the server uses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.data import ImageDataset
from model.device import autocast
from model.preprocess import PreprocessConfig, normalize


@torch.inference_mode()
def evaluate(
    model: nn.Module, dataset: ImageDataset, preprocess: PreprocessConfig, device: torch.device, batch_size: int = 1000
) -> tuple[float, float]:
    """Mean cross-entropy loss and top-1 accuracy (a fraction) over the whole dataset."""
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
