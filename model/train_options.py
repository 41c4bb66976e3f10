"""vit-train's options: the parser, with each value's range and default, and the checks of how they combine,
all made before any data is read; and the names of the files that a run writes into --out-dir.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from model.arguments import (
    NON_NEGATIVE,
    POSITIVE,
    PROBABILITY,
    HelpFormatter,
    device_name,
    folder_problem,
    model_name,
    nonempty_path,
    real,
)
from model.cpu import beyond_runnable_cpus, cpu_share
from model.data import DATASETS, default_preprocess
from model.device import resolve_device
from model.images import PreprocessConfig
from model.metadata import CHECKPOINT_NAME, CheckpointError, decoded, read_metadata, read_raw_metadata
from model.policy_feed import POLICIES
from model.run_state import StateError, state_index
from model.teacher import TEACHERS
from model.toolchain import missing_for_compile

DESCRIPTION = "Train a ViT and write a checkpoint: ``python -m model.train --dataset fashion-mnist --epochs 88``."
PRESETS = {
    "nano": {"dim": 64, "depth": 4, "num_heads": 2, "mlp_ratio": 2.0},  # 0.1 M parameters
    "tiny": {"dim": 128, "depth": 6, "num_heads": 4, "mlp_ratio": 2.0},  # 0.8 M
    "small": {"dim": 192, "depth": 8, "num_heads": 6, "mlp_ratio": 2.0},  # 2.4 M
    "medium": {"dim": 256, "depth": 10, "num_heads": 8, "mlp_ratio": 2.0},  # 5.3 M
}
IMAGEFOLDER_DEFAULTS = {"image_size": 32, "channels": 3, "val_fraction": 0.2}  # options of --dataset imagefolder
DEFAULT_MODEL = {"model": "tiny", "patch_size": 4}  # the architecture, where no --init-from gives one
STATE_NAME = "state.pt"
METRICS_NAME = "metrics.jsonl"
CURVES_NAME = "metrics.png"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, each in its range (model/arguments.py), and refused in one line where they disagree."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume and (recipe := run_recipe(args.out_dir)):  # the run's options, where this command gives none
        args = parser.parse_args(argv, namespace=argparse.Namespace(**resumed_options(recipe, vars(args))))
    if args.dataset == "imagefolder":
        if args.data_dir is None:  # it was a traceback from the first look into the folder
            parser.error("--dataset imagefolder needs --data-dir: a folder of class folders, or of train/ and val/")
        defaults = dict(IMAGEFOLDER_DEFAULTS)
    else:
        # Fashion-MNIST and CIFAR-10 have their own size and channels, and their own test split: an imagefolder
        # option given with them would be ignored, and a run at 28 pixels would pass for one at --image-size.
        # The recipe records the images trained on, not the imagefolder defaults, and no held-out share.
        # A checkpoint fine-tunes at the --image-size it is given, its images resized to it (train.load_data).
        own = default_preprocess(args.dataset)
        resized = args.image_size is not None and starts_from_checkpoint(args)
        options = [name for name in IMAGEFOLDER_DEFAULTS if not (resized and name == "image_size")]
        if given := [name for name in options if getattr(args, name) is not None]:
            fixed = (
                f"{args.dataset} comes with its own test split"
                if given[0] == "val_fraction"
                else f"{args.dataset} images are {own.image_size} x {own.image_size} with {own.channels} "
                f"channel{'s' if own.channels > 1 else ''}"
            )
            parser.error(f"--{given[0].replace('_', '-')} is an option of --dataset imagefolder only; {fixed}")
        args.image_size = args.image_size if resized else own.image_size
        args.channels, defaults = own.channels, {}
    if starts_from_checkpoint(args):
        take_parents_architecture(parser, args)  # --model stays unset: the recipe then says where the model came from
    else:
        defaults |= DEFAULT_MODEL
    for name, default in defaults.items():
        setattr(args, name, default if getattr(args, name) is None else getattr(args, name))
    if args.model in PRESETS and args.image_size % args.patch_size:
        parser.error(
            f"--patch-size {args.patch_size} does not divide the {args.image_size}-pixel side of the {args.dataset} "
            "images"
        )
    if args.min_lr > args.lr:
        parser.error(f"--min-lr {args.min_lr:g} is above --lr {args.lr:g}")
    if args.augment_workers is None:
        args.augment_workers = min(8, cpu_share())
    elif problem := beyond_runnable_cpus(args.augment_workers):  # each a process that imports torch
        parser.error(f"--augment-workers {args.augment_workers} is {problem}")
    if args.compile and (missing := missing_for_compile(resolve_device(args.device).type == "cuda")):
        parser.error(f"--compile needs {missing}")
    if args.repeated_aug > 1 and args.repeated_aug >= args.batch_size:
        parser.error(
            f"--repeated-aug {args.repeated_aug} fills a batch of --batch-size {args.batch_size} with copies of one "
            "image; use fewer copies than a batch holds images (DeiT uses 3)"
        )
    return args


def starts_from_checkpoint(args: argparse.Namespace) -> bool:
    """Whether the run's ViT takes its architecture and preprocessing from --init-from (a teacher is refused)."""
    return args.init_from is not None and args.model not in TEACHERS


