"""vit-train's run: the model and data that its options ask for (model/train_options.py), trained epoch by epoch.

Every epoch ends with an evaluation, a line in ``metrics.jsonl``, the checkpoint (``model.safetensors``)
and the resumable state (``state.pt``); the run ends with the training curves (``metrics.png``), all in ``--out-dir``.
``--resume`` continues from that state exactly, and ``--stop-after`` ends a run cleanly in time for a window
of machine time to close, so that a long run goes in pieces. Under ``torchrun`` it trains with DDP.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import signal
import sys
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from model.checkpoint import load_checkpoint, save_checkpoint
from model.data import (
    BUILT_IN_CLASSES,
    BatchAugment,
    BatchMix,
    DatasetError,
    Decoder,
    ImageDataset,
    MissingExtra,
    channel_statistics,
    default_preprocess,
    load_dataset,
    loose_pictures,
    repeated,
    resized,
    unread_pictures,
)
from model.decoded_cache import DECODED_FOLDER, DecodedCache
from model.device import DEVICE_DATA_SHARE, autocast, fits_on_device
from model.distributed import Distributed
from model.ema import ModelEma
from model.evaluate import evaluate
from model.files import WriteError, written
from model.graphed_step import GraphedStep
from model.images import PreprocessConfig, own_files_pixel_limit
from model.metadata import CheckpointError, decoded, file_sha256, read_raw_metadata, some_of
from model.optimizer import build_optimizer, learning_rate, load_optimizer_state
from model.plots import plot_training_curves
from model.policy_feed import PolicyFeed
from model.preprocess import normalize
from model.run_state import StateError, load_state, save_state
from model.stop_signals import Terminated, raise_terminated, signals_held
from model.teacher import TEACHERS, build_teacher, distillation_loss, load_teacher, save_teacher
from model.train_options import (
    CHECKPOINT_NAME,
    CURVES_NAME,
    METRICS_NAME,
    PRESETS,
    STATE_NAME,
    check_distillation,
    check_out_dir,
    parent_facts,
    parse_args,
    run_name,
    starts_from_checkpoint,
    warmup_warning,
)
from model.vit import VisionTransformer, ViTConfig, count_parameters, resample_position_embedding


def build_model(
    args: argparse.Namespace, preprocess: PreprocessConfig, num_classes: int, parent: dict | None = None
) -> nn.Module:
    """The ViT of `parent`'s architecture (the --init-from checkpoint's config) or of --model's preset, or
    the convolutional teacher that --model names."""
    if args.model in TEACHERS:
        return build_teacher(args.model, preprocess.channels, num_classes)
    if parent is not None:
        changed = {"image_size": preprocess.image_size, "num_classes": num_classes, "drop_path": args.drop_path}
        return VisionTransformer(ViTConfig(**parent | changed))
    config = ViTConfig(
        image_size=preprocess.image_size,
        patch_size=args.patch_size,
        in_channels=preprocess.channels,
        num_classes=num_classes,
        drop_path=args.drop_path,
        **PRESETS[args.model],
    )
    return VisionTransformer(config)


def epoch_line(record: dict, epochs: int) -> str:
    """One epoch, as a person reads it; metrics.jsonl keeps the full record."""
    return (
        f"epoch {record['epoch']}/{epochs}"
        f"  train loss {record['train_loss']:.3f} acc {100 * record['train_accuracy']:.2f} %"
        f"  test loss {record['test_loss']:.3f} acc {100 * record['test_accuracy']:.2f} %"
        f"  lr {record['lr']:.2e}  {record['elapsed_s']:.1f} s"
    )


def load_data(
    args: argparse.Namespace, parent: PreprocessConfig | None = None, decode: Decoder | None = None
) -> tuple[ImageDataset, ImageDataset, PreprocessConfig]:
    """The splits, and the preprocessing that the run trains with and its checkpoint records. A run from a
    checkpoint keeps that checkpoint's, `parent` (its mean and std, resize filter and centre crop): its weights
    learned from images prepared so, and a pretrained timm model's are ImageNet's, as timm fine-tunes.
    Fashion-MNIST's and CIFAR-10's images are whole pictures at the model's size, never cropped, so a
    model trained on them is served uploads resized whole, whatever the checkpoint cropped. An image folder's
    files are decoded by `decode` (the run's DecodedCache), by default decode_files."""
    if parent is None:
        preprocess = default_preprocess(args.dataset, args.image_size, args.channels)
    elif args.dataset == "imagefolder":
        preprocess = replace(parent, image_size=args.image_size)
    else:
        preprocess = replace(parent, image_size=args.image_size, crop_pct=None)

    def split(name: str, limit: int | None, classes: list[str] | None = None) -> ImageDataset:
        return load_dataset(
            args.dataset, name, args.data_dir, preprocess, args.val_fraction, args.seed, classes, limit, decode
        )

    train = split("train", args.train_limit)
    test = split("test", args.test_limit, train.classes)  # labelled alike, without walking the training tree again
    if train.images.shape[-1] != preprocess.image_size:  # a built-in dataset, for a checkpoint of another size
        train, test = resized(train, preprocess, args.dataset, "train"), resized(test, preprocess, args.dataset, "test")
    if args.dataset == "imagefolder" and parent is None:  # a user's own images: standardise with their own statistics
        mean, std = channel_statistics(train.images)
        if not any(std):  # torchvision's Normalize refuses a std of 0 too: it divides by it
            raise DatasetError(
                f"{args.data_dir}: the {len(train)} training images are one flat colour, the same in all of them; "
                "there is nothing to learn from"
            )
        # A channel that is the same in every image (blue, in drawings in red and green) is centred and left
        # unscaled, as scikit-learn's StandardScaler leaves a feature without variance.
        std = tuple(value or 1.0 for value in std)
        preprocess = PreprocessConfig(preprocess.image_size, preprocess.channels, mean, std, preprocess.resize)
    return train, test, preprocess


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
        decode = DecodedCache(
            args.out_dir / DECODED_FOLDER, distributed.decode, distributed.all_agree, writes=distributed.is_main
        )
        self.train_set, self.test_set, self.preprocess = load_data(args, preprocess, decode)
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
        epoch_bytes = self.epoch_bytes()
        self.images_on_device = fits_on_device(epoch_bytes, self.device)
        if not self.images_on_device and distributed.is_main:
            print(
                f"vit-train: the training images take {epoch_bytes / 2**30:.1f} GiB, more than "
                f"{DEVICE_DATA_SHARE:.0%} of what {self.device} has free; they stay in host memory, and each batch "
                "is copied over",
                file=sys.stderr,
            )
        # With a policy, the epoch's augmented images are what the steps read, not these.
        on_device = self.images_on_device and self.policy_feed is None
        self.train_images = self.train_set.images.to(self.device) if on_device else self.train_set.images
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
        theirs, ours = teacher.preprocess.to_dict(), self.preprocess.to_dict()
        differences = [
            f"{key} {shown(theirs.get(key))}, here {shown(ours.get(key))}"
            for key in dict.fromkeys([*theirs, *ours])
            if theirs.get(key) != ours.get(key)
        ]
        if teacher.classes != self.train_set.classes:
            differences.insert(0, f"classes {some_of(teacher.classes)}, here {some_of(self.train_set.classes)}")
        if differences:  # the teacher sees this run's inputs, standardised as its own were
            raise SystemExit(f"vit-train: --teacher: {path} was trained on other data: {'; '.join(differences)}")
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

    def epoch_bytes(self) -> int:
        """What the images that an epoch's steps read take: the training set, or with a policy the epoch's
        augmented images (as many as its steps take)."""
        count = self.steps_per_epoch * self.rank_batch_size if self.policy_feed else len(self.train_set)
        return count * self.train_set.images[0].nbytes

    def epoch_images(self, epoch: int, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The epoch's images, (M, C, H, W) uint8, and the row of each of its N places in them, both on the
        device or both in host memory (images_on_device): `images[rows[batch]]` is a batch in the epoch's order.

        Without a policy, they are the training images, gathered a batch at a time: gathered whole, the
        epoch was a second copy of the training set. The policy's workers give the epoch's images in its
        order, and start on the next epoch as soon as this one's are handed over."""
        if self.policy_feed is None:
            return self.train_images, indices.to(self.train_images.device)
        if epoch not in self.policy_feed.pending:
            self.policy_feed.submit(epoch, indices, self.epoch_seed(epoch))
        to_gpu = self.images_on_device and self.device.type == "cuda"
        images = self.policy_feed.result(epoch, pinned=to_gpu)
        if to_gpu:
            images = images.to(self.device, non_blocking=True)
        if epoch + 1 < self.args.epochs:
            next_indices, _ = self.epoch_plan(epoch + 1)
            self.policy_feed.submit(epoch + 1, next_indices, self.epoch_seed(epoch + 1))
        return images, torch.arange(len(images), device=images.device)

    def batch_images(self, images: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """`images[rows]` on the device: gathered there, or gathered in host memory and copied over (pinned
        on a GPU, so that the copy does not make the host wait)."""
        batch = images[rows]
        if self.device.type == "cuda" and not batch.is_cuda:
            return batch.pin_memory().to(self.device, non_blocking=True)
        return batch

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
            batch_images = self.batch_images(images, rows[batch])
            loss, hits = self.train_batch(batch_images, self.train_labels[indices[batch]], choices[batch])
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
            with written(self.out_dir / CURVES_NAME) as path:
                plot_training_curves(read_metrics(self.out_dir / METRICS_NAME), path)
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
        return not self.distributed.all_agree(projected_s <= self.args.stop_after)

    @property
    def recipe(self) -> dict:
        """The run's options, as its checkpoint and its state record them. Paths absolute: vit-evaluate finds
        the data from wherever it runs, not only from where this ran."""
        return {key: str(v.absolute()) if isinstance(v, Path) else v for key, v in vars(self.args).items()}

    def training_facts(self, record: dict) -> dict:
        device = (
            torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else platform.processor() or "cpu"
        )
        return {
            **({"name": name} if (name := self.args.name or run_name(self.args.out_dir)) else {}),
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
            "recipe": self.recipe,
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "init_from": self.parent,
            "teacher": self.teacher_facts,
        }

    def save(self, epoch: int, record: dict) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.write_metrics([*read_metrics(self.out_dir / METRICS_NAME), record])
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
            "recipe": self.recipe,  # for --resume on a machine given only the state files (run_recipe)
        }
        save_state(state, self.out_dir / STATE_NAME, tag=f"e{epoch + 1:04d}")
        self.saved_epochs = epoch + 1

    def resume(self) -> None:
        path = self.out_dir / STATE_NAME  # check_out_dir has found it there
        try:
            state = load_state(path, self.device)
        except StateError as error:
            raise SystemExit(f"vit-train: --resume: {error}; --force starts over") from None
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
        if (path := self.out_dir / METRICS_NAME).exists():
            self.write_metrics([record for record in read_metrics(path) if record["epoch"] <= epochs_done])

    def write_metrics(self, records: list[dict]) -> None:
        """The log whole, a line per epoch: an appended line that a full disk cut short was a line that no
        --resume could read."""
        with written(self.out_dir / METRICS_NAME) as path:
            path.write_text("".join(json.dumps(record) + "\n" for record in records))


def shown(value: object) -> str:
    """A preprocessing value in a sentence: a mean or std to 4 digits, as (0.2860,) rather than 0.28604...;
    None, a value that one side does not have (crop_pct), as none."""
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(f"{number:.4g}" for number in value) + ("," if len(value) == 1 else "") + ")"
    return "none" if value is None else str(value)


def started_with(facts: dict) -> str:
    """The options that built a saved run's model, as its checkpoint's recipe records them, to pass again."""
    recipe = (facts.get("training") or {}).get("recipe") or {}
    if recipe.get("init_from"):
        options = f"--init-from {recipe['init_from']}"
    elif recipe.get("model"):
        options = f"--model {recipe['model']} --patch-size {recipe.get('patch_size')}"
    else:
        return "pass the run's --model, --patch-size and --image-size, or its --init-from, again"
    dataset = recipe.get("dataset")
    if recipe.get("image_size") != (default_preprocess(dataset).image_size if dataset in BUILT_IN_CLASSES else None):
        options += f" --image-size {recipe.get('image_size')}"  # a folder's, or a built-in dataset's resized
    return f"the run was started with {options}; pass that again"


def initialise_from(model: VisionTransformer, path: Path, classes: list[str]) -> dict:
    """Copy a checkpoint's weights into `model`, a ViT for `classes`, and return its lineage for the new
    checkpoint's metadata.

    The architecture must match, but for the image size: the position embedding is resampled to this model's
    patch grid (model/vit.py), once, as timm does where it loads weights for another img_size. The head is
    the checkpoint's where it has the same classes, its rows put in this run's order where they come in
    another; otherwise it keeps its fresh initialisation, which is how a model trained on one dataset
    starts another. A head of as many classes of other names used to be copied, its rows meaning the
    checkpoint's classes, and one of the same names in another order (a folder's sorted names against a
    dataset's own order) started each class on another's row.
    """
    try:
        parent = load_checkpoint(path)
    except CheckpointError as error:
        raise SystemExit(f"vit-train: --init-from: {error}") from error
    ours, theirs = model.config.to_dict(), parent.model.config.to_dict()
    changes = ("drop_path", "num_classes", "image_size")
    different = [key for key in ours if key not in changes and ours[key] != theirs[key]]
    if different:
        raise SystemExit(
            f"vit-train: --init-from: {path} has a different architecture: "
            + ", ".join(f"{key} {theirs[key]} (here {ours[key]})" for key in different)
        )
    weights = parent.model.state_dict()
    if (grid := model.config.grid_size) != parent.model.config.grid_size:
        weights["pos_embed"] = resample_position_embedding(weights["pos_embed"], grid, grid)
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
    """The epochs' records of a run's metrics.jsonl; none before its first epoch has ended."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


@own_files_pixel_limit()
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    check_out_dir(args)
    if (warning := warmup_warning(args)) is not None:
        print(warning, file=sys.stderr)
    torch.backends.cuda.matmul.allow_tf32 = True
    distributed = Distributed.from_environment(args.device)
    trainer = None
    handles_sigterm = threading.current_thread() is threading.main_thread()  # where Python lets it set a handler
    before = signal.signal(signal.SIGTERM, raise_terminated) if handles_sigterm else None
    try:
        try:
            if distributed.is_main and args.dataset == "imagefolder":
                for note in filter(None, (unread_pictures(args.data_dir), loose_pictures(args.data_dir))):
                    print(f"vit-train: note: {note}", file=sys.stderr)
            trainer = Trainer(args, argv, distributed)
        except DatasetError as error:
            raise SystemExit(f"vit-train: {error}") from None
        try:
            if args.resume:
                trainer.resume()
            elif distributed.is_main and (args.out_dir / METRICS_NAME).exists():
                (args.out_dir / METRICS_NAME).unlink()  # a fresh run starts a fresh log
            trainer.run()
        except WriteError as error:
            raise SystemExit(f"vit-train: {error}; {saved_run(trainer)}") from None
        finally:
            trainer.close()
        if distributed.in_group:
            dist.barrier()  # leave together: a rank that tears gloo down while another still works can abort
    except MissingExtra as error:  # an option's package, found missing as the run is set up or as it starts
        raise SystemExit(f"vit-train: {error}") from None
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
    return saved_run(trainer) if trainer.saved_epochs else "no epoch had ended, so nothing of this run is saved"


def saved_run(trainer: Trainer) -> str:
    """What of a stopped run is on disk."""
    if not trainer.saved_epochs:
        return "nothing of this run is saved"
    return (
        f"{trainer.out_dir} holds the run up to epoch {trainer.saved_epochs} of {trainer.args.epochs}, its checkpoint "
        "included; --resume continues it"
    )


if __name__ == "__main__":
    main()
