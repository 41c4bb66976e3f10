"""The deletion test of attention maps: blank the patches a map ranks highest, and watch accuracy fall.

A map that points at what the model uses should hurt accuracy more, when its top patches are blanked,
than blanking random patches does. ``python -m bench.attention_faithfulness`` records the table.
"""

from __future__ import annotations

import torch

from model.attention import attention_gradients, attention_map
from model.vit import VisionTransformer

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
        row = {
            m: 100 * (base - accuracy(model, blank_top_patches(inputs, rankings[m], fraction, blank), labels))
            for m in METHODS
        }
        random_drops = [
            base - accuracy(model, blank_top_patches(inputs, r, fraction, blank), labels) for r in random_rankings
        ]
        row["random"] = 100 * sum(random_drops) / len(random_drops)
        table["drop_points"][f"{round(100 * fraction)}%"] = {name: round(value, 2) for name, value in row.items()}
    return table
