"""Small models and their checkpoints: fast to load, enough to exercise every path."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from model.checkpoint import save_checkpoint
from model.data import FASHION_MNIST_CLASSES
from model.images import PreprocessConfig
from model.teacher import build_teacher, save_teacher
from model.vit import VisionTransformer, ViTConfig

SMALL_CONFIG = ViTConfig(image_size=28, patch_size=7, in_channels=1, num_classes=10, dim=32, depth=2, num_heads=2)
FASHION_PREPROCESS = PreprocessConfig(image_size=28, channels=1, mean=(0.2860,), std=(0.3530,))


def save_small_checkpoint(
    path: Path,
    classes: list[str] = FASHION_MNIST_CLASSES,
    dataset: str = "none",
    rgb_size: int | None = None,
    favours: int | None = None,
    crop_pct: float | None = None,
) -> Path:
    """A randomly initialised two-block model (seed 0) for `classes`, as if trained on `dataset`, at `path`.

    With rgb_size, it takes RGB images of that size, cut into the same 4 x 4 patches as the 28-pixel one,
    and with crop_pct it sees their centre as timm's evaluation transform crops it.
    With `favours`, it answers that class for every image.
    """
    torch.manual_seed(0)
    config = dataclasses.replace(SMALL_CONFIG, num_classes=len(classes))
    preprocess = FASHION_PREPROCESS
    if rgb_size is not None:
        config = dataclasses.replace(config, image_size=rgb_size, patch_size=rgb_size // 4, in_channels=3)
        preprocess = PreprocessConfig(rgb_size, 3, (0.5,) * 3, (0.25,) * 3, crop_pct=crop_pct)
    model = VisionTransformer(config).eval()
    if favours is not None:
        with torch.no_grad():
            model.head.bias[favours] = 1e3
    save_checkpoint(path, model, classes, preprocess, {"dataset": dataset})
    return path


def save_teacher_checkpoint(
    path: Path,
    favours: int | None = None,
    classes: list[str] = FASHION_MNIST_CLASSES,
    preprocess: PreprocessConfig = FASHION_PREPROCESS,
) -> Path:
    """A randomly initialised DenseNet-BC teacher (seed 0) for Fashion-MNIST; with `favours`, it answers
    that class for every image."""
    torch.manual_seed(0)
    teacher = build_teacher("densenet-bc-100", 1, len(classes)).eval()
    if favours is not None:
        with torch.no_grad():
            teacher.classifier.bias[favours] = 1e3
    save_teacher(path, teacher, "densenet-bc-100", 1, classes, preprocess, {"dataset": "fashion-mnist"})
    return path
