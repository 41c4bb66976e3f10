"""The model as the service uses it: loaded once, run only on the batchers' inference threads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from model.checkpoint import Checkpoint, file_sha256, load_checkpoint
from model.device import resolve_device
from model.vit import count_parameters


@dataclass
class AttentionRow:
    probabilities: list[float]
    attentions: torch.Tensor  # (layers, heads, N, N) on the CPU


class InferenceEngine:
    def __init__(self, checkpoint_path: Path, device: str) -> None:
        self.device = resolve_device(device)
        self.checkpoint: Checkpoint = load_checkpoint(checkpoint_path, self.device)
        self.sha256 = file_sha256(checkpoint_path)

    @property
    def model(self) -> torch.nn.Module:
        return self.checkpoint.model

    @property
    def classes(self) -> list[str]:
        return self.checkpoint.classes

    def _to_device(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return inputs.pin_memory().to(self.device, non_blocking=True)
        return inputs

    @torch.inference_mode()
    def predict_batch(self, inputs: torch.Tensor) -> list[list[float]]:
        """(B, C, H, W) -> one list of class probabilities per image."""
        logits = self.model(self._to_device(inputs))
        return logits.float().softmax(dim=-1).cpu().tolist()

    @torch.inference_mode()
    def attention_batch(self, inputs: torch.Tensor) -> list[AttentionRow]:
        """Probabilities plus every layer's attention weights, one row per image."""
        logits, attentions = self.model.forward_with_attention(self._to_device(inputs))
        probabilities = logits.float().softmax(dim=-1).cpu().tolist()
        per_image = attentions.float().cpu().transpose(0, 1)  # (B, layers, heads, N, N)
        return [AttentionRow(row, weights) for row, weights in zip(probabilities, per_image)]

    def warm_up(self) -> None:
        """One batch through each path, so the first real request does not pay for lazy initialisation."""
        size, channels = self.checkpoint.preprocess.image_size, self.checkpoint.preprocess.channels
        blank = torch.zeros(2, channels, size, size)
        self.predict_batch(blank)
        self.attention_batch(blank)

    def describe(self) -> dict:
        return {
            "name": self.checkpoint.name,
            "classes": self.classes,
            "config": self.model.config.to_dict(),
            "parameters": count_parameters(self.model),
            "device": str(self.device),
            "preprocess": self.checkpoint.preprocess.to_dict(),
            "training": self.checkpoint.training,
            "checkpoint_sha256": self.sha256,
        }
