"""An exponential moving average of a model's weights, as timm's ModelEma keeps it."""

from __future__ import annotations

import copy

import torch

from model.vit import VisionTransformer


class ModelEma:
    """An exponential moving average of the weights; its decay ramps up so early steps are not frozen in."""

    def __init__(self, model: VisionTransformer, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: VisionTransformer) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(list(self.model.parameters()), list(model.parameters()), 1.0 - decay)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = state["updates"]
