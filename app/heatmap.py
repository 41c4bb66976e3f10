"""Attention map -> PNG: a perceptual colormap blended over the input image."""

from __future__ import annotations

import io

import matplotlib
import numpy as np
from PIL import Image

from model.preprocess import convert_mode

COLORMAPS = ("viridis", "inferno", "magma", "plasma", "cividis", "jet", "gray")


def colorize(values: np.ndarray, colormap: str) -> np.ndarray:
    """Values in [0, 1], (H, W) -> RGB uint8 (H, W, 3) through a Matplotlib colormap."""
    rgba = matplotlib.colormaps[colormap](values)
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def upsample(attention_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A (grid, grid) map scaled to [0, 1] and resized bilinearly to `size` (width, height)."""
    values = attention_map.astype(np.float32)
    spread = values.max() - values.min()
    values = (values - values.min()) / spread if spread > 0 else np.zeros_like(values)
    resized = Image.fromarray(values).resize(size, Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized), 0.0, 1.0)


def render_overlay(image: Image.Image, attention_map: np.ndarray, colormap: str = "viridis", alpha: float = 0.5) -> bytes:
    """Blend the colorized map over `image` at the image's own size and encode as PNG."""
    base = np.asarray(convert_mode(image, channels=3), dtype=np.float32)
    heat = colorize(upsample(attention_map, image.size), colormap).astype(np.float32)
    blended = ((1.0 - alpha) * base + alpha * heat).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(blended).save(buffer, format="PNG")
    return buffer.getvalue()
