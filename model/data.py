"""Datasets held in memory as uint8 tensors, and the train-time augmentation applied to whole batches.

Keeping images as (N, C, H, W) uint8 lets one code path serve every dataset and lets augmentation
run on the training device, which keeps a GPU busy without a pool of loader processes.
"""

from __future__ import annotations

import errno
import gzip
import importlib
import json
import math
import os
import pickle
import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from model.cpu import cpu_share, local_processes
from model.images import FOREIGN_SUFFIXES, READS_AVIF, READS_HEIF, PreprocessConfig, image_to_array, pixels_to_image
from model.memory import available_memory, sized
from model.metadata import composed, counted, escaped, not_utf8, some_of
from model.paths import mode_and_owner, this_user
from model.preprocess import STANDARD_INPUT, UnreadableImageError, read_image_file

DATASETS = ("fashion-mnist", "cifar10", "imagefolder")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
DOWNLOADS = Path("data")  # where a built-in dataset not on disk is downloaded to, without --data-dir
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
BUILT_IN_CLASSES = {"fashion-mnist": FASHION_MNIST_CLASSES, "cifar10": CIFAR10_CLASSES}
CIFAR10_FOLDER = "cifar-10-batches-py"
# torchvision's ImageFolder's (with netpbm's .ppm and .pgm, the traffic signs of GTSRB, say), GIF's and AVIF's.
IMAGE_SUFFIXES = (
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
    | ({".avif"} if READS_AVIF else set())
    | ({".heic", ".heif"} if READS_HEIF else set())
)

# What decode_files does: image files, their preprocessing and a progress label -> images, errors by index.
Decoder = Callable[[list[Path], PreprocessConfig, str], tuple[torch.Tensor, dict[int, str]]]


@dataclass
class ImageDataset:
    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, count: int) -> ImageDataset:
        return ImageDataset(self.images[:count], self.labels[:count], self.classes)


