"""Train a ViT and write a checkpoint: ``python -m model.train --dataset fashion-mnist --epochs 88``.

Every epoch ends with an evaluation, a line in ``metrics.jsonl``, the checkpoint (``model.safetensors``)
and the resumable state (``state.pt``); the run ends with the training curves (``metrics.png``), all in ``--out-dir``.
``--resume`` continues from that state exactly, and ``--stop-after`` ends a run cleanly in time for a window
of machine time to close, so that a long run goes in pieces. Under ``torchrun`` it trains with DDP.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shlex
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from model.arguments import (
    NON_NEGATIVE,
    POSITIVE,
    PROBABILITY,
    HelpFormatter,
    device_name,
    folder_problem,
    model_name,
    real,
)
from model.checkpoint import load_checkpoint, save_checkpoint
from model.cpu import cpu_share
from model.data import (
    DATASETS,
    BatchAugment,
    BatchMix,
    DatasetError,
    Decoder,
    ImageDataset,
    channel_statistics,
    decode_files,
    default_preprocess,
    load_dataset,
    repeated,
    unread_pictures,
)
from model.device import autocast, resolve_device
from model.evaluate import evaluate
from model.graphed_step import GraphedStep
from model.images import PreprocessConfig
from model.metadata import CheckpointError, decoded, file_sha256, read_metadata, read_raw_metadata, some_of
from model.plots import plot_training_curves
from model.policy_feed import POLICIES, PolicyFeed
from model.preprocess import normalize
from model.run_state import load_state, save_state
from model.teacher import TEACHERS, build_teacher, distillation_loss, load_teacher, save_teacher
from model.vit import VisionTransformer, ViTConfig, count_parameters, no_weight_decay_names

PRESETS = {
    "nano": {"dim": 64, "depth": 4, "num_heads": 2, "mlp_ratio": 2.0},  # 0.1 M parameters
    "tiny": {"dim": 128, "depth": 6, "num_heads": 4, "mlp_ratio": 2.0},  # 0.8 M
    "small": {"dim": 192, "depth": 8, "num_heads": 6, "mlp_ratio": 2.0},  # 2.4 M
    "medium": {"dim": 256, "depth": 10, "num_heads": 8, "mlp_ratio": 2.0},  # 5.3 M
}
IMAGEFOLDER_DEFAULTS = {"image_size": 32, "channels": 3, "val_fraction": 0.2}  # options of --dataset imagefolder
DEFAULT_MODEL = {"model": "tiny", "patch_size": 4}  # the architecture, where no --init-from gives one
CHECKPOINT_NAME = "model.safetensors"
STATE_NAME = "state.pt"
METRICS_NAME = "metrics.jsonl"
CURVES_NAME = "metrics.png"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, each in its range (model/arguments.py), and refused in one line where they disagree."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # Fashion-MNIST and CIFAR-10 have their own size and channels, and their own test split: an imagefolder
    # option given with them would be ignored, and a run at 28 pixels would pass for one at --image-size.
    given = [name for name in IMAGEFOLDER_DEFAULTS if getattr(args, name) is not None]
    if given and args.dataset != "imagefolder":
        own = default_preprocess(args.dataset)
        fixed = (
            f"{args.dataset} comes with its own test split"
            if given[0] == "val_fraction"
            else f"{args.dataset} images are {own.image_size} x {own.image_size} with {own.channels} "
            f"channel{'s' if own.channels > 1 else ''}"
        )
        parser.error(f"--{given[0].replace('_', '-')} is an option of --dataset imagefolder only; {fixed}")
    defaults = IMAGEFOLDER_DEFAULTS | DEFAULT_MODEL
    if starts_from_checkpoint(args):
        take_parents_architecture(parser, args)  # --model stays unset: the recipe then says where the model came from
        defaults = IMAGEFOLDER_DEFAULTS
    for name, default in defaults.items():
        setattr(args, name, default if getattr(args, name) is None else getattr(args, name))
    side = default_preprocess(args.dataset, args.image_size, args.channels).image_size
    if args.model in PRESETS and side % args.patch_size:
        parser.error(
            f"--patch-size {args.patch_size} does not divide the {side}-pixel side of the {args.dataset} images"
        )
    if args.min_lr > args.lr:
        parser.error(f"--min-lr {args.min_lr:g} is above --lr {args.lr:g}")
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
    could be built, so a model of vit-import's (a ViT-S/16 at 224 pixels) could not be fine-tuned at all."""
    config, preprocess = parent_facts(args.init_from)
    wanted = {"patch_size": config["patch_size"]}
    if args.dataset == "imagefolder":
        wanted |= {"image_size": preprocess.image_size, "channels": preprocess.channels}
    else:
        own = default_preprocess(args.dataset)
        if (own.image_size, own.channels) != (preprocess.image_size, preprocess.channels):
            parser.error(
                f"--init-from {args.init_from} takes {preprocess.image_size} x {preprocess.image_size} inputs with "
                f"{preprocess.channels} channels; {args.dataset} images are {own.image_size} x {own.image_size} "
                f"with {own.channels}"
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("--dataset", choices=DATASETS, default="fashion-mnist", help="what to train on")
    parser.add_argument("--data-dir", type=Path, help="dataset folder (Fashion-MNIST: Debian's files by default)")
    parser.add_argument(
        "--image-size",
        type=POSITIVE,
        help=f"imagefolder only: side of the square input (default: {IMAGEFOLDER_DEFAULTS['image_size']})",
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
    parser.add_argument("--label-smoothing", type=PROBABILITY, default=0.1, help="of the cross-entropy targets")
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
        default=min(8, cpu_share()),
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
        type=Path,
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
        "--out-dir", type=Path, default=Path("runs/latest"), help="where the checkpoint, state, log and curves go"
    )
    existing = parser.add_mutually_exclusive_group()  # continue a run, or replace it: not both
    existing.add_argument("--resume", action="store_true", help=f"continue from OUT_DIR/{STATE_NAME}")
    existing.add_argument("--force", action="store_true", help="start over in an OUT_DIR that holds a run")
    parser.add_argument(
        "--name", type=model_name, help="the model's name, as vit-serve serves it (default: the file's, 'model')"
    )
    parser.add_argument(
        "--init-from",
        type=Path,
        metavar="CHECKPOINT",
        help="start from this checkpoint's weights, architecture and preprocessing (a new head if the classes "
        "differ): fine-tune a model of vit-import's or of an earlier run",
    )
    return parser


def build_model(
    args: argparse.Namespace, preprocess: PreprocessConfig, num_classes: int, parent: dict | None = None
) -> nn.Module:
    """The ViT of `parent`'s architecture (the --init-from checkpoint's config) or of --model's preset, or
    the convolutional teacher that --model names."""
    if args.model in TEACHERS:
        return build_teacher(args.model, preprocess.channels, num_classes)
    if parent is not None:
        return VisionTransformer(ViTConfig(**parent | {"num_classes": num_classes, "drop_path": args.drop_path}))
    config = ViTConfig(
        image_size=preprocess.image_size,
        patch_size=args.patch_size,
        in_channels=preprocess.channels,
        num_classes=num_classes,
        drop_path=args.drop_path,
        **PRESETS[args.model],
    )
    return VisionTransformer(config)


def build_optimizer(
    model: nn.Module, args: argparse.Namespace, device: torch.device, lr: float | torch.Tensor
) -> torch.optim.AdamW:
    """AdamW, fused on CUDA; `lr` is a device tensor where the step is replayed from a CUDA graph."""
    skip = no_weight_decay_names(model)
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if n not in skip], "weight_decay": args.weight_decay},
        {"params": [p for n, p in named if n in skip], "weight_decay": 0.0},
    ]
    # Each group takes the defaults as they are: a tensor `lr` is the one object that every group reads.
    return torch.optim.AdamW(groups, lr=lr, fused=device.type == "cuda", capturable=args.cuda_graphs)


