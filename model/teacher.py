"""The teacher that ``vit-train --teacher`` distils into a ViT: a convnet (``vit-train --model densenet-bc-100``)
or one of this project's ViT checkpoints.

A ViT trained from scratch on a small dataset has to learn the locality and the translation equivariance
that a convolution has built in. DeiT (Touvron et al., 2021) passes them on from a convnet teacher: the
student also learns to give the teacher's answer on each augmented image. Its best variant, "hard"
distillation, takes the teacher's top-1 class as a second label; the student stays a plain ViT.

The convnet is torchvision's DenseNet at DenseNet-BC's size for 32 x 32 images (Huang et al., 2017: growth
12, three blocks of 16 bottleneck layers, 0.77 M parameters), whose stem keeps the input's resolution.
Its file stays far below the 16 MiB that a GPU window returns, where a ResNet-18 would be 45 MB.

A ViT checkpoint teaches too: a larger model, too slow to serve on a CPU, passes what it learned on to
a smaller one that is not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model.checkpoint import load_checkpoint, load_weights, write_weights
from model.data import torchvision_module
from model.images import PreprocessConfig
from model.metadata import FORMAT, TEACHER_FORMAT, CheckpointError, decoded, described, read_raw_metadata

VIT_TEACHER = "vit"  # a Teacher's architecture when its file is a ViT checkpoint
TEACHERS = {
    "densenet-bc-100": {"growth_rate": 12, "block_config": (16, 16, 16), "num_init_features": 24},  # 0.77 M
}


def build_teacher(architecture: str, in_channels: int, num_classes: int) -> nn.Module:
    """torchvision's DenseNet with a 3 x 3, stride-1 stem and no max-pool: the ImageNet stem would cut a
    28 x 28 image to 7 x 7 before the first block."""
    models = torchvision_module("models", f"--model {architecture}")
    model = models.DenseNet(**TEACHERS[architecture], num_classes=num_classes)
    width = TEACHERS[architecture]["num_init_features"]
    model.features.conv0 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
    model.features.pool0 = nn.Identity()
    return model


@dataclass
class Teacher:
    model: nn.Module
    architecture: str
    classes: list[str]
    preprocess: PreprocessConfig
    training: dict = field(default_factory=dict)


def save_teacher(
    path: Path | str,
    model: nn.Module,
    architecture: str,
    in_channels: int,
    classes: list[str],
    preprocess: PreprocessConfig,
    training: dict,
) -> None:
    metadata = {"format": TEACHER_FORMAT, "architecture": architecture, "in_channels": json.dumps(in_channels)}
    write_weights(path, model, metadata | described(classes, preprocess, training))


def load_teacher(path: Path | str, device: str | torch.device = "cpu") -> Teacher:
    """Rebuild a teacher from its file, a convnet's or a ViT checkpoint, in eval mode and without gradients."""
    path = Path(path)
    raw = read_raw_metadata(path)
    if raw.get("format") == FORMAT:
        checkpoint = load_checkpoint(path, device)
        model = checkpoint.model.requires_grad_(False)
        return Teacher(model, VIT_TEACHER, checkpoint.classes, checkpoint.preprocess, checkpoint.training)
    if raw.get("format") != TEACHER_FORMAT:
        raise CheckpointError(
            f"{path}: neither a ViT checkpoint nor a teacher that vit-train --model {'|'.join(TEACHERS)} wrote"
        )
    if raw.get("architecture") not in TEACHERS:
        raise CheckpointError(f"{path}: a teacher of unknown architecture {raw.get('architecture')!r}")
    metadata = decoded(path, raw, ("in_channels", "classes", "preprocess", "training"))
    architecture = raw["architecture"]
    model = build_teacher(architecture, metadata["in_channels"], len(metadata["classes"]))
    return Teacher(
        model=load_weights(model, path, device).requires_grad_(False),
        architecture=architecture,
        classes=list(metadata["classes"]),
        preprocess=PreprocessConfig.from_dict(metadata["preprocess"]),
        training=metadata["training"],
    )


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The student's loss against the teacher, on (B, classes) logits of the same images.

    temperature 0: hard distillation, cross-entropy on the teacher's top-1 class (DeiT's better variant).
    Above 0: Hinton et al.'s soft targets, the KL divergence at that temperature, scaled by its square so
    that its gradients keep their size as the temperature changes.
    """
    if temperature == 0:
        return F.cross_entropy(logits, teacher_logits.argmax(1))
    return F.kl_div(
        F.log_softmax(logits / temperature, dim=1),
        F.log_softmax(teacher_logits / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    ) * (temperature**2)