def default_preprocess(dataset: str, image_size: int = 32, channels: int = 3) -> PreprocessConfig:
    """The preprocessing a dataset is trained with; ImageFolder data gets its statistics later."""
    if dataset == "fashion-mnist":
        return PreprocessConfig(image_size=28, channels=1, mean=(0.2860,), std=(0.3530,))
    if dataset == "cifar10":
        return PreprocessConfig(image_size=32, channels=3, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
    return PreprocessConfig(image_size=image_size, channels=channels, mean=(0.5,) * channels, std=(0.5,) * channels)


def channel_statistics(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (unbiased, as torch.std) of (N, C, H, W) uint8 images, scaled to [0, 1].

    Counted as a histogram of the 256 values per channel, a slice of images at a time, so the sums are
    exact integers and the memory is one slice of one channel: the whole set as floats, scaled and
    transposed, took eight times the images' own memory on top of them, and an image folder that fit
    in memory could not be trained on."""
    channels, per_image = images.shape[1], images[0, 0].numel()
    counts = torch.zeros((channels, 256), dtype=torch.int64)
    step = max(1, STATISTICS_SLICE // per_image)
    for start in range(0, len(images), step):
        for channel in range(channels):
            counts[channel] += torch.bincount(images[start : start + step, channel].reshape(-1), minlength=256)
    means, stds = [], []
    for histogram in counts.tolist():
        n = sum(histogram)
        total = sum(value * count for value, count in enumerate(histogram))
        squares = sum(value * value * count for value, count in enumerate(histogram))
        means.append(total / n / 255)
        stds.append(math.sqrt((n * squares - total * total) / (n * (n - 1))) / 255 if n > 1 else math.nan)
    return tuple(means), tuple(stds)


STATISTICS_SLICE = 1 << 22  # pixels of one channel that channel_statistics copies at a time: 4 MB


class DatasetError(ValueError):
    """A dataset folder that is missing or not laid out as expected. The message says what to fix."""


def _read_idx(path: Path) -> np.ndarray:
    """Read one gzipped IDX file (the original MNIST / Fashion-MNIST format); a damaged one, a download cut
    short say, is a DatasetError that names it."""
    try:
        with gzip.open(path, "rb") as handle:
            data = handle.read()
        dims = data[3]
        shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
        return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)
    except (OSError, EOFError, ValueError, IndexError) as error:
        raise DatasetError(f"{path}: not a whole gzipped IDX file ({error}); download it again") from None


def load_fashion_mnist(split: str, data_dir: Path | None) -> ImageDataset:
    prefix = "train" if split == "train" else "t10k"
    folder = data_dir or FASHION_MNIST_DIR
    images_path = folder / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = folder / f"{prefix}-labels-idx1-ubyte.gz"
    if not images_path.exists():
        return _download_fashion_mnist(split, data_dir)
    images = torch.from_numpy(_read_idx(images_path).copy()).unsqueeze(1)  # (N, 1, 28, 28)
    labels = torch.from_numpy(_read_idx(labels_path).astype(np.int64))
    if images.shape[1:] != (1, 28, 28) or len(images) != len(labels):
        raise DatasetError(
            f"{folder}: {tuple(images.shape)} images and {len(labels)} labels are not Fashion-MNIST's {prefix} split"
        )
    return ImageDataset(images, labels, FASHION_MNIST_CLASSES)


class MissingExtra(RuntimeError):
    """What this installation lacks for an option, and the extra that has it. The commands say it in one line,
    where it was a traceback (`pip install .`, as `make serve` installs, has no torchvision)."""


def torchvision_module(module: str, purpose: str):
    """A torchvision module. Serving needs no torchvision, so it is the `datasets` extra."""
    try:
        importlib.import_module("torchvision")  # first: a loaded submodule would be returned without it
        return importlib.import_module(f"torchvision.{module}")
    except ImportError:
        raise MissingExtra(f"{purpose} needs torchvision: pip install 'vit-serving[datasets]'") from None


def _download(name: str, split: str, data_dir: Path | None):
    """torchvision's dataset `name`, downloaded into `data_dir` (default: DOWNLOADS), or found in its folder there.
    Offline, or behind a proxy that refuses, the download used to end in a traceback from urllib; now one line
    says where the files should be."""
    root = data_dir or DOWNLOADS
    # A folder of class folders, given without --dataset imagefolder: Fashion-MNIST was downloaded there and trained on.
    if data_dir is not None and not (root / name).exists() and (folders := _image_folders(root)):
        raise DatasetError(
            f"{root}: folders of images ({some_of(folders, 3)}), not {name}'s files; --dataset imagefolder reads them"
        )
    downloader = getattr(torchvision_module("datasets", f"{name} is not on disk, and downloading it"), name)
    if name == "FashionMNIST":  # torchvision would fetch both splits; this fetches the files of the one read
        prefix = "train" if split == "train" else "t10k"
        files = [resource for resource in downloader.resources if resource[0].startswith(prefix)]
        downloader = type(name, (downloader,), {"resources": files})  # its name is its folder: root/FashionMNIST
    try:
        return downloader(root=str(root), train=split == "train", download=True)
    except (OSError, RuntimeError) as error:  # URLError is an OSError; a failed checksum is a RuntimeError
        reason = " ".join(str(getattr(error, "reason", error)).split())  # torchvision's reasons span lines
        raise DatasetError(
            f"{name} is not in {root}, and downloading it failed ({reason}); put its files there, or point "
            "--data-dir at them"
        ) from None


def _image_folders(root: Path) -> list[str]:
    """The folders of `root` that hold image files, as class folders do."""
    if not root.is_dir() or not os.access(root, os.R_OK | os.X_OK):
        return []
    return [name for name in _folders(root) if image_files(root / name, unlisted=lambda _: None)]


def _download_fashion_mnist(split: str, data_dir: Path | None) -> ImageDataset:
    dataset = _download("FashionMNIST", split, data_dir)
    return ImageDataset(dataset.data.unsqueeze(1).clone(), dataset.targets.long().clone(), FASHION_MNIST_CLASSES)


def load_cifar10(split: str, data_dir: Path | None) -> ImageDataset:
    """Read CIFAR-10's python batches; torchvision downloads them when they are missing."""
    folder = (data_dir or DOWNLOADS) / CIFAR10_FOLDER
    if not folder.exists():
        _download("CIFAR10", split, data_dir)
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    batches = []
    for name in names:
        try:
            with open(folder / name, "rb") as handle:
                batch = pickle.load(handle, encoding="latin1")  # CIFAR's own format is a pickle
            batches.append((np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32), batch["labels"]))
        except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError) as error:
            raise DatasetError(f"{folder / name}: not one of CIFAR-10's python batches ({error!r})") from None
    images = np.concatenate([data for data, _ in batches])
    labels = np.concatenate([batch_labels for _, batch_labels in batches]).astype(np.int64)
    if len(images) != len(labels):
        raise DatasetError(f"{folder}: {len(images)} images and {len(labels)} labels in the {split} batches")
    return ImageDataset(torch.from_numpy(images.copy()), torch.from_numpy(labels), CIFAR10_CLASSES)


