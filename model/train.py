"""Train a ViT and write a checkpoint: ``python -m model.train --dataset fashion-mnist --epochs 30``.

Every epoch ends with an evaluation, a line in ``metrics.jsonl``, the checkpoint (``model.safetensors``)
and the resumable state (``state.pt``), all in ``--out-dir``. ``--resume`` continues from that state.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from model.checkpoint import save_checkpoint
from model.data import DATASETS, BatchAugment, ImageDataset, channel_statistics, default_preprocess, load_dataset
from model.device import autocast, resolve_device
from model.evaluate import evaluate
from model.preprocess import PreprocessConfig, normalize
from model.vit import ViTConfig, VisionTransformer, count_parameters, no_weight_decay_names

PRESETS = {
    "nano": dict(dim=64, depth=4, num_heads=2, mlp_ratio=2.0),  # 0.1 M parameters
    "tiny": dict(dim=128, depth=6, num_heads=4, mlp_ratio=2.0),  # 0.8 M
    "small": dict(dim=192, depth=8, num_heads=6, mlp_ratio=2.0),  # 2.4 M
}
CHECKPOINT_NAME = "model.safetensors"
STATE_NAME = "state.pt"
METRICS_NAME = "metrics.jsonl"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dataset", choices=DATASETS, default="fashion-mnist")
    parser.add_argument("--data-dir", type=Path, help="dataset folder (Fashion-MNIST: Debian's files by default)")
    parser.add_argument("--image-size", type=int, default=32, help="imagefolder only: side of the square input")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=3, help="imagefolder only")
    parser.add_argument("--model", choices=PRESETS, default="tiny", help="size preset")
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=88)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of AdamW")
    parser.add_argument("--min-lr", type=float, default=1e-5, help="learning rate at the end of the cosine")
    parser.add_argument("--weight-decay", type=float, default=0.05, help="not applied to tokens, norms and biases")
    parser.add_argument("--warmup-epochs", type=float, default=5.0)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth rate of the last block")
    parser.add_argument("--crop-padding", type=int, default=2, help="random crop after zero padding by this much")
    parser.add_argument("--no-flip", dest="flip", action="store_false", help="turn off random horizontal flips")
    parser.add_argument("--erasing", type=float, default=0.25, help="probability of random erasing")
    parser.add_argument("--train-limit", type=int, help="use only the first N training images")
    parser.add_argument("--test-limit", type=int, help="evaluate on the first N test images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/latest"))
    parser.add_argument("--resume", action="store_true", help=f"continue from OUT_DIR/{STATE_NAME}")
    return parser.parse_args(argv)


def build_model(args: argparse.Namespace, preprocess: PreprocessConfig, num_classes: int) -> VisionTransformer:
    config = ViTConfig(
        image_size=preprocess.image_size,
        patch_size=args.patch_size,
        in_channels=preprocess.channels,
        num_classes=num_classes,
        drop_path=args.drop_path,
        **PRESETS[args.model],
    )
    return VisionTransformer(config)


def build_optimizer(model: VisionTransformer, args: argparse.Namespace, device: torch.device) -> torch.optim.AdamW:
    skip = no_weight_decay_names(model)
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if n not in skip], "weight_decay": args.weight_decay},
        {"params": [p for n, p in named if n in skip], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=args.lr, fused=device.type == "cuda")


def learning_rate(step: int, total_steps: int, warmup_steps: int, peak: float, floor: float) -> float:
    """Linear warmup to `peak`, then a cosine down to `floor`."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(progress, 1.0)))


def load_data(args: argparse.Namespace) -> tuple[ImageDataset, ImageDataset, PreprocessConfig]:
    preprocess = default_preprocess(args.dataset, args.image_size, args.channels)
    train = load_dataset(args.dataset, "train", args.data_dir, preprocess)
    test = load_dataset(args.dataset, "test", args.data_dir, preprocess)
    if args.dataset == "imagefolder":  # a user's own images: standardise with their own statistics
        mean, std = channel_statistics(train.images)
        preprocess = PreprocessConfig(preprocess.image_size, preprocess.channels, mean, std, preprocess.resize)
    if args.train_limit:
        train = train.subset(args.train_limit)
    if args.test_limit:
        test = test.subset(args.test_limit)
    return train, test, preprocess


