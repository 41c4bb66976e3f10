"""One .safetensors file per model: the weights, plus JSON metadata that is enough to rebuild it.

safetensors holds raw tensors and a JSON header, so loading a checkpoint never runs pickle and
cannot execute code hidden in the file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from model.images import PreprocessConfig
from model.vit import VisionTransformer, ViTConfig

FORMAT = "vit-serving/1"
TEACHER_FORMAT = "vit-serving-teacher/1"  # model/teacher.py's, refused here by name


class CheckpointError(Exception):
    """A checkpoint that is missing, damaged or not one of ours. The message names the path."""


@dataclass
class Checkpoint:
    model: VisionTransformer
    classes: list[str]
    preprocess: PreprocessConfig
    training: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def name(self) -> str:
        """vit-train --name, else the file's name."""
        return self.training.get("name") or (self.path.stem if self.path else "vit")


def save_checkpoint(
    path: Path | str, model: VisionTransformer, classes: list[str], preprocess: PreprocessConfig, training: dict
) -> None:
    metadata = {"format": FORMAT, "config": json.dumps(model.config.to_dict())}
    write_weights(path, model, metadata | described(classes, preprocess, training))


def described(classes: list[str], preprocess: PreprocessConfig, training: dict) -> dict[str, str]:
    """The metadata that every model file of ours holds, whatever the architecture, as JSON strings."""
    return {
        "classes": json.dumps(classes),
        "preprocess": json.dumps(preprocess.to_dict()),
        "training": json.dumps(training),
    }


def write_weights(path: Path | str, model: nn.Module, metadata: dict[str, str]) -> None:
    """The model's weights and `metadata` as one .safetensors file, replaced atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    temporary = path.with_name(path.name + ".tmp")
    save_file(tensors, str(temporary), metadata=metadata)
    # safetensors writes 0600; a server running as another user (the image's uid 10001) must read it.
    temporary.chmod(0o644)
    temporary.replace(path)  # atomic, so a crash never leaves a half-written checkpoint


def read_raw_metadata(path: Path | str) -> dict[str, str]:
    """A .safetensors file's metadata as stored, without reading the weights."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable .safetensors file (truncated or corrupt?): {error}") from error


def decoded(path: Path | str, raw: dict[str, str], keys: tuple[str, ...]) -> dict:
    try:
        return {key: json.loads(raw[key]) for key in keys}
    except (KeyError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: metadata is incomplete or not JSON: {error}") from error


def read_metadata(path: Path | str) -> dict:
    """The checkpoint's metadata, decoded from JSON, without reading the weights."""
    raw = read_raw_metadata(path)
    if raw.get("format") == TEACHER_FORMAT:
        raise CheckpointError(
            f"{path}: a {raw.get('architecture', 'CNN')} teacher for vit-train --teacher, not a ViT checkpoint"
        )
    if raw.get("format") != FORMAT:
        raise CheckpointError(f"{path}: a .safetensors file, but not a ViT checkpoint of format {FORMAT!r}")
    return decoded(path, raw, ("config", "classes", "preprocess", "training"))


def load_checkpoint(path: Path | str, device: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the model from the file alone: its config and weights, in eval mode."""
    path = Path(path)
    metadata = read_metadata(path)
    model = VisionTransformer(ViTConfig.from_dict(metadata["config"]))
    return Checkpoint(
        model=load_weights(model, path, device),
        classes=list(metadata["classes"]),
        preprocess=PreprocessConfig.from_dict(metadata["preprocess"]),
        training=metadata["training"],
        path=path,
    )


def load_weights(model: nn.Module, path: Path, device: str | torch.device) -> nn.Module:
    """The file's weights into `model`, which the stored metadata built, on `device` and in eval mode."""
    try:
        model.load_state_dict(load_file(str(path), device=str(device)))
    except (SafetensorError, RuntimeError) as error:
        raise CheckpointError(f"{path}: weights do not match the stored config: {error}") from error
    return model.to(device).eval()


def file_sha256(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
