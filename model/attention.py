"""Attention maps from the weights that ``VisionTransformer.forward_with_attention`` returns.

Pure tensor functions: ``attentions`` is (layers, B, heads, N, N) with the class token at index 0,
and every map is (B, grid, grid) over the patches.
"""

from __future__ import annotations

import math

import torch

HEAD_FUSIONS = ("mean", "max", "min")


def fuse_heads(attention: torch.Tensor, head_fusion: str = "mean") -> torch.Tensor:
    """(B, heads, N, N) -> (B, N, N)."""
    if head_fusion == "mean":
        return attention.mean(dim=1)
    if head_fusion == "max":
        return attention.amax(dim=1)
    if head_fusion == "min":
        return attention.amin(dim=1)
    raise ValueError(f"unknown head fusion {head_fusion!r}; choose one of {', '.join(HEAD_FUSIONS)}")


def patch_grid(class_row: torch.Tensor) -> torch.Tensor:
    """The class token's row without its own entry, (B, N) -> (B, grid, grid)."""
    patches = class_row[:, 1:]
    grid = math.isqrt(patches.shape[-1])
    return patches.reshape(-1, grid, grid)


def last_layer_attention(attentions: torch.Tensor, head_fusion: str = "mean") -> torch.Tensor:
    """How much the class token attends to each patch in the last layer, heads fused."""
    return patch_grid(fuse_heads(attentions[-1], head_fusion)[:, 0])


def attention_rollout(attentions: torch.Tensor, head_fusion: str = "mean", start_layer: int = 0) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020, "Quantifying Attention Flow in Transformers").

    Each layer's fused attention gets the identity added for the residual path, and each row is
    renormalised to sum to 1, before the layers are multiplied: R = A_L ... A_2 A_1.
    """
    tokens = attentions.shape[-1]
    identity = torch.eye(tokens, dtype=attentions.dtype, device=attentions.device)
    rollout = identity.expand(attentions.shape[1], tokens, tokens)  # (B, N, N)
    for layer in attentions[start_layer:]:
        mixed = fuse_heads(layer, head_fusion) + identity
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)  # keepdim: normalise rows, not columns
        rollout = mixed @ rollout
    return patch_grid(rollout[:, 0])


METHODS = {"rollout": attention_rollout, "last": last_layer_attention}
