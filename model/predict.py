"""Classify local image files with a checkpoint, no server needed: ``vit-predict shirt.png boot.jpg``.

A folder stands for the image files in it and its subfolders, in name order. Images go through the
same decoding and preprocessing as uploads to the server. Prints JSON in the shape of the server's
/predict answer, or a table.
"""

from __future__ import annotations

import argparse
import io
import json
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from model import DEFAULT_CHECKPOINT
from model.arguments import POSITIVE, HelpFormatter, device_name, interrupted_says, nonempty_path, print_to_reader
from model.checkpoint import Checkpoint, load_checkpoint
from model.data import IMAGE_SUFFIXES, decode_files, image_files, unread_pictures
from model.device import resolve_device
from model.files import WriteError
from model.images import own_files_pixel_limit
from model.metadata import CheckpointError, columns, padded
from model.preprocess import STANDARD_INPUT, normalize
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
def classified(paths: list[Path], checkpoint: Checkpoint, top_k: int) -> Iterator[tuple[list[dict], list[str]]]:
    """Each CHUNK of files as it is classified: the /predict answer's results for its readable files, in file
    order, and an error line for each unreadable one."""
    device = next(checkpoint.model.parameters()).device
    for start in range(0, len(paths), CHUNK):
        chunk = paths[start : start + CHUNK]
        pixels, unreadable = decode_files(chunk, checkpoint.preprocess, "decode")
        read = [index for index in range(len(chunk)) if index not in unreadable]
        results = []
        if read:
            probabilities = checkpoint.model(normalize(pixels[read].to(device), checkpoint.preprocess)).softmax(-1)
            ranked = ranked_classes(probabilities.cpu().tolist(), checkpoint.classes, top_k)
            results = [
                {"filename": str(chunk[index]), "predictions": predictions}
                for index, predictions in zip(read, ranked, strict=True)
            ]
        yield results, list(unreadable.values())


def classify(paths: list[Path], checkpoint_path: Path, top_k: int | None, device: str) -> tuple[dict, list[str]]:
    """The /predict-shaped answer for the readable files, and one error line per unreadable one."""
    checkpoint = load_checkpoint(checkpoint_path, resolve_device(device))
    results, errors = [], []
    for chunk_results, chunk_errors in classified(paths, checkpoint, classes_wanted(top_k, checkpoint)):
        results += chunk_results
        errors += chunk_errors
    return {"model": checkpoint.name, "results": results}, errors


def classes_wanted(top_k: int | None, checkpoint: Checkpoint) -> int:
    """--top-k, or its default, and at most the model's classes."""
    return default_top_k(len(checkpoint.classes)) if top_k is None else min(top_k, len(checkpoint.classes))


def table(results: list[dict], width: int) -> str:
    lines = []
    for result in results:
        ranked = ", ".join(f"{p['label']} {100 * p['probability']:.1f} %" for p in result["predictions"])
        lines.append(f"{padded(result['filename'], width)}  {ranked}")
    return "\n".join(lines)


@interrupted_says("vit-predict", "nothing classified")  # while it walks the folders or loads the model
@own_files_pixel_limit()
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if isinstance(sys.stdout, io.TextIOWrapper) and sys.stdout.errors == "strict":
        # A file named in bytes that are not UTF-8 (a zip made on Windows) is printed in those bytes, as `find`
        # prints it, and as Python prints it in a C locale or its UTF-8 mode; elsewhere it was a traceback.
        sys.stdout.reconfigure(errors="surrogateescape")
    if args.images.count(STANDARD_INPUT) > 1:
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
        checkpoint = load_checkpoint(args.checkpoint, resolve_device(args.device))
    except CheckpointError as error:
        raise SystemExit(f"vit-predict: {error}") from None
    status, errors = answered(paths, checkpoint, args)
    for error in unlisted + errors:
        print(f"vit-predict: {error}", file=sys.stderr)
    return status or (1 if unlisted + errors else 0)


def answered(paths: list[Path], checkpoint: Checkpoint, args: argparse.Namespace) -> tuple[int, list[str]]:
    """Classify `paths` and print the answers; the exit status that the printing calls for (0 where it went as
    it should), and a line for each file that has no answer, then for what stopped the printing, if anything.

    The table is printed a chunk at a time, as it is classified, in columns as wide as the longest name:
    `vit-predict photos/ | head` stops when head has its lines (status 1, as for any reader that stops early),
    where it used to classify every photo first. Ctrl-C keeps the lines printed and ends with one line that
    says how far it got, and status 130, not a traceback. JSON is one document, printed whole at the end."""
    width, results, errors, done = max((columns(str(path)) for path in paths), default=0), [], [], 0
    try:
        for chunk_results, chunk_errors in classified(paths, checkpoint, classes_wanted(args.top_k, checkpoint)):
            errors += chunk_errors
            done += len(chunk_results) + len(chunk_errors)
            if args.format == "json":
                results += chunk_results
            elif chunk_results and not print_to_reader(table(chunk_results, width)):
                return 1, errors  # the reader has all it wanted
        answer = {"model": checkpoint.name, "results": results}
        if args.format == "json" and results and not print_to_reader(json.dumps(answer, indent=2)):
            return 1, errors
    except WriteError as error:  # the answers are lost: said last, after the files that have none
        return 1, [*errors, str(error)]
    except KeyboardInterrupt:
        return 128 + signal.SIGINT, [*errors, f"interrupted, {done} of {len(paths)} files done"]
    return 0, errors


if __name__ == "__main__":
    sys.exit(main())
