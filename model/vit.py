"""A Vision Transformer (Dosovitskiy et al., 2020) written from scratch.

The parameter names, shapes and qkv layout match timm's ``VisionTransformer`` so that state dicts
load in both directions with ``strict=True``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

LAYER_NORM_EPS = 1e-6  # timm's value; PyTorch's default 1e-5 would break logit parity


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 28
    patch_size: int = 4
    in_channels: int = 1
    num_classes: int = 10
    dim: int = 128
    depth: int = 6
    num_heads: int = 4
    mlp_ratio: float = 4.0
    drop_path: float = 0.0

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    def to_dict(self) -> dict:
        return asdict(self)

    def timm_kwargs(self) -> dict:
        """The same architecture as keyword arguments of timm's ``VisionTransformer``, whose state dict matches ours."""
        return {
            "img_size": self.image_size,
            "patch_size": self.patch_size,
            "in_chans": self.in_channels,
            "num_classes": self.num_classes,
            "embed_dim": self.dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio,
            "drop_path_rate": self.drop_path,
        }

    @classmethod
    def from_dict(cls, values: dict) -> ViTConfig:
        known = {field: values[field] for field in cls.__dataclass_fields__ if field in values}
        return cls(**known)


class PatchEmbed(nn.Module):
    """Split the image into non-overlapping patches and project each one to `dim`."""

    def __init__(self, patch_size: int, in_channels: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, dim, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, N, dim)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def _queries_keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each (B, heads, N, head_dim), from the whole qkv projection through the module, so that
        quantized or compiled layers apply on every path."""
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)

    def forward(self, x: torch.Tensor, need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, N, C = x.shape
        q, k, v = self._queries_keys_values(x)
        if need_weights:
            weights = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, heads, N, N)
            out = weights @ v
        else:
            weights = None
            out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(B, N, C)  # (B, N, dim)
        return self.proj(out), weights

    def attend_from_class_token(self, x: torch.Tensor) -> torch.Tensor:
        """The output for the class token alone: its query against every token's key and value."""
        B, _, C = x.shape
        q, k, v = self._queries_keys_values(x)
        out = F.scaled_dot_product_attention(q[:, :, :1], k, v)  # (B, heads, 1, head_dim)
        return self.proj(out.transpose(1, 2).reshape(B, 1, C))  # (B, 1, dim)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()  # exact (erf) GELU, as timm
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: drop a sample's whole residual branch (Huang et al., 2016)."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep_prob = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
        return x * mask / keep_prob


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, weights = self.attn(self.norm1(x), need_weights)
        x = x + self.drop_path(attended)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, weights

    def forward_class_token(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output for the class token only, (B, 1, dim); the same numbers as forward(x)[0][:, :1]."""
        class_token = x[:, :1] + self.drop_path(self.attn.attend_from_class_token(self.norm1(x)))
        return class_token + self.drop_path(self.mlp(self.norm2(class_token)))


class VisionTransformer(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config.patch_size, config.in_channels, config.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.grid_size**2 + 1, config.dim))
        # Stochastic depth grows linearly with depth, as in DeiT.
        drop_rates = torch.linspace(0, config.drop_path, config.depth).tolist()
        self.blocks = nn.ModuleList(Block(config.dim, config.num_heads, config.mlp_ratio, rate) for rate in drop_rates)
        self.norm = nn.LayerNorm(config.dim, eps=LAYER_NORM_EPS)
        self.head = nn.Linear(config.dim, config.num_classes)
        self.init_weights()

    def init_weights(self) -> None:
        """timm's default init: truncated normal (std .02) for tokens and linears, zeros for biases."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # Patch embedding as a linear layer over flattened patches (as in JAX ViT / timm).
        weight = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)

    def position_embedding(self, grid_height: int, grid_width: int) -> torch.Tensor:
        """The learned position embedding, resampled when the patch grid differs from training."""
        if (grid_height, grid_width) == (self.config.grid_size, self.config.grid_size):
            return self.pos_embed
        return resample_position_embedding(self.pos_embed, grid_height, grid_width)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        patch_size = self.config.patch_size
        grid_height, grid_width = images.shape[-2] // patch_size, images.shape[-1] // patch_size
        x = self.patch_embed(images)  # (B, N, dim)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + N, dim)
        return x + self.position_embedding(grid_height, grid_width)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed(images)
        for block in self.blocks:
            x, _ = block(x)
        return self.norm(x)  # (B, 1 + N, dim)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features[:, 0])  # class token -> (B, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits. The head reads only the class token, so the last block computes only that token's output:
        its attention has one query instead of 1 + N, and its projection and MLP one row each."""
        x = self.embed(images)
        for block in self.blocks[:-1]:
            x, _ = block(x)
        return self.forward_head(self.norm(self.blocks[-1].forward_class_token(x)))

    def forward_with_attention_layers(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits and a list of each layer's attention weights (B, heads, N, N), as autograd sees them."""
        x = self.embed(images)
        layer_weights = []
        for block in self.blocks:
            x, weights = block(x, need_weights=True)
            layer_weights.append(weights)
        return self.forward_head(self.norm(x)), layer_weights

    def forward_with_attention(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and every layer's attention weights, shaped (layers, B, heads, N, N), in one pass."""
        logits, layer_weights = self.forward_with_attention_layers(images)
        return logits, torch.stack(layer_weights)


def resample_position_embedding(pos_embed: torch.Tensor, grid_height: int, grid_width: int) -> torch.Tensor:
    """A square grid's position embedding (1, 1 + g*g, dim) for another grid, (1, 1 + h*w, dim): the class
    token's as it is, the patches' resized as timm's resample_abs_pos_embed does (bicubic with antialiasing,
    in float32), so that a model and its timm twin agree at every input size and load each other's
    fine-tuned weights. Without antialiasing the kernel differs, and so did the logits (by 2e-3)."""
    grid = math.isqrt(pos_embed.shape[1] - 1)
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    patch_pos = patch_pos.float().reshape(1, grid, grid, -1).permute(0, 3, 1, 2)  # (1, dim, g, g)
    patch_pos = F.interpolate(patch_pos, size=(grid_height, grid_width), mode="bicubic", antialias=True)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_height * grid_width, -1).to(pos_embed.dtype)
    return torch.cat([cls_pos, patch_pos], dim=1)  # (1, 1 + h*w, dim)


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Parameters that weight decay would only hurt: tokens, position embedding, norms and biases."""
    return {
        name
        for name, parameter in model.named_parameters()
        if parameter.ndim <= 1 or name in ("cls_token", "pos_embed")
    }
