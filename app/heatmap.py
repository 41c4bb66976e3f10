"""Attention maps -> pictures: colorized overlays, bare heatmaps, and labelled grids, as PNG."""

from __future__ import annotations

import io
from typing import Literal

import matplotlib
import numpy as np
from PIL import Image

from app.decoding import shrunk

Colormap = Literal["viridis", "inferno", "magma", "plasma", "cividis", "jet", "gray"]
Upsampling = Literal["nearest", "bilinear"]
UPSAMPLING = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR}


def scale_to_unit(attention_map: np.ndarray) -> np.ndarray:
    """Min-max scale to [0, 1]; a constant map becomes all zeros."""
    values = attention_map.astype(np.float32)
    spread = values.max() - values.min()
    return (values - values.min()) / spread if spread > 0 else np.zeros_like(values)


def colorize(values: np.ndarray, colormap: str) -> np.ndarray:
    """Values in [0, 1], (H, W) -> RGB uint8 (H, W, 3) through a Matplotlib colormap."""
    rgba = matplotlib.colormaps[colormap](values)
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def upsample(attention_map: np.ndarray, size: tuple[int, int], method: str = "bilinear") -> np.ndarray:
    """A (grid, grid) map scaled to [0, 1] and resized to `size` (width, height)."""
    resized = Image.fromarray(scale_to_unit(attention_map)).resize(size, UPSAMPLING[method])
    return np.clip(np.asarray(resized), 0.0, 1.0)


def render_heatmap(
    attention_map: np.ndarray, size: tuple[int, int], colormap: str = "viridis", method: str = "bilinear"
) -> Image.Image:
    return Image.fromarray(colorize(upsample(attention_map, size, method), colormap))


def render_overlay(
    base: Image.Image,
    attention_map: np.ndarray,
    colormap: str = "viridis",
    alpha: float = 0.5,
    method: str = "bilinear",
) -> Image.Image:
    """Blend the colorized map over an RGB `base` image, at the base's size."""
    heat = np.asarray(render_heatmap(attention_map, base.size, colormap, method), dtype=np.float32)
    blended = (1.0 - alpha) * np.asarray(base, dtype=np.float32) + alpha * heat
    return Image.fromarray(blended.round().astype(np.uint8))


GRID_CELL_PIXELS = 256 * 256  # a cell is drawn 160 pixels wide: a larger base only costs time and memory


def render_grid(
    base: Image.Image,
    maps: np.ndarray,
    row_labels: list[str],
    column_labels: list[str],
    colormap: str = "viridis",
    alpha: float = 0.5,
    method: str = "bilinear",
) -> Image.Image:
    """A labelled grid of overlays: maps is (rows, columns, grid, grid), e.g. layers x heads."""
    from matplotlib.figure import Figure  # here: an import every worker's start would pay for one kind of request

    rows, columns = maps.shape[:2]
    base = shrunk(base, GRID_CELL_PIXELS)
    # A Figure without pyplot: no global figure registry shared between threads, and nothing to close.
    figure = Figure(figsize=(1.6 * columns + 0.6, 1.6 * rows + 0.4))
    axes = figure.subplots(rows, columns, squeeze=False)
    for row in range(rows):
        for column in range(columns):
            cell = axes[row][column]
            cell.imshow(render_overlay(base, maps[row, column], colormap, alpha, method))
            cell.set_xticks([])
            cell.set_yticks([])
            if row == 0:
                cell.set_title(column_labels[column], fontsize=9)
            if column == 0:
                cell.set_ylabel(row_labels[row], fontsize=9)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