# AdamW's settings that belong to the run, not to the state: the device and --cuda-graphs may have changed.
RUN_SETTINGS = ("fused", "capturable", "foreach")


def load_optimizer_state(optimizer: torch.optim.AdamW, saved: dict, lr: float | torch.Tensor) -> None:
    """Resume `optimizer` from `saved`, keeping this run's settings whichever run saved the state.

    load_state_dict takes each group's settings from the saved state, and puts each step counter where
    they say: on the device where fused or capturable, else on the CPU. So a state saved on a CPU and
    resumed on CUDA would step unfused, and a graphed step would find its counters on the host. This
    run's settings go into the saved groups first; its `lr` is bound after the load, which would copy
    the one tensor that every group of a graphed run reads.
    """
    own = [{key: group[key] for key in RUN_SETTINGS} for group in optimizer.param_groups]
    groups = [group | settings for group, settings in zip(saved["param_groups"], own, strict=True)]
    optimizer.load_state_dict(saved | {"param_groups": groups})
    for group in optimizer.param_groups:
        group["lr"] = lr


def learning_rate(step: int, total_steps: int, warmup_steps: int, peak: float, floor: float) -> float:
    """Linear warmup to `peak`, then a cosine down to `floor`."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(progress, 1.0)))


def epoch_line(record: dict, epochs: int) -> str:
    """One epoch, as a person reads it; metrics.jsonl keeps the full record."""
    return (
        f"epoch {record['epoch']}/{epochs}"
        f"  train loss {record['train_loss']:.3f} acc {100 * record['train_accuracy']:.2f} %"
        f"  test loss {record['test_loss']:.3f} acc {100 * record['test_accuracy']:.2f} %"
        f"  lr {record['lr']:.2e}  {record['elapsed_s']:.1f} s"
    )


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
    finished = [name for name in (CHECKPOINT_NAME, STATE_NAME) if (args.out_dir / name).exists()]
    if finished and not (args.resume or args.force):
        raise SystemExit(
            f"vit-train: {args.out_dir} already holds a run ({', '.join(finished)}); "
            "--resume continues it, --force starts over, or choose another --out-dir"
        )


def load_data(
    args: argparse.Namespace, parent: PreprocessConfig | None = None, decode: Decoder | None = None
) -> tuple[ImageDataset, ImageDataset, PreprocessConfig]:
    """The splits, and the preprocessing that the run trains with and its checkpoint records. A run from a
    checkpoint keeps that checkpoint's, `parent` (its mean and std, resize filter and centre crop): its weights
    learned from images prepared so, and a pretrained timm model's are ImageNet's, as timm fine-tunes.
    Fashion-MNIST's and CIFAR-10's images are whole pictures at the model's size, never cropped, so a
    model trained on them is served uploads resized whole, whatever the checkpoint cropped. An image folder's
    files are decoded by `decode` (Distributed.decode), by default decode_files."""
    if parent is None:
        preprocess = default_preprocess(args.dataset, args.image_size, args.channels)
    elif args.dataset == "imagefolder":
        preprocess = parent
    else:
        preprocess = replace(parent, crop_pct=None)

    def split(name: str, limit: int | None) -> ImageDataset:
        return load_dataset(
            args.dataset, name, args.data_dir, preprocess, args.val_fraction, args.seed, limit=limit, decode=decode
        )

    train, test = split("train", args.train_limit), split("test", args.test_limit)
    if args.dataset == "imagefolder" and parent is None:  # a user's own images: standardise with their own statistics
        mean, std = channel_statistics(train.images)
        preprocess = PreprocessConfig(preprocess.image_size, preprocess.channels, mean, std, preprocess.resize)
    return train, test, preprocess


@dataclass(frozen=True)
class Distributed:
    """Where this process sits in a torchrun job; a plain run is rank 0 of 1, in no process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    in_group: bool = False  # launched by torchrun: DDP over NCCL or gloo, even as a job of one process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, device_name: str) -> Distributed:
        """Read torchrun's variables and join the process group (NCCL on GPUs, gloo on CPUs)."""
        if "LOCAL_RANK" not in os.environ:  # not launched by torchrun
            return cls()
        local_rank = int(os.environ["LOCAL_RANK"])
        use_cuda = resolve_device(device_name).type == "cuda"
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, in_group=True)

    def device(self, name: str) -> torch.device:
        device = resolve_device(name)
        if device.type == "cuda" and self.in_group:
            return torch.device("cuda", self.local_rank)
        return device

    def decode(
        self, paths: list[Path], preprocess: PreprocessConfig, description: str
    ) -> tuple[torch.Tensor, dict[int, str]]:
        """decode_files, a share of the files in each process, gathered whole in every one: each process
        decoded the whole folder, and a job of eight did eight times the work before its first step.
        Every process gets every file's error too, so that all stop alike, not one while the others wait."""
        if not self.in_group or not paths:
            return decode_files(paths, preprocess, description)
        share = math.ceil(len(paths) / self.world_size)  # a block of files in order: gathered, they are in order
        mine, errors = decode_files(paths[self.rank * share : (self.rank + 1) * share], preprocess, description)
        device = torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
        block = torch.zeros((share, *mine.shape[1:]), dtype=mine.dtype, device=device)  # the last may be short
        block[: len(mine)] = mine.to(device)
        gathered = torch.empty((self.world_size * share, *mine.shape[1:]), dtype=mine.dtype, device=device)
        dist.all_gather(list(gathered.split(share)), block)
        del block
        everyone: list[dict[int, str]] = [{} for _ in range(self.world_size)]
        dist.all_gather_object(everyone, {self.rank * share + index: error for index, error in errors.items()})
        every_error = {index: error for part in everyone for index, error in part.items()}  # each in file order
        return gathered[: len(paths)].cpu(), every_error

    def sum(self, *values: torch.Tensor) -> list[float]:
        """Sum scalars over all processes."""
        stacked = torch.stack([value.float() for value in values])
        if self.in_group:
            dist.all_reduce(stacked)
        return stacked.tolist()


