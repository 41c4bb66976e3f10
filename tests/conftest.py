from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model import DEFAULT_CHECKPOINT
from model.checkpoint import save_checkpoint
from model.data import FASHION_MNIST_CLASSES, ImageDataset, load_dataset
from model.preprocess import PreprocessConfig
from model.vit import VisionTransformer, ViTConfig

SMALL_CONFIG = ViTConfig(image_size=28, patch_size=7, in_channels=1, num_classes=10, dim=32, depth=2, num_heads=2)
FASHION_PREPROCESS = PreprocessConfig(image_size=28, channels=1, mean=(0.2860,), std=(0.3530,))


def png_bytes(image: Image.Image | np.ndarray, format: str = "PNG") -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def fashion_test() -> ImageDataset:
    """The real Fashion-MNIST test set; CI installs Debian's dataset-fashion-mnist, so this must not skip."""
    return load_dataset("fashion-mnist", "test")


@pytest.fixture(scope="session")
def shipped_checkpoint() -> Path:
    assert DEFAULT_CHECKPOINT.is_file(), f"the shipped checkpoint {DEFAULT_CHECKPOINT} is missing"
    return DEFAULT_CHECKPOINT


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised two-block model: fast to load, enough to exercise every path."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("checkpoint") / "small.safetensors"
    save_checkpoint(path, VisionTransformer(SMALL_CONFIG).eval(), FASHION_MNIST_CLASSES, FASHION_PREPROCESS, {"dataset": "none"})
    return path
