"""One .safetensors file per model: the weights, plus JSON metadata that is enough to rebuild it
(model/metadata.py reads that without torch).

safetensors holds raw tensors and a JSON header, so loading a checkpoint never runs pickle and
cannot execute code hidden in the file.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from model.files import written
from model.images import PreprocessConfig
from model.metadata import FORMAT, CheckpointError, composed, described, read_metadata
from model.vit import VisionTransformer, ViTConfig


@dataclass
class Checkpoint:
    model: VisionTransformer
    classes: list[str]
    preprocess: PreprocessConfig
    training: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def name(self) -> str:
        """vit-train --name, else the file's name, composed as its classes are (a file named on a Mac is not)."""
        return composed(self.training.get("name") or (self.path.stem if self.path else "vit"))


def save_checkpoint(
    path: Path | str, model: VisionTransformer, classes: list[str], preprocess: PreprocessConfig, training: dict
) -> None:
    metadata = {"format": FORMAT, "config": json.dumps(model.config.to_dict())}
    write_weights(path, model, metadata | described(classes, preprocess, training))


def write_weights(path: Path | str, model: nn.Module, metadata: dict[str, str]) -> None:
    """The model's weights and `metadata` as one .safetensors file, replaced atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    with written(path) as temporary:  # a crash or a full disk never leaves a half-written checkpoint
        try:
            save_file(tensors, str(temporary), metadata=metadata)
        except SafetensorError as error:
            # The OSError it was (ENOSPC, EACCES, ...), for WriteError's reason: safetensors gives the number only
            # in its text, "I/O error: No space left on device (os error 28)", and in 0.4.0, the floor, as
            # "IoError(Os { code: 28, kind: StorageFull, ... })".
            if (found := re.search(r"(?:os error|Os \{ code:) (\d+)", str(error))) is None:
                raise
            number = int(found[1])
            raise OSError(number, os.strerror(number)) from error
        # safetensors writes 0600; a server running as another user (the image's uid 10001) must read it.
        temporary.chmod(0o644)


def load_checkpoint(path: Path | str, device: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the model from the file alone: its config and weights, in eval mode."""
    path = Path(path)
    metadata = read_metadata(path)
    try:
        model = VisionTransformer(ViTConfig.from_dict(metadata["config"]))
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: config {json.dumps(metadata['config'])[:200]}: {error}") from error
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
        reason = " ".join(str(error).split())  # torch's spans lines, one per kind of mismatch
        raise CheckpointError(f"{path}: weights do not match the stored config: {reason}") from error
    return model.to(device).eval()
