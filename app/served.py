"""What crosses between the HTTP side and the engine: the served model's description, and each
endpoint's items and answers.

Plain data, without torch: a front end of the model process (app/model_process.py) receives and
sends these and never loads torch (what that saves: README, One model process, many front ends).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.images import PreprocessConfig


@dataclass(frozen=True)
class MapRequest:
    """Which attention map to compute for one image (see model.attention.attention_map)."""

    method: str = "rollout"
    layer: int | None = None  # raw: default the last; grid: only this layer's heads (default: every layer)
    head: int | None = None
    head_fusion: str = "mean"
    discard_ratio: float = 0.0
    start_layer: int = 0
    mass: float = 0.6
    target: int | None = None  # gradient: the class to explain; None: the top-1
    grid: bool = False  # raw class-token maps of layers x heads instead

    @property
    def needs_gradients(self) -> bool:
        return self.method == "gradient" and not self.grid

    @property
    def explained_class(self) -> int:
        """The class the map is about, -1 for the top-1: only a gradient map explains a chosen class."""
        return self.target if self.needs_gradients and self.target is not None else -1


@dataclass
class ExplainItem:
    pixels: np.ndarray  # (C, H, W) uint8 at the model's input size
    request: MapRequest


@dataclass
class Explanation:
    probabilities: list[float]
    values: np.ndarray  # (grid, grid), or (layers, heads, grid, grid) for a grid request
    target: int  # the class the map explains (the top-1 unless a gradient target was given)
    layers: list[int]  # the layers a grid request shows


@dataclass(frozen=True)
class ServedModel:
    """What is served, as requests are checked and answered: everything but the weights."""

    name: str
    classes: list[str]
    depth: int  # blocks, and heads in each: what /attention's layer and head are checked against
    num_heads: int
    preprocess: PreprocessConfig
    description: dict  # /model's account: parameters, device, torch threads, preprocessing, training
