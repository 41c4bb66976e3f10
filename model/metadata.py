"""What a checkpoint file says about itself, read without torch and without its weights.

A server process that never runs the model (a front end of the model process) checks its checkpoint
at start with these alone; model/checkpoint.py saves and loads the weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from collections.abc import Sequence
from pathlib import Path

from safetensors import SafetensorError, safe_open

from model.images import PreprocessConfig
from model.paths import access_problem

FORMAT = "vit-serving/1"
TEACHER_FORMAT = "vit-serving-teacher/1"  # model/teacher.py's, refused by read_metadata by name
CHECKPOINT_NAME = "model.safetensors"  # what vit-train writes in its --out-dir


class CheckpointError(Exception):
    """A checkpoint that is missing, damaged or not one of ours. The message names the path."""


def described(classes: list[str], preprocess: PreprocessConfig, training: dict) -> dict[str, str]:
    """The metadata that every model file of ours holds, whatever the architecture, as JSON strings."""
    return {
        "classes": json.dumps([composed(name) for name in classes]),
        "preprocess": json.dumps(preprocess.to_dict()),
        "training": json.dumps(training),
    }


def read_raw_metadata(path: Path | str) -> dict[str, str]:
    """A .safetensors file's metadata as stored, without reading the weights."""
    path = Path(path)
    if problem := access_problem(path):
        raise CheckpointError(f"{path}: {problem}")
    if not_utf8(path):
        raise CheckpointError(
            f"{escaped(path)}: a path in bytes that are not UTF-8, which safetensors cannot load, and whose name "
            "no answer could carry; rename it"
        )
    if path.is_dir():  # a run's folder, say, for the model.safetensors that vit-train wrote in it
        inside = sorted(child.name for child in path.glob("*.safetensors"))
        hint = f"; the checkpoints in it: {some_of(inside)}" if inside else ", and it holds no .safetensors file"
        raise CheckpointError(f"{path}: a folder, not a checkpoint file{hint}")
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if not path.is_file():  # a device (/dev/null), a pipe or a socket: safetensors cannot map it
        raise CheckpointError(f"{path}: not a regular file, so not a checkpoint")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            return handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        if what := other_format(path):
            raise CheckpointError(f"{path}: {what}") from error
        raise CheckpointError(f"{path}: not a readable .safetensors file (truncated or corrupt?): {error}") from error


def other_format(path: Path) -> str | None:
    """What a file that safetensors cannot read is, by its name, or None: the files that users give as a
    checkpoint by mistake were all told "truncated or corrupt?" and the header's byte count."""
    if path.name.startswith("state") and path.suffix == ".pt":
        checkpoint = path.parent / CHECKPOINT_NAME
        return f"vit-train's resumable state, not a checkpoint; the run's checkpoint is {checkpoint}"
    if path.suffix.lower() == ".onnx":
        return "an ONNX graph (vit-export writes them, for runtimes without PyTorch), not a .safetensors checkpoint"
    if path.suffix.lower() in (".pth", ".pt", ".bin", ".ckpt"):
        return (
            "a PyTorch file, not a .safetensors checkpoint; vit-import makes one of a timm or torchvision ViT's weights"
        )
    return None