def load_image_folder(
    split: str,
    data_dir: Path | None,
    preprocess: PreprocessConfig,
    val_fraction: float | None = 0.2,
    seed: int = 0,
    classes: list[str] | None = None,
    limit: int | None = None,
    decode: Decoder | None = None,
) -> ImageDataset:
    """An ImageFolder tree: ``root/train/<class>/*`` with ``root/val/<class>/*`` (or valid/, validation/, test/), or a
    plain ``root/<class>/*`` split here: each class's images, in name order, shuffled by `seed`, with
    `val_fraction` of them held out as the test split, at least one if it has two, and at least one kept.
    With `val_fraction` None, a plain tree is not split: either split is all of it (a test set of its own).
    With `limit`, that many of the split's images, drawn by `seed` across its classes, are all that is
    decoded, by `decode` (decode_files, or a share of them in each process of a torchrun job).

    Labels index `classes` (a checkpoint's), by default the training split's classes. Both splits of a
    run then agree where one lacks a class: a class of one image, which stays in training, or a val
    folder without it. Each split used to number only its own folders, and shifted every label after
    a missing one."""
    if data_dir is None:
        raise DatasetError("the imagefolder dataset needs --data-dir")
    if not data_dir.is_dir():
        raise DatasetError(f"{data_dir}: {'a file, not a folder' if data_dir.exists() else 'no such folder'}")
    check_listable(data_dir)
    train_dir = data_dir / "train"
    if train_dir.is_dir() and split_folder(data_dir, "test") is None:  # found before the training images decode
        names = f"{', '.join(HELD_OUT_FOLDERS[:-1])} or {HELD_OUT_FOLDERS[-1]}"
        raise DatasetError(f"{data_dir}: a train folder but no {names} folder beside it, of the images to test on")
    split_dir = split_folder(data_dir, split)
    if split_dir is not None:
        files = every = _class_files(split_dir)
        if classes is None and split_dir != train_dir and train_dir.is_dir():  # given them, the tree is not walked
            every = _class_files(train_dir)
    else:
        every = _class_files(data_dir)
        files = every if val_fraction is None else _held_out(every, split, val_fraction, seed)
    folder = split_dir or data_dir
    if classes is None:
        classes = _class_names(every)
        if len(classes) < 2:
            needed = f"{folder}: images of at least 2 classes are needed, one folder per class"
            raise DatasetError(needed + _one_level_down(folder, classes))
    # A plain tree's every class, held out or not: a class of one image has none in the test split.
    if unknown := sorted(set(found := _class_names(files if split_dir else every)) - set(classes)):
        not_among = f"{folder}: {some_of(unknown)}: not among the classes {some_of(classes)}"
        raise DatasetError(not_among + _one_level_down(folder, found))
    if not files:  # a plain tree whose classes have one image each, which stays in training
        raise DatasetError(
            f"{folder}: no image to hold out for testing, since no class has more than one;"
            " add images, or put them in train/ and val/ folders"
        )
    if limit is not None and limit < len(files):
        # Drawn, not the first: the files come class by class, and the first 256 of them were all of one class.
        files = [files[index] for index in sorted(random.Random(f"{seed}:{split}").sample(range(len(files)), limit))]
    check_memory(folder, split, len(files), preprocess)
    images, errors = (decode or decode_files)([path for path, _ in files], preprocess, f"decode {split}")
    unreadable = list(errors.values())
    if unreadable:
        shown = unreadable[:UNREADABLE_SHOWN] + [f"and {len(unreadable) - UNREADABLE_SHOWN} more"] * (
            len(unreadable) > UNREADABLE_SHOWN
        )
        split_here = "" if split_dir else f" in its {split} split"  # a share of the folder's files, not all
        raise DatasetError(
            f"{folder}: {len(unreadable)} of {len(files)} image files{split_here} cannot be read; remove or fix them:"
            "\n  " + "\n  ".join(shown)
        )
    labels = torch.tensor([classes.index(name) for _, name in files], dtype=torch.int64)
    return ImageDataset(images, labels, list(classes))


