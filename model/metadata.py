"""What a checkpoint file says about itself, read without torch and without its weights.

A server process that never runs the model (a front end of the model process) checks its checkpoint
at start with these alone; model/checkpoint.py saves and loads the weights.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from safetensors import SafetensorError, safe_open

from model.images import PreprocessConfig

FORMAT = "vit-serving/1"
TEACHER_FORMAT = "vit-serving-teacher/1"  # model/teacher.py's, refused by read_metadata by name


class CheckpointError(Exception):
    """A checkpoint that is missing, damaged or not one of ours. The message names the path."""


def described(classes: list[str], preprocess: PreprocessConfig, training: dict) -> dict[str, str]:
    """The metadata that every model file of ours holds, whatever the architecture, as JSON strings."""
    return {
        "classes": json.dumps(classes),
        "preprocess": json.dumps(preprocess.to_dict()),
        "training": json.dumps(training),
    }


def read_raw_metadata(path: Path | str) -> dict[str, str]:
    """A .safetensors file's metadata as stored, without reading the weights."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="numpy") as handle:
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


def file_sha256(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