class ModelEma:
    """An exponential moving average of the weights; its decay ramps up so early steps are not frozen in."""

    def __init__(self, model: VisionTransformer, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: VisionTransformer) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(list(self.model.parameters()), list(model.parameters()), 1.0 - decay)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = state["updates"]


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Each epoch's randomness derives from (seed, epoch, rank), so a resumed run needs no RNG state."""
    return seed + 1_000_003 * epoch + 7_919 * rank


class Trainer:
    """One training run: model, optimizer, EMA and data, able to stop and resume exactly."""

    def __init__(
        self, args: argparse.Namespace, command_line: list[str], distributed: Distributed = Distributed()
    ) -> None:
        self.args = args
        self.command_line = command_line
        self.distributed = distributed
        self.device = distributed.device(args.device)
        if args.cuda_graphs and (self.device.type != "cuda" or distributed.in_group):
            where = "under torchrun (DDP)" if distributed.in_group else f"on {self.device}"
            raise SystemExit(f"vit-train: --cuda-graphs runs on one CUDA device, without torchrun; not {where}")
        if args.batch_size % distributed.world_size:
            raise SystemExit(
                f"vit-train: --batch-size {args.batch_size} does not split evenly over "
                f"{distributed.world_size} processes"
            )
        self.rank_batch_size = args.batch_size // distributed.world_size
        check_distillation(args)
        torch.manual_seed(args.seed)  # the same initial weights in every process
        architecture, preprocess = parent_facts(args.init_from) if starts_from_checkpoint(args) else (None, None)
        self.train_set, self.test_set, self.preprocess = load_data(args, preprocess, distributed.decode)
        self.model = build_model(args, self.preprocess, len(self.train_set.classes), architecture)
        self.parent = initialise_from(self.model, args.init_from, self.train_set.classes) if args.init_from else None
        self.model.to(self.device)
        self.teacher, self.teacher_facts = self.load_teacher() if args.teacher else (None, None)
        self.ema = ModelEma(self.model, args.ema_decay) if args.ema_decay else None
        self.network = DistributedDataParallel(self.model) if distributed.in_group else self.model
        # A graphed step's AdamW reads the learning rate from the device, where each step's value is filled in.
        self.lr = torch.tensor(args.lr, device=self.device) if args.cuda_graphs else args.lr
        self.optimizer = build_optimizer(self.model, args, self.device, self.lr)
        self.augment = BatchAugment(args.crop_padding, args.flip, args.erasing, self.preprocess.image_size)
        augment, workers = args.augment, args.augment_workers
        self.policy_feed = PolicyFeed(augment, self.train_set.images, workers) if augment != "none" else None
        classes = len(self.train_set.classes)
        self.mix = BatchMix(args.mixup, args.cutmix, classes) if args.mixup or args.cutmix else None
        if args.compile:
            self.network = torch.compile(self.network)
        self.step = GraphedStep(self.optimizer_step) if args.cuda_graphs else self.optimizer_step
        self.sampler = DistributedSampler(
            self.train_set, num_replicas=distributed.world_size, rank=distributed.rank, shuffle=True, seed=args.seed
        )
        self.steps_per_epoch = math.ceil(self.sampler.num_samples / self.rank_batch_size)
        self.start_epoch = 0
        self.saved_epochs = 0  # epochs that --resume would not train again
        self.elapsed = 0.0  # training wall time, summed over resumed runs
        self.train_images = self.train_set.images.to(self.device)
        self.train_labels = self.train_set.labels.to(self.device)

    @property
    def out_dir(self) -> Path:
        return self.args.out_dir

    def load_teacher(self) -> tuple[nn.Module, dict]:
        """The --teacher on this run's device, and its lineage for the checkpoint's metadata."""
        path = self.args.teacher
        try:
            teacher = load_teacher(path, self.device)
        except CheckpointError as error:
            raise SystemExit(f"vit-train: --teacher: {error}") from error
        if teacher.classes != self.train_set.classes or teacher.preprocess != self.preprocess:
            raise SystemExit(
                f"vit-train: --teacher: {path} was trained on other data: classes {teacher.classes} and preprocessing "
                f"{teacher.preprocess.to_dict()}, here {self.train_set.classes} and {self.preprocess.to_dict()}"
            )
        return teacher.model, {"path": str(path), "sha256": file_sha256(path), "training": teacher.training}

    @property
    def shipped_model(self) -> nn.Module:
        """The weights that are evaluated and written: the EMA when there is one."""
        return self.ema.model if self.ema else self.model

    def set_learning_rate(self, step: int) -> None:
        args = self.args
        lr = learning_rate(
            step,
            args.epochs * self.steps_per_epoch,
            int(args.warmup_epochs * self.steps_per_epoch),
            args.lr,
            args.min_lr,
        )
        if isinstance(self.lr, torch.Tensor):
            self.lr.fill_(lr)  # no wait on the host: the fill is queued before the step that reads it
        else:
            for group in self.optimizer.param_groups:
                group["lr"] = lr

    def epoch_seed(self, epoch: int) -> int:
        return epoch_seed(self.args.seed, epoch, self.distributed.rank)

    def epoch_plan(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's image indices for the epoch and their augmentation choices, on the CPU."""
        self.sampler.set_epoch(epoch)
        indices = repeated(
            torch.tensor(list(self.sampler), dtype=torch.int64), self.rank_batch_size, self.args.repeated_aug
        )
        if self.args.compile or self.args.cuda_graphs:
            # One batch shape: one compilation, one graph. Fill the last batch up from the epoch's start.
            indices = torch.cat([indices, indices[: -len(indices) % self.rank_batch_size]])
        generator = torch.Generator().manual_seed(self.epoch_seed(epoch))
        return indices, self.augment.draw(len(indices), generator)

    def epoch_images(self, epoch: int, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The epoch's images, (M, C, H, W) uint8 on the device, and the row of each of its N places in them:
        `images[rows[batch]]` is a batch in the epoch's order.

        Without a policy, they are the training images, gathered a batch at a time: gathered whole, the
        epoch was a second copy of the training set. The policy's workers give the epoch's images in its
        order, and start on the next epoch as soon as this one's are handed over."""
        if self.policy_feed is None:
            return self.train_images, indices.to(self.device)
        if epoch not in self.policy_feed.pending:
            self.policy_feed.submit(epoch, indices, self.epoch_seed(epoch))
        images = self.policy_feed.result(epoch).to(self.device, non_blocking=True)
        if epoch + 1 < self.args.epochs:
            next_indices, _ = self.epoch_plan(epoch + 1)
            self.policy_feed.submit(epoch + 1, next_indices, self.epoch_seed(epoch + 1))
        return images, torch.arange(len(images), device=self.device)

    def train_step(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on class indices (B,) or, mixed, class probabilities (B, classes), and the
        EMA's update: its decay changes at every step, so it stays out of a CUDA graph."""
        loss, hits = self.step(images, targets)
        if self.ema:
            self.ema.update(self.model)
        return loss, hits

    def optimizer_step(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward, backward and AdamW: what --cuda-graphs captures. Returns the loss summed over the batch
        and the number of top-1 hits, as device tensors."""
        with autocast(self.device, cache=not self.args.cuda_graphs):
            logits = self.network(images).float()
        loss = F.cross_entropy(logits, targets, label_smoothing=self.args.label_smoothing)
        if self.teacher is not None:
            with torch.no_grad(), autocast(self.device, cache=not self.args.cuda_graphs):
                teacher_logits = self.teacher(images).float()
            weight = self.args.distill_weight
            distilled = distillation_loss(logits, teacher_logits, self.args.distill_temperature)
            loss = (1 - weight) * loss + weight * distilled
        self.optimizer.zero_grad(set_to_none=True)  # in a graph: backward then writes the graph's own gradients
        loss.backward()
        self.optimizer.step()
        labels = targets.argmax(1) if targets.ndim == 2 else targets
        return loss.detach() * len(labels), (logits.argmax(1) == labels).sum()

    def train_batch(
        self, images: torch.Tensor, targets: torch.Tensor, choices: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment (B, C, H, W) uint8 images on the device and take one step; nothing waits on the host."""
        images = self.augment.crop_and_flip(images, choices)
        images = self.augment.erase(normalize(images, self.preprocess), choices)
        if self.mix:
            images, targets = self.mix(images, targets)
        return self.train_step(images, targets)

    def train_epoch(self, epoch: int) -> dict:
        self.model.train()
        torch.manual_seed(self.epoch_seed(epoch))  # stochastic depth
        indices, choices = self.epoch_plan(epoch)
        images, rows = self.epoch_images(epoch, indices)
        indices, choices = indices.to(self.device), choices.to(self.device)
        total_loss = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device)
        steps = tqdm(
            range(self.steps_per_epoch),
            desc=f"epoch {epoch + 1}/{self.args.epochs}",
            leave=False,
            disable=None if self.distributed.is_main else True,
        )  # None: only on a terminal
        for step in steps:
            self.set_learning_rate(epoch * self.steps_per_epoch + step)
            batch = slice(step * self.rank_batch_size, (step + 1) * self.rank_batch_size)
            loss, hits = self.train_batch(images[rows[batch]], self.train_labels[indices[batch]], choices[batch])
            total_loss += loss
            correct += hits
        loss_sum, correct_sum, seen = self.distributed.sum(
            total_loss, correct, torch.tensor(len(indices), device=self.device)
        )
        return {
            "train_loss": loss_sum / seen,
            "train_accuracy": correct_sum / seen,
            "lr": float(self.optimizer.param_groups[0]["lr"]),
        }

    def run(self) -> None:
        if self.start_epoch == self.args.epochs:  # a finished run resumed: nothing to train, and nothing changes
            if self.distributed.is_main:
                print(
                    f"{self.out_dir}: all {self.args.epochs} epochs are done; a larger --epochs trains on",
                    file=sys.stderr,
                )
            return
        if self.distributed.is_main:
            print(
                f"{count_parameters(self.model):,} parameters on {self.device} x {self.distributed.world_size}; "
                f"{len(self.train_set)} train / {len(self.test_set)} test images; "
                f"epochs {self.start_epoch + 1}..{self.args.epochs}",
                file=sys.stderr,
            )
        run_started, record = time.perf_counter(), None
        for epoch in range(self.start_epoch, self.args.epochs):
            epoch_started = time.perf_counter()
            record = {"epoch": epoch + 1, "epochs_planned": self.args.epochs, **self.train_epoch(epoch)}
            self.elapsed += time.perf_counter() - epoch_started
            if self.distributed.is_main:  # one process evaluates and writes
                test_loss, test_accuracy = evaluate(self.shipped_model, self.test_set, self.preprocess, self.device)
                record.update(test_loss=test_loss, test_accuracy=test_accuracy, elapsed_s=round(self.elapsed, 1))
                tqdm.write(epoch_line(record, self.args.epochs), file=sys.stderr)
                with signals_held():
                    self.save(epoch, record)
            now = time.perf_counter()
            if epoch + 1 < self.args.epochs and self.out_of_time(now - run_started + (now - epoch_started)):
                if self.distributed.is_main:
                    print(
                        f"stopped after epoch {epoch + 1} of {self.args.epochs}: another would end past "
                        f"--stop-after {self.args.stop_after:g} s; --resume continues",
                        file=sys.stderr,
                    )
                break
        if self.distributed.is_main:  # once per run: Matplotlib costs more than a GPU epoch of the tiny model
            plot_training_curves(read_metrics(self.out_dir / METRICS_NAME), self.out_dir / CURVES_NAME)
        if self.distributed.is_main and record is not None:
            checkpoint = self.out_dir / CHECKPOINT_NAME
            use = f"--teacher {checkpoint}" if self.args.model in TEACHERS else f"VIT_CHECKPOINT={checkpoint} vit-serve"
            print(
                f"{checkpoint}: epoch {record['epoch']} of {self.args.epochs}, {100 * record['test_accuracy']:.2f} % "
                f"top-1 on the {len(self.test_set)} test images; curves in {self.out_dir / CURVES_NAME}; use it: {use}",
                file=sys.stderr,
            )

    def close(self) -> None:
        """Stop the policy's workers, if any."""
        if self.policy_feed is not None:
            self.policy_feed.close()

    def out_of_time(self, projected_s: float) -> bool:
        """Whether a run that would have spent `projected_s` after one more epoch must stop now; every
        process decides alike, or one would wait forever for the others at the next all-reduce."""
        if self.args.stop_after is None:
            return False
        (votes,) = self.distributed.sum(torch.tensor(float(projected_s > self.args.stop_after), device=self.device))
        return votes > 0

    def training_facts(self, record: dict) -> dict:
        device = (
            torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else platform.processor() or "cpu"
        )
        return {
            **({"name": self.args.name} if self.args.name else {}),
            "dataset": self.args.dataset,
            "epochs": record["epoch"],
            "test_accuracy": record["test_accuracy"],
            "train_images": len(self.train_set),
            "test_images": len(self.test_set),
            "wall_time_s": round(self.elapsed, 1),
            "device": device,
            "processes": self.distributed.world_size,
            "backend": dist.get_backend() if self.distributed.in_group else None,  # nccl or gloo under torchrun
            "command": shlex.join(["python", "-m", "model.train", *self.command_line]),
            # Paths absolute: vit-evaluate finds the data from wherever it runs, not only from where this ran.
            "recipe": {key: str(v.absolute()) if isinstance(v, Path) else v for key, v in vars(self.args).items()},
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "init_from": self.parent,
            "teacher": self.teacher_facts,
        }

    def save(self, epoch: int, record: dict) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = self.out_dir / METRICS_NAME
        with open(metrics_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        facts, classes = self.training_facts(record), self.train_set.classes
        if self.args.model in TEACHERS:
            save_teacher(
                self.out_dir / CHECKPOINT_NAME,
                self.shipped_model,
                self.args.model,
                self.preprocess.channels,
                classes,
                self.preprocess,
                facts,
            )
        else:
            save_checkpoint(self.out_dir / CHECKPOINT_NAME, self.shipped_model, classes, self.preprocess, facts)
        state = {
            "epoch": epoch,
            "elapsed": self.elapsed,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
        }
        save_state(state, self.out_dir / STATE_NAME, tag=f"e{epoch + 1:04d}")
        self.saved_epochs = epoch + 1

    def resume(self) -> None:
        path = self.out_dir / STATE_NAME
        if not path.exists():
            raise SystemExit(f"vit-train: --resume: {path} does not exist")
        state = load_state(path, self.device)
        self.load_saved_model(path, state["model"])
        load_optimizer_state(self.optimizer, state["optimizer"], self.lr)
        if state["ema"] is not None and not self.ema:  # resuming would ship the raw weights instead of the EMA
            decay = state["ema"].get("decay")
            raise SystemExit(
                f"vit-train: --resume: {path} was trained with --ema-decay {decay}; pass it again to keep its EMA"
            )
        if self.ema:
            if state["ema"] is None:
                raise SystemExit(f"vit-train: --resume: {path} was trained without --ema-decay")
            self.ema.load_state_dict(state["ema"])
        self.start_epoch = self.saved_epochs = state["epoch"] + 1
        if self.start_epoch > self.args.epochs:  # it trained on with "epochs 4..2", and changed nothing
            raise SystemExit(
                f"vit-train: --resume: {path} has trained {self.start_epoch} epochs, more than --epochs "
                f"{self.args.epochs}; pass the run's --epochs, or more to train on"
            )
        self.elapsed = state["elapsed"]
        if self.distributed.is_main:
            self.trim_metrics(self.start_epoch)

    def load_saved_model(self, path: Path, weights: dict[str, torch.Tensor]) -> None:
        """The saved run's weights, refused in one line where that run is not this one: on other classes,
        which a renamed or added class folder makes (of as many classes, the weights would load and each
        output mean another class), or another model (load_state_dict's traceback)."""
        saved = self.out_dir / CHECKPOINT_NAME  # written beside the state at every epoch, with the classes
        facts = decoded(saved, read_raw_metadata(saved), ("classes", "training")) if saved.exists() else {}
        classes = facts.get("classes")
        if classes is not None and classes != self.train_set.classes:
            now = self.train_set.classes
            new, gone = sorted(set(now) - set(classes)), sorted(set(classes) - set(now))
            changes = [f"{word}: {some_of(names)}" for word, names in (("new", new), ("gone", gone)) if names]
            raise SystemExit(
                f"vit-train: --resume: {path} was trained on the classes {some_of(classes)}, and the data now has "
                f"{some_of(now)}" + (f" ({'; '.join(changes)})" if changes else "")
            )
        try:
            self.model.load_state_dict(weights)
        except RuntimeError as error:
            mismatches = "; ".join(line.strip() for line in str(error).splitlines()[1:] if line.strip())
            mismatches = mismatches if len(mismatches) <= 300 else mismatches[:300] + " ..."
            raise SystemExit(
                f"vit-train: --resume: {path} holds another model than this command builds ({started_with(facts)}): "
                f"{mismatches}"
            ) from None

    def trim_metrics(self, epochs_done: int) -> None:
        """Drop log lines of epochs after the saved state, written before a crash."""
        path = self.out_dir / METRICS_NAME
        if path.exists():
            kept = [record for record in read_metrics(path) if record["epoch"] <= epochs_done]
            path.write_text("".join(json.dumps(record) + "\n" for record in kept))


def started_with(facts: dict) -> str:
    """The options that built a saved run's model, as its checkpoint's recipe records them, to pass again."""
    recipe = (facts.get("training") or {}).get("recipe") or {}
    if recipe.get("init_from"):
        options = f"--init-from {recipe['init_from']}"
    elif recipe.get("model"):
        options = f"--model {recipe['model']} --patch-size {recipe.get('patch_size')}"
        options += f" --image-size {recipe.get('image_size')}" if recipe.get("dataset") == "imagefolder" else ""
    else:
        return "pass the run's --model, --patch-size and --image-size, or its --init-from, again"
    return f"the run was started with {options}; pass that again"


def check_distillation(args: argparse.Namespace) -> None:
    """Refuse the combinations that cannot mean what they say, before any data is read."""
    if args.model in TEACHERS and (args.teacher or args.init_from):
        flag = "--teacher" if args.teacher else "--init-from"
        raise SystemExit(f"vit-train: {flag} trains a ViT; --model {args.model} is a teacher, trained on its own")


def initialise_from(model: VisionTransformer, path: Path, classes: list[str]) -> dict:
    """Copy a checkpoint's weights into `model`, a ViT for `classes`, and return its lineage for the new
    checkpoint's metadata.

    The architecture must match. The head is the checkpoint's where it has the same classes, its rows put
    in this run's order where they come in another; otherwise it keeps its fresh initialisation, which is
    how a model trained on one dataset starts another. A head of as many classes of other names used to be
    copied, its rows meaning the checkpoint's classes, and one of the same names in another order (a
    folder's sorted names against a dataset's own order) started each class on another's row.
    """
    try:
        parent = load_checkpoint(path)
    except CheckpointError as error:
        raise SystemExit(f"vit-train: --init-from: {error}") from error
    ours, theirs = model.config.to_dict(), parent.model.config.to_dict()
    different = [key for key in ours if key not in ("drop_path", "num_classes") and ours[key] != theirs[key]]
    if different:
        raise SystemExit(
            f"vit-train: --init-from: {path} has a different architecture: "
            + ", ".join(f"{key} {theirs[key]} (here {ours[key]})" for key in different)
        )
    weights = parent.model.state_dict()
    if parent.classes == classes:
        head = "kept"
    elif sorted(parent.classes) == sorted(classes):
        head = "reordered"
        rows = torch.tensor([parent.classes.index(name) for name in classes])
        weights |= {name: weights[name][rows] for name in ("head.weight", "head.bias")}
    else:
        head = "new"
        weights = {name: tensor for name, tensor in weights.items() if not name.startswith("head.")}
    missing, _ = model.load_state_dict(weights, strict=False)
    assert all(name.startswith("head.") for name in missing), missing
    return {"path": str(path), "sha256": file_sha256(path), "head": head, "training": parent.training}


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Terminated(BaseException):  # as KeyboardInterrupt is: no `except Exception` on the way may keep it
    """SIGTERM (docker stop, a scheduler taking the machine back, timeout), raised where the run is, as Ctrl-C's
    KeyboardInterrupt is: the process used to end without a word about what it had saved."""


def _terminated(signum: int, frame: object) -> None:
    raise Terminated


@contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait for the block to end, and then stop the run as they would have.

    Around an epoch's save: its log line, checkpoint and state are written whole and together, and the
    line that a stop prints names the epoch they hold. A signal that came as the state was written
    used to stop the run before it was counted, and the line named the epoch before the one on disk."""
    if threading.current_thread() is not threading.main_thread():  # where Python lets no handler be set
        yield
        return
    caught: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    before = {signum: signal.signal(signum, lambda signum, frame: caught.append(signum)) for signum in held}
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
    if caught:
        handler = before[caught[0]]
        if callable(handler):
            handler(caught[0], None)  # KeyboardInterrupt, or Terminated
        elif handler == signal.SIG_DFL:
            os.kill(os.getpid(), caught[0])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    check_out_dir(args)
    if (warning := warmup_warning(args)) is not None:
        print(warning, file=sys.stderr)
    torch.backends.cuda.matmul.allow_tf32 = True
    distributed = Distributed.from_environment(args.device)
    if distributed.is_main and args.dataset == "imagefolder" and (note := unread_pictures(args.data_dir)):
        print(f"vit-train: note: {note}", file=sys.stderr)
    trainer = None
    handles_sigterm = threading.current_thread() is threading.main_thread()  # where Python lets it set a handler
    before = signal.signal(signal.SIGTERM, _terminated) if handles_sigterm else None
    try:
        try:
            trainer = Trainer(args, argv, distributed)
        except DatasetError as error:
            raise SystemExit(f"vit-train: {error}") from None
        try:
            if args.resume:
                trainer.resume()
            elif distributed.is_main and (args.out_dir / METRICS_NAME).exists():
                (args.out_dir / METRICS_NAME).unlink()  # a fresh run starts a fresh log
            trainer.run()
        finally:
            trainer.close()
        if distributed.in_group:
            dist.barrier()  # leave together: a rank that tears gloo down while another still works can abort
    except (KeyboardInterrupt, Terminated) as stop:  # where the run stands, not a traceback of wherever it was
        if distributed.is_main:
            how = "interrupted" if isinstance(stop, KeyboardInterrupt) else "terminated"
            print(f"vit-train: {how}; {interrupted_run(trainer)}", file=sys.stderr)
        raise SystemExit(128 + (signal.SIGINT if isinstance(stop, KeyboardInterrupt) else signal.SIGTERM)) from None
    finally:
        if handles_sigterm:  # the caller's handler again (pytest's, when the tests call main)
            signal.signal(signal.SIGTERM, signal.SIG_DFL if before is None else before)
        if distributed.in_group:
            dist.destroy_process_group()


def interrupted_run(trainer: Trainer | None) -> str:
    """Where a run stopped by Ctrl-C or SIGTERM stands."""
    if trainer is None:
        return "no epoch had begun"
    if not trainer.saved_epochs:
        return "no epoch had ended, so nothing of this run is saved"
    return (
        f"{trainer.out_dir} holds the run up to epoch {trainer.saved_epochs} of {trainer.args.epochs}, its checkpoint "
        "included; --resume continues it"
    )


if __name__ == "__main__":
    main()