UNREADABLE_SHOWN = 10  # of the unreadable files of a folder, the ones named


def check_memory(folder: Path | str, split: str, count: int, preprocess: PreprocessConfig) -> None:
    """Refuse a split whose uint8 images need more memory than is left, before decoding or resizing any. The
    array is allocated whole and filled as files decode, so such a folder of photos decoded for many minutes
    and was then killed by the kernel, without a word. Under torchrun every process on the machine holds
    them all."""
    processes = local_processes()
    each = count * math.prod(preprocess.image_shape)
    available = available_memory()
    if available is None or processes * each <= available:
        return
    size = preprocess.image_size
    held = f", held by each of the {processes} processes here" if processes > 1 else ""
    raise DatasetError(
        f"{folder}: the {count:,} images of its {split} split take {sized(each)} in memory "
        f"({preprocess.channels} x {size} x {size} bytes each){held}, more than the {sized(available)} of memory "
        f"available on this machine; fewer images (--{split}-limit) or smaller ones (--image-size) fit"
    )


def decode_files(
    paths: list[Path], preprocess: PreprocessConfig, description: str
) -> tuple[torch.Tensor, dict[int, str]]:
    """Image files -> (N, C, H, W) uint8 through `preprocess`, and the error of each file that cannot be read,
    by its index, in file order (its row of the tensor is left as it was allocated)."""
    images, errors = _images_for(len(paths), preprocess), {}

    def fill(index: int) -> None:
        try:
            images[index] = read_image_file(paths[index], preprocess).numpy()
        except UnreadableImageError as error:
            errors[index] = str(error)

    # The standard input (`-`) is read in the calling thread, the files in the pool's. A pool thread that Ctrl-C
    # interrupts as it starts is never recorded by the pool, nor joined; blocked on stdin, it held its lock as Python
    # exited, which then aborted (`Fatal Python error: _enter_buffered_busy`, status 134).
    standard_input = [index for index, path in enumerate(paths) if path == STANDARD_INPUT]
    files = [index for index, path in enumerate(paths) if path != STANDARD_INPUT]
    for index in standard_input:
        fill(index)
    _fill_in_threads(len(files), lambda position: fill(files[position]), description)
    return torch.from_numpy(images), {index: errors[index] for index in sorted(errors)}


def resized(dataset: ImageDataset, preprocess: PreprocessConfig, name: str, split: str) -> ImageDataset:
    """A built-in dataset's images at `preprocess`'s size, each resized whole by Pillow as an upload is (its
    filter, no crop): a pretrained checkpoint fine-tunes at its own resolution (vit-train --init-from
    --image-size), and then serves uploads resized so."""
    check_memory(name, split, len(dataset), preprocess)
    images = _images_for(len(dataset), preprocess)

    def fill(index: int) -> None:
        images[index] = image_to_array(pixels_to_image(dataset.images[index].numpy()), preprocess)

    _fill_in_threads(len(dataset), fill, f"resize {split}")
    return ImageDataset(torch.from_numpy(images), dataset.labels, dataset.classes)


def _images_for(count: int, preprocess: PreprocessConfig) -> np.ndarray:
    """Room for `count` images at `preprocess`'s size, filled in place: a list of images stacked at the end
    held every image twice, at the peak. numpy's, as a torch tensor made under the caller's inference_mode
    could not be written in other threads."""
    return np.empty((count, *preprocess.image_shape), dtype=np.uint8)