class Trainer:
    """Owns the model, optimizer and random state of one run, so that a run can stop and resume exactly."""

    def __init__(self, args: argparse.Namespace, command_line: list[str]) -> None:
        self.args = args
        self.command_line = command_line
        self.device = resolve_device(args.device)
        torch.manual_seed(args.seed)
        self.train_set, self.test_set, self.preprocess = load_data(args)
        self.model = build_model(args, self.preprocess, len(self.train_set.classes)).to(self.device)
        self.optimizer = build_optimizer(self.model, args, self.device)
        self.generator = torch.Generator().manual_seed(args.seed)  # shuffling and augmentation
        self.augment = BatchAugment(args.crop_padding, args.flip, args.erasing, self.generator)
        self.steps_per_epoch = math.ceil(len(self.train_set) / args.batch_size)
        self.start_epoch = 0
        self.elapsed = 0.0  # training wall time, summed over resumed runs
        self.train_images = self.train_set.images.to(self.device)
        self.train_labels = self.train_set.labels.to(self.device)

    @property
    def out_dir(self) -> Path:
        return self.args.out_dir

    def set_learning_rate(self, step: int) -> None:
        args = self.args
        lr = learning_rate(
            step, args.epochs * self.steps_per_epoch, int(args.warmup_epochs * self.steps_per_epoch), args.lr, args.min_lr
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def train_epoch(self, epoch: int) -> dict:
        self.model.train()
        order = torch.randperm(len(self.train_set), generator=self.generator).to(self.device)
        total_loss = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device)
        progress = tqdm(range(self.steps_per_epoch), desc=f"epoch {epoch + 1}/{self.args.epochs}", leave=False)
        for step in progress:
            self.set_learning_rate(epoch * self.steps_per_epoch + step)
            batch = order[step * self.args.batch_size : (step + 1) * self.args.batch_size]
            images = self.augment.crop_and_flip(self.train_images[batch].float() / 255.0)
            images = self.augment.erase(normalize(images * 255.0, self.preprocess))
            labels = self.train_labels[batch]
            with autocast(self.device):
                logits = self.model(images).float()
            loss = F.cross_entropy(logits, labels, label_smoothing=self.args.label_smoothing)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total_loss += loss.detach() * len(batch)
            correct += (logits.argmax(1) == labels).sum()
        return {
            "train_loss": total_loss.item() / len(self.train_set),
            "train_accuracy": correct.item() / len(self.train_set),
            "lr": self.optimizer.param_groups[0]["lr"],
        }

    def run(self) -> dict:
        print(f"{count_parameters(self.model):,} parameters on {self.device}; {len(self.train_set)} train / "
              f"{len(self.test_set)} test images; epochs {self.start_epoch + 1}..{self.args.epochs}", file=sys.stderr)
        record: dict = {}
        for epoch in range(self.start_epoch, self.args.epochs):
            started = time.perf_counter()
            record = {"epoch": epoch + 1, **self.train_epoch(epoch)}
            test_loss, test_accuracy = evaluate(self.model, self.test_set, self.preprocess, self.device)
            self.elapsed += time.perf_counter() - started
            record.update(test_loss=test_loss, test_accuracy=test_accuracy, elapsed_s=round(self.elapsed, 1))
            tqdm.write(json.dumps(record), file=sys.stderr)
            self.save(epoch, record)
        return record

    def training_facts(self, record: dict) -> dict:
        return {
            "dataset": self.args.dataset,
            "epochs": record.get("epoch", self.start_epoch),
            "test_accuracy": record.get("test_accuracy"),
            "train_images": len(self.train_set),
            "test_images": len(self.test_set),
            "wall_time_s": round(self.elapsed, 1),
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else platform.processor() or "cpu",
            "command": shlex.join(["python", "-m", "model.train", *self.command_line]),
            "recipe": {key: str(value) if isinstance(value, Path) else value for key, value in vars(self.args).items()},
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
        }

    def save(self, epoch: int, record: dict) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / METRICS_NAME, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        save_checkpoint(self.out_dir / CHECKPOINT_NAME, self.model, self.train_set.classes, self.preprocess,
                        self.training_facts(record))
        state = {
            "epoch": epoch,
            "elapsed": self.elapsed,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
        }
        temporary = self.out_dir / (STATE_NAME + ".tmp")
        torch.save(state, temporary)
        temporary.replace(self.out_dir / STATE_NAME)

    def resume(self) -> None:
        path = self.out_dir / STATE_NAME
        if not path.exists():
            raise SystemExit(f"--resume: {path} does not exist")
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"]:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.start_epoch = state["epoch"] + 1
        self.elapsed = state["elapsed"]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = True
    trainer = Trainer(args, argv)
    if args.resume:
        trainer.resume()
    elif (args.out_dir / METRICS_NAME).exists():
        (args.out_dir / METRICS_NAME).unlink()  # a fresh run starts a fresh log
    trainer.run()


if __name__ == "__main__":
    main()
