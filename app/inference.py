"""The model as the service uses it: loaded once, run only on the batchers' inference threads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from model.attention import attention_gradients
from model.checkpoint import Checkpoint, file_sha256, load_checkpoint
from model.device import resolve_device
from model.vit import count_parameters


@dataclass
class ExplainItem:
    tensor: torch.Tensor  # (C, H, W), preprocessed
    gradient: bool = False  # also compute d(target logit)/d(attention)
    target: int | None = None  # the class to explain; None: the top-1


@dataclass
class AttentionRow:
    probabilities: list[float]
    attentions: torch.Tensor  # (layers, heads, N, N) on the CPU
    gradients: torch.Tensor | None = None  # the same shape, for gradient requests
    target: int | None = None  # the class the gradients explain


class InferenceEngine:
    def __init__(self, checkpoint_path: Path, device: str) -> None:
        self.device = resolve_device(device)
        self.checkpoint: Checkpoint = load_checkpoint(checkpoint_path, self.device)
        self.model.requires_grad_(False)  # serving never needs weight gradients
        self.sha256 = file_sha256(checkpoint_path)

    @property
    def model(self) -> torch.nn.Module:
        return self.checkpoint.model

    @property
    def classes(self) -> list[str]:
        return self.checkpoint.classes

    def _to_device(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        batch = torch.stack(tensors)
        if self.device.type == "cuda":
            return batch.pin_memory().to(self.device, non_blocking=True)
        return batch

    @torch.inference_mode()
    def predict_batch(self, tensors: list[torch.Tensor]) -> list[list[float]]:
        """Preprocessed images -> one list of class probabilities per image."""
        logits = self.model(self._to_device(tensors))
        return logits.float().softmax(dim=-1).cpu().tolist()

    def explain_batch(self, items: list[ExplainItem]) -> list[AttentionRow]:
        """Probabilities and every layer's attention per image, plus gradients where asked for."""
        rows: list[AttentionRow | None] = [None] * len(items)
        plain = [index for index, item in enumerate(items) if not item.gradient]
        gradient = [index for index, item in enumerate(items) if item.gradient]
        if plain:
            for index, row in zip(plain, self._attend([items[i].tensor for i in plain])):
                rows[index] = row
        if gradient:
            for index, row in zip(gradient, self._attend_with_gradients([items[i] for i in gradient])):
                rows[index] = row
        return rows

    @torch.inference_mode()
    def _attend(self, tensors: list[torch.Tensor]) -> list[AttentionRow]:
        logits, attentions = self.model.forward_with_attention(self._to_device(tensors))
        probabilities = logits.float().softmax(dim=-1).cpu().tolist()
        per_image = attentions.float().cpu().transpose(0, 1)  # (B, layers, heads, N, N)
        return [AttentionRow(row, weights) for row, weights in zip(probabilities, per_image)]

    def _attend_with_gradients(self, items: list[ExplainItem]) -> list[AttentionRow]:
        targets = torch.tensor([-1 if item.target is None else item.target for item in items])
        logits, attentions, gradients, targets = attention_gradients(
            self.model, self._to_device([item.tensor for item in items]), targets
        )
        probabilities = logits.float().softmax(dim=-1).cpu().tolist()
        attentions, gradients = attentions.float().cpu().transpose(0, 1), gradients.float().cpu().transpose(0, 1)
        return [
            AttentionRow(row, weights, grads, int(target))
            for row, weights, grads, target in zip(probabilities, attentions, gradients, targets.tolist())
        ]

    def warm_up(self) -> None:
        """One batch through each path, so the first real request does not pay for lazy initialisation."""
        size, channels = self.checkpoint.preprocess.image_size, self.checkpoint.preprocess.channels
        blank = [torch.zeros(channels, size, size)] * 2
        self.predict_batch(blank)
        self.explain_batch([ExplainItem(blank[0]), ExplainItem(blank[1], gradient=True)])

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