def _fill_in_threads(count: int, fill: Callable[[int], None], description: str) -> None:
    """fill(index) for every index, by a thread per CPU of this process's share (model/cpu.py): Pillow lets
    go of the GIL while it decodes and resizes, and one thread decoded a folder of photos at one core's speed.
    Its progress bar is drawn on a terminal only (disable=None), as an epoch's is: redrawn into a log file, it
    was a line of carriage returns per split."""
    with (
        ThreadPoolExecutor(max_workers=cpu_share(), thread_name_prefix="decode") as pool,
        tqdm(total=count, desc=description, leave=False, disable=True if count < 1000 else None) as progress,
    ):
        for start in range(0, count, DECODED_AT_ONCE):
            indices = range(start, min(start + DECODED_AT_ONCE, count))
            list(pool.map(fill, indices))
            progress.update(len(indices))


# Images queued for the threads at a time, so that a large folder is not one future per file.
DECODED_AT_ONCE = 1024


def check_listable(folder: Path) -> None:
    """A DatasetError where `folder` is one that this user may not list and look into (read and search
    permission): the run stopped with a traceback from the first look inside."""
    if folder.is_dir() and not os.access(folder, os.R_OK | os.X_OK):
        raise DatasetError(f"{folder}: cannot list this folder ({os.strerror(errno.EACCES)}); {_let_read(folder)}")


def _let_read(folder: Path) -> str:
    """What to do of a folder that this user may not list: whom to let read it, and what it allows now."""
    return f"let {this_user()} read it ({mode_and_owner(folder)})"


# The held-out split's folder beside train/, the first there: torchvision's and timm's val/, Roboflow's valid/,
# Hugging Face's validation/, or test/. A Roboflow export (train/, valid/, test/) was scored on its test/, and
# one of train/ and valid/ alone was refused.
HELD_OUT_FOLDERS = ("val", "valid", "validation", "test")


def split_folder(data_dir: Path, split: str) -> Path | None:
    """The folder of `split` in a tree laid out by splits: train/ for training, val/ (or another of
    HELD_OUT_FOLDERS) for testing; None in a plain tree of class folders."""
    candidates = ["train"] if split == "train" else HELD_OUT_FOLDERS
    return next((data_dir / name for name in candidates if (data_dir / name).is_dir()), None)


def _hidden(name: str) -> bool:
    """Whether a file or folder is one that a tree of images holds beside them and is not looked at: a hidden one
    (a notebook's .ipynb_checkpoints is not a class, nor a Mac's ._photo.png an image), or the __MACOSX folder of
    a zip made by a Mac's Finder, which holds only such ._ files and was refused as a class without images."""
    return name.startswith(".") or name == "__MACOSX"


def _folders(root: Path) -> list[str]:
    """The names of the folders in `root`, but the hidden ones, in name order."""
    return sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not _hidden(entry.name))


def _one_level_down(folder: Path, classes: list[str]) -> str:
    """Where the one class folder of `folder` holds folders of images itself, what points one level down: a zip
    of a dataset's folder unpacks to that one folder, and --data-dir named the folder it was unpacked into."""
    inner = folder / classes[0] if len(classes) == 1 else None
    held = _image_folders(inner) if inner else []
    if len(held) < 2:
        return ""
    return f"; its one folder, {classes[0]}, holds {len(held)} folders of images ({some_of(held)}): was {inner} meant?"