def parent_facts(path: Path) -> tuple[dict, PreprocessConfig]:
    """The architecture (ViTConfig's fields) and preprocessing of the --init-from checkpoint, from its metadata."""
    try:
        metadata = read_metadata(path)
    except CheckpointError as error:
        raise SystemExit(f"vit-train: --init-from: {error}") from None
    return metadata["config"], PreprocessConfig.from_dict(metadata["preprocess"])


def take_parents_architecture(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill in --patch-size, --image-size and --channels from the --init-from checkpoint, and refuse those
    options, or a --model, or a dataset's own images, that another architecture would need. Only a preset
    could be built, so a model of vit-import's (a ViT-S/16 at 224 pixels) could not be fine-tuned at all.

    The image size may differ, in whole patches: the run resamples the position embedding to its patch grid
    (initialise_from), as the ViT paper fine-tunes at a higher resolution than it pre-trains and timm loads
    weights for another img_size. So a ViT-B/16 of 224 pixels fine-tunes at 384, or at 112 for a quarter of
    the compute, a model of 32 pixels on Fashion-MNIST's 28, and one of 224 on CIFAR-10 resized to 224."""
    config, preprocess = parent_facts(args.init_from)
    wanted = {"patch_size": config["patch_size"]}
    if args.dataset == "imagefolder":
        wanted |= {"channels": preprocess.channels}
        args.image_size = args.image_size or preprocess.image_size
    elif args.channels != preprocess.channels:  # the dataset's own
        parser.error(
            f"--init-from {args.init_from} takes images with {preprocess.channels} channels; {args.dataset} "
            f"images have {args.channels}"
        )
    if args.image_size % config["patch_size"]:
        own = args.dataset != "imagefolder" and args.image_size == default_preprocess(args.dataset).image_size
        given = f"the {args.dataset} images' side" if own else "--image-size"
        parser.error(
            f"{given} {args.image_size} is not a whole number of --init-from {args.init_from}'s "
            f"{config['patch_size']}-pixel patches"
        )
    if args.model is not None and (preset := PRESETS[args.model]) != {key: config[key] for key in preset}:
        parser.error(
            f"--model {args.model} is not the architecture of --init-from {args.init_from} ("
            + ", ".join(f"{key} {config[key]:g}" for key in preset)
            + "); leave --model out to train that one"
        )
    for name, value in wanted.items():
        if getattr(args, name) not in (None, value):
            option = "--" + name.replace("_", "-")
            parser.error(
                f"{option} {getattr(args, name)}: --init-from {args.init_from} has {value}; leave {option} out"
            )
        setattr(args, name, value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=HelpFormatter)
    parser.add_argument("--dataset", choices=DATASETS, default="fashion-mnist", help="what to train on")
    parser.add_argument(
        "--data-dir", type=nonempty_path, help="dataset folder (Fashion-MNIST: Debian's files by default)"
    )
    parser.add_argument(
        "--image-size",
        type=POSITIVE,
        help="imagefolder: side of the square input; with --init-from, any multiple of its patch size, and "
        "Fashion-MNIST's or CIFAR-10's images are resized to it "
        f"(default: {IMAGEFOLDER_DEFAULTS['image_size']}, or the --init-from checkpoint's)",
    )
    parser.add_argument(
        "--channels", type=int, choices=(1, 3), help=f"imagefolder only (default: {IMAGEFOLDER_DEFAULTS['channels']})"
    )
    parser.add_argument(
        "--val-fraction",
        type=real(0.0, 1.0, above=True, below=True),
        help="imagefolder without train/ and val/ folders: the share of each class held out to test, drawn by "
        f"--seed (default: {IMAGEFOLDER_DEFAULTS['val_fraction']})",
    )
    parser.add_argument(
        "--model",
        choices=[*PRESETS, *TEACHERS],
        help="the ViT's size preset, or a convolutional teacher to train for --teacher (model/teacher.py) "
        f"(default: {DEFAULT_MODEL['model']}, or the --init-from checkpoint's architecture)",
    )
    parser.add_argument(
        "--patch-size",
        type=POSITIVE,
        help="side of the square patches the image is cut into "
        f"(default: {DEFAULT_MODEL['patch_size']}, or the --init-from checkpoint's)",
    )
    parser.add_argument("--epochs", type=POSITIVE, default=88, help="passes over the training set")
    parser.add_argument("--batch-size", type=POSITIVE, default=512, help="global batch, split across DDP processes")
    parser.add_argument(
        "--lr",
        type=real(0.0, above=True),
        default=2e-3,
        help="peak learning rate of AdamW; scale it with --batch-size (linearly)",
    )
    parser.add_argument("--min-lr", type=real(0.0), default=1e-5, help="learning rate at the end of the cosine")
    parser.add_argument("--weight-decay", type=real(0.0), default=0.05, help="not applied to tokens, norms and biases")
    parser.add_argument("--warmup-epochs", type=real(0.0), default=5.0, help="linear warm-up to --lr, in epochs")
    parser.add_argument(  # at 1 the targets are uniform, whatever the label: timm refuses it too
        "--label-smoothing", type=real(0.0, 1.0, below=True), default=0.1, help="of the cross-entropy targets"
    )
    parser.add_argument(
        "--drop-path", type=real(0.0, 1.0, below=True), default=0.1, help="ViT: stochastic depth rate of the last block"
    )
    parser.add_argument(
        "--ema-decay",
        type=real(0.0, 1.0, below=True),
        default=0.0,
        help="keep an EMA of the weights and ship it (0: off)",
    )
    parser.add_argument(
        "--crop-padding", type=NON_NEGATIVE, default=2, help="random crop after zero padding by this much"
    )
    parser.add_argument(
        "--flip", action=argparse.BooleanOptionalAction, default=True, help="random horizontal flips (--no-flip: none)"
    )
    parser.add_argument("--erasing", type=PROBABILITY, default=0.25, help="probability of random erasing")
    parser.add_argument(
        "--augment", choices=POLICIES, default="none", help="torchvision's augmentation policy, run on the CPU"
    )
    parser.add_argument(
        "--augment-workers",
        type=POSITIVE,
        help="processes that run --augment's policy an epoch ahead (default: one per CPU of this process's share, "
        "at most 8)",
    )
    parser.add_argument(
        "--mixup", type=real(0.0), default=0.0, help="MixUp's alpha (0: off; with --cutmix, one per batch)"
    )
    parser.add_argument("--cutmix", type=real(0.0), default=0.0, help="CutMix's alpha (0: off)")
    parser.add_argument(
        "--repeated-aug", type=POSITIVE, default=1, help="copies of each image in a batch, each augmented on its own"
    )
    parser.add_argument(
        "--teacher",
        type=nonempty_path,
        metavar="CHECKPOINT",
        help="distil from this teacher as the ViT trains: a convnet that vit-train --model densenet-bc-100 wrote, "
        "or a ViT checkpoint",
    )
    parser.add_argument(
        "--distill-weight", type=PROBABILITY, default=0.5, help="--teacher: the teacher's share of the loss, 0 to 1"
    )
    parser.add_argument(
        "--distill-temperature",
        type=real(0.0),
        default=0.0,
        help="--teacher: 0, the teacher's top-1 class as a label (DeiT's hard distillation); above 0, soft targets",
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the model for training (fewer, fused kernels)"
    )
    parser.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="CUDA only: replay each training step (forward, backward, AdamW) from one captured CUDA graph",
    )
    parser.add_argument(
        "--stop-after",
        type=real(0.0),
        metavar="SECONDS",
        help="end cleanly, state saved, before an epoch that would finish later than this; --resume goes on",
    )
    parser.add_argument(
        "--train-limit",
        type=POSITIVE,
        help="use only N training images: a built-in dataset's first N, an image folder's drawn by --seed",
    )
    parser.add_argument(
        "--test-limit",
        type=POSITIVE,
        help="evaluate on N test images: a built-in dataset's first N, an image folder's drawn by --seed",
    )
    parser.add_argument("--seed", type=int, default=0, help="of the weights, the data order and augmentation")
    parser.add_argument(
        "--device", type=device_name, default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ..."
    )
    parser.add_argument(
        "--out-dir",
        type=nonempty_path,
        default=Path("runs/latest"),
        help="where the checkpoint, state, log and curves go",
    )
    existing = parser.add_mutually_exclusive_group()  # continue a run, or replace it: not both
    existing.add_argument(
        "--resume",
        action="store_true",
        help=f"continue from OUT_DIR/{STATE_NAME}, with the run's options where this command gives none",
    )
    existing.add_argument("--force", action="store_true", help="start over in an OUT_DIR that holds a run")
    parser.add_argument(
        "--name",
        type=model_name,
        help="the model's name, as vit-serve serves it (default: the --out-dir folder's name)",
    )
    parser.add_argument(
        "--init-from",
        type=nonempty_path,
        metavar="CHECKPOINT",
        help="start from this checkpoint's weights, architecture and preprocessing (a new head if the classes "
        "differ): fine-tune a model of vit-import's or of an earlier run",
    )
    return parser