def decoded(path: Path | str, raw: dict[str, str], keys: tuple[str, ...]) -> dict:
    """The metadata's values for keys, decoded from JSON; class names composed, whenever they were written."""
    try:
        facts = {key: json.loads(raw[key]) for key in keys}
    except (KeyError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: metadata is incomplete or not JSON: {error}") from error
    if isinstance(classes := facts.get("classes"), list):
        facts["classes"] = [composed(name) if isinstance(name, str) else name for name in classes]
    return facts


def read_metadata(path: Path | str) -> dict:
    """The checkpoint's metadata, decoded from JSON, without reading the weights."""
    raw = read_raw_metadata(path)
    if raw.get("format") == TEACHER_FORMAT:
        raise CheckpointError(
            f"{path}: a {raw.get('architecture', 'CNN')} teacher for vit-train --teacher, not a ViT checkpoint"
        )
    if raw.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: a .safetensors file, but not a ViT checkpoint of format {FORMAT!r} (a timm or torchvision "
            "ViT's weights? vit-import makes a checkpoint of them)"
        )
    metadata = decoded(path, raw, ("config", "classes", "preprocess", "training"))
    check_description(path, metadata)
    return metadata


def check_description(path: Path | str, metadata: dict) -> None:
    """Refuse metadata that would load and then serve wrongly: class names that are not a list of names
    one per output of the head, or preprocessing that does not fit the model's input or would make it
    infinite. Such a file used to be served, its labels paired with the wrong probabilities."""
    classes, config = metadata["classes"], metadata["config"]
    if not (isinstance(classes, list) and classes and all(isinstance(name, str) for name in classes)):
        raise CheckpointError(f"{path}: classes must be a list of names, not {json.dumps(classes)[:80]}")
    if problem := class_names_problem(classes):
        raise CheckpointError(f"{path}: {problem}")
    try:
        preprocess = PreprocessConfig.from_dict(metadata["preprocess"])
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: preprocess {json.dumps(metadata['preprocess'])[:200]}: {error}") from error
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: config must be an object, not {json.dumps(config)[:80]}")
    if config.get("num_classes", len(classes)) != len(classes):
        raise CheckpointError(f"{path}: {len(classes)} class names for a head of {config.get('num_classes')} outputs")
    if config.get("in_channels", preprocess.channels) != preprocess.channels:
        raise CheckpointError(
            f"{path}: preprocess gives {preprocess.channels} channels, the model takes {config['in_channels']}"
        )


def some_of(names: Sequence[str], shown: int = 10) -> str:
    """Names for a message, comma-separated, the first `shown` of them: an ImageNet head has 1,000 classes,
    and a message that listed them all, twice, ran to 30 KB."""
    listed = ", ".join(names[:shown])
    return listed + (f" and {len(names) - shown} more" if len(names) > shown else "")


def not_utf8(name: str | Path) -> bool:
    """Whether a name from the file system is in bytes that are not UTF-8 (a zip made on Windows names files in
    cp1252). Python keeps those bytes as lone surrogates, which no JSON answer or strict terminal can carry."""
    try:
        str(name).encode()
    except UnicodeEncodeError:
        return True
    return False


def composed(name: str) -> str:
    """A name in Unicode's composed form (NFC), the one keyboards type: macOS names files decomposed, so a class
    folder unzipped from a Mac is "Cafe" and a combining accent, which looks like "Café" and compares unequal to
    it (a /attention target, a folder of the same class made elsewhere)."""
    return unicodedata.normalize("NFC", name)


def columns(text: str) -> int:
    """How many columns of a terminal `text` takes: an East Asian wide character (a class named 猫) two, and a
    combining mark none, as wcwidth counts them."""
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def padded(text: str, width: int) -> str:
    """`text` left-aligned in `width` columns of a terminal: str.ljust counts characters, and a table of names
    in Chinese or Japanese came out of line."""
    return text + " " * (width - columns(text))


def escaped(name: str | Path) -> str:
    """A name as `ls -b` shows it, bytes that are not UTF-8 as escapes: caf\\xe9."""
    return os.fsencode(name).decode(errors="backslashreplace")


def counted(count: int, noun: str) -> str:
    """'1 image', '2 images': a count and its noun, for a message."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def class_names_problem(classes: list[str]) -> str | None:
    """What makes class names unfit to label answers: a blank one, or one given to two outputs."""
    if blank := [index for index, name in enumerate(classes) if not name.strip()]:
        return f"class {blank[0]} has a blank name; each output needs one"
    names = [composed(name) for name in classes]  # two that differ only in their form look the same
    if twice := sorted({name for name in names if names.count(name) > 1}):
        return f"class names given to more than one output: {', '.join(json.dumps(name) for name in twice[:5])}"
    return None


def file_sha256(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