def _class_files(root: Path) -> list[tuple[Path, str]]:
    """Each image file under root with its class, the folder it is in. Hidden folders and files are not
    looked at (_hidden).

    A class folder without image files stops the run, as in torchvision's ImageFolder: a class whose
    photos were all in a format not read here used to drop out of the classes, and the model was trained without it."""
    check_listable(root)
    classes = _folders(root)
    if undecodable := [name for name in classes if not_utf8(name)]:
        shown = ", ".join(escaped(name) for name in undecodable[:3])
        raise DatasetError(
            f"{root}: {counted(len(undecodable), 'class folder')} named in bytes that are not UTF-8 ({shown}), and "
            f"a class's name is its label in every answer: rename {'them' if undecodable[1:] else 'it'} "
            "(convmv -f cp1252 -t utf-8 --notest, where a zip made on Windows named it)"
        )
    forms: dict[str, list[str]] = {}
    for name in classes:
        forms.setdefault(composed(name), []).append(name)
    if twins := next((names for names in forms.values() if names[1:]), None):
        raise DatasetError(
            f"{root}: the class folders {' and '.join(json.dumps(name) for name in twins)} are both named "
            f"{composed(twins[0])}, in two Unicode forms (macOS names files decomposed); merge them into one"
        )
    per_class = {composed(name): image_files(root / name) for name in classes}  # labels as keyboards type them
    files = [(path, name) for name, paths in per_class.items() for path in paths]
    if not files and (loose := _loose_images(root)):
        raise DatasetError(
            f"{root}: {counted(len(loose), 'image file')} directly in it, and no class folders; put each class's "
            f"images in a folder named after the class ({root / 'CLASS' / loose[0].name})"
        )
    if not files:
        raise DatasetError(f"{root}: no images found; expected one subfolder of images per class")
    if empty := [name for name, paths in per_class.items() if not paths]:
        which = "these class folders" if empty[1:] else "this class folder"
        raise DatasetError(
            f"{root}: {some_of(empty)}: no image files in {which} (read: {', '.join(sorted(IMAGE_SUFFIXES))});"
            f" add some, or move the folder out of {root}"
        )
    return files


def image_files(
    folder: Path, suffixes: set[str] = IMAGE_SUFFIXES, unlisted: Callable[[str], None] | None = None
) -> list[Path]:
    """The image files under `folder`, by their suffix, in name order, without hidden files or folders. A folder
    named like an image (`album.png/`) is walked, not read, and a named pipe, socket or device is left out, as
    `grep -r` leaves them: reading a pipe that nobody writes to waited for ever. A broken link is kept, to be
    named as unreadable.

    A linked folder is walked, as torchvision's ImageFolder walks it (its images were left out without a word),
    and a folder is walked once however many links lead to it: one to a folder above it led round for ever.

    A folder that this user may not list (copied with its owner's permissions, say) stops the walk with a
    DatasetError: its images were left out without a word. Given `unlisted`, it is told that folder's sentence
    instead, and the walk goes on (vit-predict names it and classifies the rest)."""

    def refused(error: OSError) -> None:
        said = f"{error.filename}: cannot list this folder ({error.strerror or error})"
        if unlisted is None:
            let = _let_read(Path(error.filename))
            raise DatasetError(f"{said}, so the images in it would be left out; {let}, or move it away")
        unlisted(said)

    found, walked = [], set()
    for parent, folders, names in os.walk(folder, onerror=refused, followlinks=True):
        if (identity := _identity(parent)) in walked:
            folders.clear()
            continue
        walked.add(identity)
        # In name order, so that of two links to one folder it is always the first by name that is walked; a hidden
        # folder is not walked, so never refused.
        folders[:] = sorted(name for name in folders if not _hidden(name))
        found += [Path(parent, name) for name in names if Path(name).suffix.lower() in suffixes]
    return sorted(path for path in found if not _hidden(path.name) and (path.is_file() or not path.exists()))


def _identity(folder: str) -> tuple[int, int]:
    """The device and inode of a folder, the same by whatever link it is reached."""
    status = os.stat(folder)
    return status.st_dev, status.st_ino


def unread_pictures(folder: Path) -> str | None:
    """A sentence naming the pictures under `folder` that are left out for their format, or None: a folder's
    files are images by their suffix, and phones' HEIC photos among JPEGs were left out without a word."""
    skipped = image_files(folder, FOREIGN_SUFFIXES, unlisted=lambda _: None) if folder.is_dir() else []
    if not skipped:
        return None
    kinds = ", ".join(sorted({path.suffix.lower() for path in skipped}))
    return (
        f"{folder}: left out {counted(len(skipped), 'file')} in a format not read here ({kinds}): "
        f"{some_of([str(path.relative_to(folder)) for path in skipped], 3)}; convert to PNG or JPEG to include them"
    )