def run_name(out_dir: Path) -> str | None:
    """The name of a run given no --name: its folder's (runs/shapes: shapes), where that is a model's name. It
    was the checkpoint file's, `model`, for every run, so two of them served as one name."""
    try:
        return model_name(Path(os.path.abspath(out_dir)).name)  # abspath: `.` and `runs/x/..` named too
    except argparse.ArgumentTypeError:  # the root folder's '', or spaces around it
        return None


def warmup_warning(args: argparse.Namespace) -> str | None:
    if args.warmup_epochs < args.epochs:
        return None
    if args.warmup_epochs == args.epochs:
        peak = f"rises all run and reaches --lr {args.lr:g} at its last step, with no decay after it"
    else:
        peak = f"peaks at {args.lr * args.epochs / args.warmup_epochs:.2g} instead of --lr {args.lr:g}"
    return (
        f"warning: --warmup-epochs {args.warmup_epochs:g} is as long as the run (--epochs {args.epochs}): the "
        f"learning rate {peak}; shorten the warm-up for a short run"
    )


def check_out_dir(args: argparse.Namespace) -> None:
    """Refuse, before any data is read, an --out-dir that holds a run (unless --resume or --force continues or
    replaces it) or that cannot be made: a file in its place, or a folder above it that this user cannot
    write. The folder is made when the first epoch is saved, and such a mistake used to cost that epoch."""
    if problem := folder_problem(args.out_dir):
        raise SystemExit(f"vit-train: --out-dir {args.out_dir}: {problem}")
    if (
        args.dataset == "imagefolder"
        and args.data_dir
        and args.out_dir.resolve().is_relative_to(args.data_dir.resolve())
    ):
        raise SystemExit(
            f"vit-train: --out-dir {args.out_dir} is inside --data-dir {args.data_dir}: the run's folder would be read "
            f"as a class, its curves ({CURVES_NAME}) as an image, by the next --resume and by vit-evaluate; "
            "choose an --out-dir outside it"
        )
    if args.resume and not (args.out_dir / STATE_NAME).exists():  # it was found once the data had been decoded
        raise SystemExit(f"vit-train: --resume: {args.out_dir / STATE_NAME} does not exist; no run to continue there")
    finished = [name for name in (CHECKPOINT_NAME, STATE_NAME) if (args.out_dir / name).exists()]
    if finished and not (args.resume or args.force):
        raise SystemExit(
            f"vit-train: {args.out_dir} already holds a run ({', '.join(finished)}); "
            "--resume continues it, --force starts over, or choose another --out-dir"
        )
    if args.resume and (changes := changed_options(args)):
        saved, given = (
            ", ".join(as_option(name, value) for name, value in side) for side in zip(*changes, strict=True)
        )
        raise SystemExit(
            f"vit-train: --resume: {args.out_dir} was trained with {saved}; this command gives {given}. Leave "
            "those out to take the run's own (--epochs may grow, and --stop-after, --device and the speed options "
            "may change), or --force to start over"
        )


