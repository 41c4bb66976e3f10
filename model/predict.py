"""Classify local image files with a checkpoint, no server needed: ``vit-predict shirt.png boot.jpg``.

A folder stands for the image files in it and its subfolders, in name order. Images go through the
same decoding and preprocessing as uploads to the server. Prints JSON in the shape of the server's
/predict answer, or a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from model import DEFAULT_CHECKPOINT
from model.arguments import POSITIVE, HelpFormatter, device_name, nonempty_path, print_to_reader
from model.checkpoint import load_checkpoint
from model.data import IMAGE_SUFFIXES, decode_files, image_files, unread_pictures
from model.device import resolve_device
from model.files import WriteError
from model.images import own_files_pixel_limit
from model.metadata import CheckpointError
from model.preprocess import normalize
from model.ranking import DEFAULT_TOP_K, default_top_k, ranked_classes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument(
        "images",
        nargs="+",
        type=nonempty_path,
        help="image files (PNG, JPEG, ...), folders (the image files in them), or - for the standard input",
    )
    parser.add_argument(
        "--checkpoint", type=nonempty_path, default=DEFAULT_CHECKPOINT, help="the .safetensors checkpoint"
    )
    parser.add_argument(
        "--top-k", type=POSITIVE, help=f"classes per image (default: {DEFAULT_TOP_K}, or all of a smaller model's)"
    )
    parser.add_argument("--format", choices=("table", "json"), default="table", help="how to print the answers")
    parser.add_argument(
        "--device", type=device_name, default="auto", help="auto (cuda if available), cpu, cuda, cuda:N"
    )
    return parser


CHUNK = 64  # files read and classified at a time: memory stays that of a batch, however many files are given


@torch.inference_mode()
def classify(paths: list[Path], checkpoint_path: Path, top_k: int | None, device: str) -> tuple[dict, list[str]]:
    """The /predict-shaped answer for the readable files, and one error line per unreadable one."""
    checkpoint = load_checkpoint(checkpoint_path, resolve_device(device))
    top_k = default_top_k(len(checkpoint.classes)) if top_k is None else min(top_k, len(checkpoint.classes))
    results, errors = [], []
    for start in range(0, len(paths), CHUNK):
        chunk = paths[start : start + CHUNK]
        pixels, unreadable = decode_files(chunk, checkpoint.preprocess, "decode")
        errors += unreadable.values()
        read = [index for index in range(len(chunk)) if index not in unreadable]
        if not read:
            continue
        readable = [chunk[index] for index in read]
        inputs = normalize(pixels[read].to(next(checkpoint.model.parameters()).device), checkpoint.preprocess)
        probabilities = checkpoint.model(inputs).softmax(dim=-1).cpu()
        ranked = ranked_classes(probabilities.tolist(), checkpoint.classes, top_k)
        results += [
            {"filename": str(path), "predictions": predictions}
            for path, predictions in zip(readable, ranked, strict=True)
        ]
    return {"model": checkpoint.name, "results": results}, errors


def table(answer: dict) -> str:
    width = max(len(result["filename"]) for result in answer["results"])
    lines = []
    for result in answer["results"]:
        ranked = ", ".join(f"{p['label']} {100 * p['probability']:.1f} %" for p in result["predictions"])
        lines.append(f"{result['filename']:<{width}}  {ranked}")
    return "\n".join(lines)


@own_files_pixel_limit()
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.images.count(Path("-")) > 1:
        raise SystemExit("vit-predict: - (the standard input) is given more than once; it holds one image")
    unlisted: list[str] = []  # folders this user may not list: named, as unreadable files are, and the rest classified
    paths = [
        file
        for path in args.images
        for file in (image_files(path, unlisted=unlisted.append) if path.is_dir() else [path])
    ]
    for note in filter(None, (unread_pictures(path) for path in args.images)):
        print(f"vit-predict: note: {note}", file=sys.stderr)
    if not paths and not unlisted:
        raise SystemExit(
            f"vit-predict: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {', '.join(map(str, args.images))}"
        )
    try:
        answer, errors = classify(paths, args.checkpoint, args.top_k, args.device)
    except CheckpointError as error:
        raise SystemExit(f"vit-predict: {error}") from None
    errors = unlisted + errors
    status = 1 if errors else 0
    try:
        if answer["results"] and not print_to_reader(
            json.dumps(answer, indent=2) if args.format == "json" else table(answer)
        ):
            status = 1  # `vit-predict photos/ | head`: the reader has all it wanted
    except WriteError as error:  # the answers are lost: said last, after the files that have none
        errors, status = [*errors, str(error)], 1
    for error in errors:
        print(f"vit-predict: {error}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