def loose_pictures(data_dir: Path) -> str | None:
    """A sentence naming the image files that lie beside the class folders of a tree, in none of them, and so
    are left out of every class; None where there are none. A picture dropped there by mistake was left
    out without a word, as torchvision's ImageFolder leaves it out. (Without class folders, the run stops.)"""
    check_listable(data_dir)  # before a look inside it, which raised PermissionError
    roots = [data_dir / name for name in ("train", "val", "test") if (data_dir / name).is_dir()] or [data_dir]
    loose = [path for root in roots if _has_folders(root) for path in _loose_images(root)]
    if not loose:
        return None
    shown = some_of([str(path.relative_to(data_dir)) for path in loose], 3)
    left_out = counted(len(loose), "image file")
    return f"{data_dir}: left out {left_out} in no class folder: {shown}; move each into its class"


def _has_folders(root: Path) -> bool:
    if not root.is_dir():
        return False
    check_listable(root)
    return bool(_folders(root))


def _loose_images(root: Path) -> list[Path]:
    """The image files directly in `root`, not in a folder of it (its class folders are not walked)."""
    return sorted(
        path
        for path in root.iterdir()
        if path.suffix.lower() in IMAGE_SUFFIXES and not _hidden(path.name) and path.is_file()
    )


def _class_names(files: list[tuple[Path, str]]) -> list[str]:
    return sorted({name for _, name in files})


def _held_out(files: list[tuple[Path, str]], split: str, val_fraction: float, seed: int) -> list[tuple[Path, str]]:
    if not 0 < val_fraction < 1:
        raise DatasetError(f"--val-fraction must be between 0 and 1, not {val_fraction}")
    per_class: dict[str, list[tuple[Path, str]]] = {}
    for item in files:  # one pass; a pass per class read every file once per class, quadratic in a large tree
        per_class.setdefault(item[1], []).append(item)
    kept = []
    for name, own in sorted(per_class.items()):
        random.Random(f"{seed}:{name}").shuffle(own)
        held = min(len(own) - 1, max(1, round(len(own) * val_fraction)))  # a class is never all held out
        kept += own[:held] if split == "test" else own[held:]
    return kept