# Options a run may resume with other values of: how long it goes on, where and how fast it runs, and the paths
# that another machine, given a copy of the run, names otherwise. The others make the run what it is: a
# resumed run is one uninterrupted run, and its checkpoint's recipe is the one it was trained with.
RESUMABLE_WITH_OTHER = {
    "epochs",
    "stop_after",
    "device",
    "compile",
    "cuda_graphs",
    "augment_workers",
    "out_dir",
    "data_dir",
    "name",
    "resume",
    "force",
}
GIVEN_OR_NOT = {"teacher", "init_from"}  # paths too, but whether one is given changes the run
# What each command says for itself, and a --resume that leaves them out does not take from the run: where and
# how fast it runs, and when it stops. --epochs, --data-dir and --name are taken, as the run's own.
CHOSEN_PER_COMMAND = RESUMABLE_WITH_OTHER - {"epochs", "data_dir", "name"}
PATH_OPTIONS = {"data_dir", "teacher", "init_from"}  # recorded as absolute paths


def run_recipe(out_dir: Path) -> dict:
    """The options that the run in out_dir was trained with, as its checkpoint's recipe records them, or its
    state's where the checkpoint was not copied along (the state files and the log are what a run needs to go
    on elsewhere); none where neither can be read, which loading the state then says."""
    checkpoint, state = out_dir / CHECKPOINT_NAME, out_dir / STATE_NAME
    try:
        if checkpoint.exists():
            return decoded(checkpoint, read_raw_metadata(checkpoint), ("training",))["training"].get("recipe") or {}
        if state.exists():
            return state_index(state).get("recipe") or {}
    except (CheckpointError, StateError):
        pass
    return {}


