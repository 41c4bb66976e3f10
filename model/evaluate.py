"""Score a checkpoint on a test set: ``python -m model.evaluate --checkpoint runs/fmnist/model.safetensors``.

Prints overall and per-class accuracy and writes a confusion-matrix PNG beside the checkpoint. The test
set is the one the checkpoint was trained on unless --dataset says otherwise. Every image goes through
``model/preprocess.py``, the path that uploads to the server take. With --timm, timm's
``VisionTransformer`` loaded with the same weights scores the same inputs too.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model.arguments import (
    HelpFormatter,
    device_name,
    interrupted_says,
    make_folder_for,
    nonempty_path,
    print_to_reader,
)
from model.checkpoint import load_checkpoint
from model.data import BUILT_IN_CLASSES, DATASETS, ImageDataset, MissingExtra, load_dataset, split_folder
from model.decoded_cache import DECODED_FOLDER, DecodedCache
from model.device import autocast, resolve_device
from model.files import WriteError, written
from model.images import PreprocessConfig, own_files_pixel_limit, pixels_to_image
from model.metadata import CheckpointError, columns, counted, padded, some_of
from model.plots import plot_confusion_matrix
from model.preprocess import normalize, preprocess_image
from model.vit import VisionTransformer

EVALUATED_VALUES = 1 << 25  # input values (channels x height x width, all images) run through a model at once


def batch_size_for(inputs: torch.Tensor, most: int) -> int:
    """Images of `inputs` (N, C, H, W) to run at once: `most`, or fewer where they are large. A model's
    activations grow with its input, and 1,000 RGB images at 224 pixels were 600 MB of floats before the
    first layer and gigabytes inside a ViT-B, where 1,000 of Fashion-MNIST's are 3 MB."""
    return max(1, min(most, EVALUATED_VALUES // max(1, inputs[0].numel())))


@torch.inference_mode()
def evaluate(
    model: nn.Module, dataset: ImageDataset, preprocess: PreprocessConfig, device: torch.device, most: int = 1000
) -> tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy (a fraction) of images already at the model's size (training)."""
    model.eval()
    batch_size = batch_size_for(dataset.images, most)
    total_loss, correct = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        images = normalize(dataset.images[start : start + batch_size].to(device), preprocess)
        labels = dataset.labels[start : start + batch_size].to(device)
        with autocast(device):
            logits = model(images).float()
        total_loss += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
    return total_loss / len(dataset), correct / len(dataset)


def preprocess_dataset(
    dataset: ImageDataset, preprocess: PreprocessConfig, start: int = 0, stop: int | None = None
) -> torch.Tensor:
    """Images start:stop (all by default) through the serving preprocessing: (N, C, H, W) float.

    Images already at the model's shape came through it as they were read (an image folder is decoded as
    uploads are), or are a built-in dataset's at its own size, which it leaves as they are: they are only
    normalised. Run again, a centre crop cut the centre of the centre."""
    images = dataset.images[start:stop]
    if images.shape[1:] == preprocess.image_shape:
        return normalize(images, preprocess)
    inputs = torch.empty((len(images), *preprocess.image_shape))  # filled in place: no second copy
    for index, pixels in enumerate(images):
        inputs[index] = preprocess_image(pixels_to_image(pixels), preprocess)
    return inputs


@torch.inference_mode()
def predict(
    forward: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, device: torch.device, most: int = 500
) -> torch.Tensor:
    """Top-1 class indices from a model in eval mode, or from the server's forward function with its options."""
    batches = inputs.split(batch_size_for(inputs, most))
    return torch.cat([forward(batch.to(device)).argmax(1).cpu() for batch in batches])


SCORED_AT_ONCE = 1000  # images preprocessed and scored at a time by vit-evaluate


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(true, predicted) counts."""
    return torch.bincount(labels * num_classes + predictions, minlength=num_classes**2).reshape(
        num_classes, num_classes
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("--checkpoint", type=nonempty_path, required=True, help="the .safetensors checkpoint to score")
    parser.add_argument(
        "--dataset",
        choices=DATASETS,
        help="the test set (default: the dataset the checkpoint was trained on; for an imported one, the built-in "
        "dataset of its classes)",
    )
    parser.add_argument(
        "--data-dir",
        type=nonempty_path,
        help="the dataset's folder (default: the one recorded at training, else its default)",
    )
    parser.add_argument(
        "--device", type=device_name, default="auto", help="auto (cuda if available), cpu, cuda, cuda:N"
    )
    parser.add_argument(
        "--confusion-matrix",
        type=nonempty_path,
        help="the PNG to write (default: CHECKPOINT_STEM-confusion.png beside it)",
    )
    parser.add_argument(
        "--timm", action="store_true", help="also score timm's VisionTransformer with the same weights (needs timm)"
    )
    return parser


def timm_copy(model: VisionTransformer) -> nn.Module:
    """timm's VisionTransformer of the same architecture and mode, loaded with `model`'s weights: the names match."""
    try:
        from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer
    except ImportError:
        raise ValueError("--timm needs timm: pip install timm") from None
    theirs = TimmVisionTransformer(**model.config.timm_kwargs())
    theirs.load_state_dict(model.state_dict(), strict=True)
    return theirs.to(next(model.parameters()).device).train(model.training)


def built_in_dataset_of(path: Path, classes: list[str]) -> str:
    """The test set of a checkpoint that records none (vit-import's): the built-in dataset with its classes.
    Fashion-MNIST was taken for any, and an ImageNet model was told that Fashion-MNIST has other classes."""
    for name, theirs in BUILT_IN_CLASSES.items():
        if sorted(theirs) == sorted(classes):
            return name
    raise ValueError(
        f"{path} records no dataset that it was trained on, as vit-import's checkpoints do not, and its classes "
        f"({some_of(classes)}) are not a built-in dataset's; give --dataset imagefolder and a --data-dir with a "
        "folder of images for each class"
    )


def score(args: argparse.Namespace) -> tuple[float, list[str]]:
    """Write the confusion matrix; return the accuracy in % and the report: the accuracy overall and per class."""
    figure_path = args.confusion_matrix or args.checkpoint.with_name(f"{args.checkpoint.stem}-confusion.png")
    device = resolve_device(args.device)
    checkpoint = load_checkpoint(args.checkpoint, device)
    make_folder_for(figure_path, "--confusion-matrix", reads=args.checkpoint)  # before scoring (minutes), not after
    timm_model = timm_copy(checkpoint.model) if args.timm else None  # without timm, fail before scoring
    recorded = checkpoint.training.get("dataset")
    dataset_name = args.dataset or recorded or built_in_dataset_of(args.checkpoint, checkpoint.classes)
    recipe = checkpoint.training.get("recipe", {})
    recorded_dir = recipe.get("data_dir") if dataset_name == recorded else None
    data_dir = args.data_dir or (Path(recorded_dir) if recorded_dir else None)
    if data_dir is not None and args.data_dir is None and not data_dir.is_dir():
        raise ValueError(f"{data_dir}, the data's folder at training, is not there; --data-dir names where it is now")
    # A plain image folder that the checkpoint was trained on is scored on the share held out at training. Any
    # other is a test set of its own, scored whole: an imported model was scored on a fifth of it.
    held_out = recipe.get("val_fraction", 0.2) if dataset_name == recorded == "imagefolder" else None
    seed = recipe.get("seed", 0)
    kept = DecodedCache(args.checkpoint.parent / DECODED_FOLDER, writes=False)  # its training run's, if there
    dataset = load_dataset(
        dataset_name, "test", data_dir, checkpoint.preprocess, held_out, seed, checkpoint.classes, decode=kept
    )
    # A chunk at a time: float inputs take 4 bytes a pixel, 6 GB for 10,000 RGB images at 224 pixels.
    ours, theirs = [], []
    chunk = batch_size_for(dataset.images, SCORED_AT_ONCE)
    for start in range(0, len(dataset), chunk):
        inputs = preprocess_dataset(dataset, checkpoint.preprocess, start, start + chunk)
        ours.append(predict(checkpoint.model, inputs, device))
        if timm_model is not None:
            theirs.append(predict(timm_model, inputs, device))
    predictions = torch.cat(ours)
    matrix = confusion_matrix(dataset.labels, predictions, len(checkpoint.classes))
    accuracy = 100.0 * matrix.diag().sum().item() / len(dataset)
    scored = counted(len(dataset), f"{dataset_name} test image")
    if held_out is not None and split_folder(data_dir, "test") is None:
        scored += f", {data_dir}'s held-out share (--val-fraction {held_out:g}, --seed {seed}, as at training)"
    report = [f"{args.checkpoint}: {accuracy:.2f} % top-1 on {scored}"]
    width = max(columns(name) for name in checkpoint.classes)
    for index, name in enumerate(checkpoint.classes):
        if not (total := matrix[index].sum().item()):  # 0.00 % said that the class was always missed
            report.append(f"  {padded(name, width)}  {'-':>6}    (no test images)")
            continue
        share = 100.0 * matrix[index, index].item() / total
        report.append(f"  {padded(name, width)}  {share:6.2f} %  ({counted(total, 'image')})")
    with written(figure_path) as path:
        lacking = plot_confusion_matrix(
            matrix.numpy(), checkpoint.classes, path, f"{checkpoint.name}: {accuracy:.2f} % on {dataset_name}"
        )
    report.append(f"confusion matrix: {figure_path}")
    if lacking:
        print(
            f"vit-evaluate: note: {figure_path}: its font has no glyph for {lacking[:20]}{'...' * bool(lacking[20:])}"
            " of the class names, drawn as boxes; install a font that has them (Debian's fonts-noto-cjk)",
            file=sys.stderr,
        )
    if timm_model is not None:
        timm_predictions = torch.cat(theirs)
        timm_accuracy = 100.0 * (timm_predictions == dataset.labels).double().mean().item()
        agreement = 100.0 * (timm_predictions == predictions).double().mean().item()
        report.append(
            f"timm's VisionTransformer with the same weights: {timm_accuracy:.2f} % top-1, "
            f"the same class as ours on {agreement:.2f} % of the images"
        )
    return accuracy, report


@interrupted_says("vit-evaluate", "nothing scored")
@own_files_pixel_limit()
def main(argv: list[str] | None = None) -> int:
    """vit-evaluate: exit status 0 when it has scored and said so; a user's mistake is one line on stderr and
    status 1, and so is a reader that stopped reading (`vit-evaluate ... | head`, the confusion matrix written)."""
    try:
        _, report = score(parse_args(argv))
        return 0 if print_to_reader("\n".join(report)) else 1
    except (CheckpointError, FileNotFoundError, ValueError, WriteError, MissingExtra) as error:
        raise SystemExit(f"vit-evaluate: {error}") from None


if __name__ == "__main__":
    sys.exit(main())