def load_dataset(
    name: str,
    split: str,
    data_dir: Path | None = None,
    preprocess: PreprocessConfig | None = None,
    val_fraction: float | None = 0.2,
    seed: int = 0,
    classes: list[str] | None = None,
    limit: int | None = None,
    decode: Decoder | None = None,
) -> ImageDataset:
    """A split of a dataset; val_fraction and seed split a plain imagefolder tree (load_image_folder), and
    its labels index `classes` where given (a checkpoint's, to score it), which a built-in one must have.
    `limit` keeps that many images: a built-in dataset's first ones (their order mixes the classes), an
    image folder's drawn by `seed`."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, not {split!r}")
    if name == "imagefolder":
        preprocess = preprocess or default_preprocess(name)
        return load_image_folder(split, data_dir, preprocess, val_fraction, seed, classes, limit, decode)
    if name not in BUILT_IN_CLASSES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if classes is not None and BUILT_IN_CLASSES[name] != list(classes):  # before reading, or downloading, it
        raise DatasetError(f"{name} has the classes {some_of(BUILT_IN_CLASSES[name])}, not {some_of(classes)}")
    dataset = load_fashion_mnist(split, data_dir) if name == "fashion-mnist" else load_cifar10(split, data_dir)
    return dataset.subset(limit) if limit else dataset


class BatchAugment:
    """Random crop with zero padding, horizontal flip and random erasing, on a whole batch at once.

    `draw` makes every random choice of an epoch up front, from a CPU generator, in one tensor that
    moves to the device once: a step then never waits on a host-to-device copy, and a run is
    reproducible and resumable on any device.
    """

    COLUMNS = 8  # crop top, crop left, flip, erase, erase top, erase left, erase height, erase width

    def __init__(self, crop_padding: int, flip: bool, erasing: float, image_size: int) -> None:
        self.crop_padding = crop_padding
        self.flip = flip
        self.erasing = erasing
        self.image_size = image_size

    def draw(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """(count, COLUMNS) int64: one row of random choices per image."""
        size, pad = self.image_size, self.crop_padding
        uniform = lambda: torch.rand(count, generator=generator)
        crop = torch.randint(0, 2 * pad + 1, (count, 2), generator=generator)
        flip = uniform() < (0.5 if self.flip else 0.0)
        erase = uniform() < self.erasing
        # Random erasing (Zhong et al., 2017): 2-33 % of the area, aspect ratio between 0.3 and 1/0.3.
        area = 0.02 + uniform() * (0.33 - 0.02)
        aspect = torch.exp((uniform() * 2 - 1) * math.log(1 / 0.3))
        height = (torch.sqrt(area * aspect) * size).clamp(1, size).long()
        width = (torch.sqrt(area / aspect) * size).clamp(1, size).long()
        top = (uniform() * (size - height + 1)).long()
        left = (uniform() * (size - width + 1)).long()
        return torch.stack([crop[:, 0], crop[:, 1], flip.long(), erase.long(), top, left, height, width], dim=1)

    def crop_and_flip(self, images: torch.Tensor, choices: torch.Tensor) -> torch.Tensor:
        """Geometric augmentation of (B, C, H, W) images of any dtype, before normalisation."""
        B, _, H, W = images.shape
        device = images.device
        if self.crop_padding:
            pad = self.crop_padding
            padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
            rows = (choices[:, 0:1] + torch.arange(H, device=device))[:, :, None]  # (B, H, 1)
            cols = (choices[:, 1:2] + torch.arange(W, device=device))[:, None, :]  # (B, 1, W)
            batch = torch.arange(B, device=device)[:, None, None]
            images = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)  # (B, C, H, W)
        if self.flip:
            images = torch.where(choices[:, 2].bool()[:, None, None, None], images.flip(-1), images)
        return images

    def erase(self, images: torch.Tensor, choices: torch.Tensor) -> torch.Tensor:
        """Zero a random rectangle of the normalised images (zero is the mean colour)."""
        if not self.erasing:
            return images
        _, _, H, W = images.shape
        top, left, height, width = (choices[:, i : i + 1] for i in range(4, 8))
        rows = torch.arange(H, device=images.device)[None, :]
        cols = torch.arange(W, device=images.device)[None, :]
        in_rows = (rows >= top) & (rows < top + height)  # (B, H)
        in_cols = (cols >= left) & (cols < left + width)  # (B, W)
        mask = in_rows[:, :, None] & in_cols[:, None, :] & choices[:, 3].bool()[:, None, None]  # (B, H, W)
        return images.masked_fill(mask[:, None], 0.0)


class BatchMix:
    """MixUp and CutMix from torchvision's transforms.v2, on a normalised batch: one of them per batch.

    Labels become (B, classes) probabilities, which cross-entropy takes as they are.
    """

    def __init__(self, mixup: float, cutmix: float, num_classes: int) -> None:
        v2 = torchvision_module("transforms.v2", "--mixup or --cutmix")
        mixes = [v2.MixUp(alpha=mixup, num_classes=num_classes)] if mixup else []
        mixes += [v2.CutMix(alpha=cutmix, num_classes=num_classes)] if cutmix else []
        if not mixes:
            raise ValueError("BatchMix needs --mixup or --cutmix above 0")
        self.mix = mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mix(images, labels)  # (B, C, H, W), (B, classes)


def repeated(indices: torch.Tensor, batch_size: int, repeats: int) -> torch.Tensor:
    """Repeated augmentation (Hoffer et al., 2020; DeiT's RASampler): each batch holds `repeats` copies of
    ceil(batch_size / repeats) images, each copy augmented on its own; the epoch keeps its length, so it
    sees about 1/repeats of the images. Copies sit a batch-share apart, in different groups of the policy's draws."""
    position = torch.arange(len(indices))
    batch, slot = position // batch_size, position % batch_size
    distinct = math.ceil(batch_size / repeats)
    return indices[batch * distinct + slot % distinct]