def resumed_options(recipe: dict, options: dict) -> dict:
    """The recipe's values of `options` (the parser's), for the options that a --resume takes from its run:
    `vit-train --out-dir runs/x --resume` goes on as the run was started, and an option that the command gives
    replaces the value (changed_options refuses one that would change the run). A built-in dataset's size and
    channels are the images' own, not options, unless --init-from resized them."""
    taken = {name: value for name, value in recipe.items() if name in options and name not in CHOSEN_PER_COMMAND}
    if taken.get("dataset") != "imagefolder":
        for name in IMAGEFOLDER_DEFAULTS.keys() - ({"image_size"} if taken.get("init_from") else set()):
            taken.pop(name, None)
    return taken | {name: Path(taken[name]) for name in PATH_OPTIONS if taken.get(name) is not None}


def changed_options(args: argparse.Namespace) -> list[tuple[tuple[str, object], tuple[str, object]]]:
    """(option, the run's value) and (option, this command's value) for each option that this --resume gives
    another value than its run was trained with, as the run's checkpoint records them."""
    if not (recipe := run_recipe(args.out_dir)):
        return []
    given = json.loads(json.dumps(vars(args), default=str))  # as the recipe holds them: lists, not tuples
    if (recipe.get("init_from") is None) != (given["init_from"] is None):  # the architecture follows from it
        return [(("init_from", recipe.get("init_from")), ("init_from", given["init_from"]))]
    changes = []
    for name, saved in recipe.items():
        if name in RESUMABLE_WITH_OTHER or name not in given:
            continue
        now = given[name]
        if saved != now and not (name in GIVEN_OR_NOT and None not in (saved, now)):
            changes.append(((name, saved), (name, now)))
    return changes


def as_option(name: str, value: object) -> str:
    """An option as a command line gives it: --lr 0.002, --no-flip; `no --teacher` for one left out."""
    option = "--" + name.replace("_", "-")
    if value is None or value is False:
        return f"--no-{name}" if name == "flip" else f"no {option}"
    return option if value is True else f"{option} {value}"


def check_distillation(args: argparse.Namespace) -> None:
    """Refuse the combinations that cannot mean what they say, before any data is read."""
    if args.model in TEACHERS and (args.teacher or args.init_from):
        flag = "--teacher" if args.teacher else "--init-from"
        raise SystemExit(f"vit-train: {flag} trains a ViT; --model {args.model} is a teacher, trained on its own")
