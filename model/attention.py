"""Attention maps: which patches a ViT looked at. Pure tensor functions.

``attentions`` and ``gradients`` are (layers, B, heads, N, N) with the class token at index 0, as
``VisionTransformer.forward_with_attention`` returns them. Every map is (B, grid, grid) over the patches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from model.attention_methods import HEAD_FUSIONS, METHODS


def fuse_heads(attention: torch.Tensor, head_fusion: str = "mean") -> torch.Tensor:
    """(B, heads, N, N) -> (B, N, N)."""
    if head_fusion == "mean":
        return attention.mean(dim=1)
    if head_fusion == "max":
        return attention.amax(dim=1)
    if head_fusion == "min":
        return attention.amin(dim=1)
    raise ValueError(f"unknown head fusion {head_fusion!r}; choose one of {', '.join(HEAD_FUSIONS)}")


def select_heads(attention: torch.Tensor, head: int | None, head_fusion: str) -> torch.Tensor:
    """One head's attention, or all heads fused: (B, heads, N, N) -> (B, N, N)."""
    return attention[:, head] if head is not None else fuse_heads(attention, head_fusion)


def patch_grid(class_row: torch.Tensor) -> torch.Tensor:
    """The class token's row without its own entry, (B, N) -> (B, grid, grid)."""
    patches = class_row[:, 1:]
    grid = math.isqrt(patches.shape[-1])
    return patches.reshape(-1, grid, grid)


def raw_attention(
    attentions: torch.Tensor, layer: int, head: int | None = None, head_fusion: str = "mean"
) -> torch.Tensor:
    """How much the class token attends to each patch in one layer (Dosovitskiy et al. 2020, fig. 6)."""
    return patch_grid(select_heads(attentions[layer], head, head_fusion)[:, 0])


def last_layer_attention(attentions: torch.Tensor, head: int | None = None, head_fusion: str = "mean") -> torch.Tensor:
    """The class token's attention in the last layer, as DINO shows it (Caron et al. 2021)."""
    return raw_attention(attentions, -1, head, head_fusion)


def attention_rollout(
    attentions: torch.Tensor, head_fusion: str = "mean", discard_ratio: float = 0.0, start_layer: int = 0
) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers").

    From `start_layer` on, each layer's fused attention loses its weakest `discard_ratio` of entries
    (never those involving the class token), gets the identity added for the residual path, and has
    each row renormalised to sum to 1; the layers are then multiplied: R = A_L ... A_start.
    """
    tokens = attentions.shape[-1]
    identity = torch.eye(tokens, dtype=attentions.dtype, device=attentions.device)
    rollout = identity.expand(attentions.shape[1], tokens, tokens)  # (B, N, N)
    for layer in attentions[start_layer:]:
        fused = fuse_heads(layer, head_fusion)
        if discard_ratio > 0:
            fused = discard_weakest(fused, discard_ratio)
        mixed = fused + identity
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)  # keepdim: normalise rows, not columns
        rollout = mixed @ rollout
    return patch_grid(rollout[:, 0])


def discard_weakest(attention: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero the smallest `ratio` of each map's patch-to-patch entries; the class token's row and column stay."""
    B, N, _ = attention.shape
    patch_block = attention[:, 1:, 1:].reshape(B, -1)
    count = int(patch_block.shape[1] * ratio)
    if count == 0:
        return attention
    weakest = patch_block.topk(count, dim=1, largest=False).indices
    kept = patch_block.scatter(1, weakest, 0.0).reshape(B, N - 1, N - 1)
    result = attention.clone()
    result[:, 1:, 1:] = kept
    return result


def gradient_rollout(attentions: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Class-specific relevance (Chefer, Gur & Wolf 2021, "Generic Attention-model Explainability").

    R starts as the identity; each layer adds mean_h((dA ⊙ A)⁺) @ R, where dA is the gradient of the
    target logit with respect to that same layer's attention A.
    """
    tokens = attentions.shape[-1]
    relevance = torch.eye(tokens, dtype=attentions.dtype, device=attentions.device).repeat(attentions.shape[1], 1, 1)
    for attention, gradient in zip(attentions, gradients, strict=True):
        weighted = (gradient * attention).clamp(min=0).mean(dim=1)  # (B, N, N)
        relevance = relevance + weighted @ relevance
    return patch_grid(relevance[:, 0])


def attention_gradients(
    model: nn.Module, images: torch.Tensor, target: torch.Tensor | Sequence[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits, attentions, d(target logit)/d(attention) and the targets used, all on the model's device.

    `target` holds one class per image, as a list or a tensor on any device; a negative entry (or no
    target) means that image's top-1. torch.autograd.grad returns gradients in the order of its
    inputs, so each layer's gradient is paired with that layer's attention (no hook ordering involved).
    Each image's gradient depends only on its own logit, so batching does not change it.
    """
    with torch.enable_grad():
        images = images.detach().requires_grad_(True)  # the graph needs one input that wants gradients
        logits, layers = model.forward_with_attention_layers(images)
        targets = logits.argmax(dim=-1)
        if target is not None:
            chosen = torch.as_tensor(target, device=logits.device)  # the one tensor made here: on the logits' device
            targets = torch.where(chosen < 0, targets, chosen)
        score = logits.gather(1, targets.view(-1, 1)).sum()
        gradients = torch.autograd.grad(score, layers)
    return logits.detach(), torch.stack([layer.detach() for layer in layers]), torch.stack(gradients), targets


def keep_mass(attention_map: torch.Tensor, mass: float) -> torch.Tensor:
    """DINO's threshold (Caron et al. 2021): 1 for the strongest patches that together hold `mass` of the map."""
    flat = attention_map.flatten(1)
    flat = flat / flat.sum(dim=1, keepdim=True)
    values, order = flat.sort(dim=1, descending=True)
    before = values.cumsum(dim=1) - values  # mass of the patches stronger than this one
    keep_sorted = (before < mass).to(flat.dtype)
    return torch.zeros_like(flat).scatter(1, order, keep_sorted).reshape(attention_map.shape)


def attention_map(
    method: str,
    attentions: torch.Tensor,
    gradients: torch.Tensor | None = None,
    *,
    layer: int = -1,
    head: int | None = None,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    start_layer: int = 0,
    mass: float = 0.6,
) -> torch.Tensor:
    """One method by name, with the parameters that method reads; the others are ignored."""
    if method == "raw":
        return raw_attention(attentions, layer, head, head_fusion)
    if method == "last":
        return last_layer_attention(attentions, head, head_fusion)
    if method == "rollout":
        return attention_rollout(attentions, head_fusion, discard_ratio, start_layer)
    if method == "gradient":
        if gradients is None:
            raise ValueError("the gradient method needs the attention gradients")
        return gradient_rollout(attentions, gradients)
    if method == "threshold":
        return keep_mass(last_layer_attention(attentions, head, head_fusion), mass)
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
