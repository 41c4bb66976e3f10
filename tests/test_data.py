import hashlib
import io
import os
import pickle
import shutil
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import replace
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision.datasets
from PIL import Image

import model.data
import model.decoded_cache
from model.data import (
    CIFAR10_CLASSES,
    FASHION_MNIST_CLASSES,
    BatchAugment,
    BatchMix,
    DatasetError,
    ImageDataset,
    channel_statistics,
    decode_files,
    default_preprocess,
    image_files,
    load_dataset,
    loose_pictures,
    repeated,
    resized,
)
from model.decoded_cache import DecodedCache, fingerprint
from model.images import READS_AVIF, READS_HEIF, PreprocessConfig
from model.memory import available_memory
from model.paths import this_user
from model.policy_feed import GROUP, TASK, PolicyFeed, apply_policy, make_policy
from tests.support.commands import ROOT, as_unprivileged_user
from tests.support.images import HEIC_FILES


def write_fake_cifar(root, images_per_batch=4):
    """Batches in CIFAR-10's own layout: pickled dicts with 'data' (N, 3072) uint8 and 'labels'."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            "batch_label": name,
            "data": rng.integers(0, 256, (images_per_batch, 3072), dtype=np.uint8),
            "labels": rng.integers(0, 10, images_per_batch).tolist(),
            "filenames": [f"{name}_{i}.png" for i in range(images_per_batch)],
        }
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle)
    return folder


def test_fake_cifar10_batches_load(tmp_path):
    folder = write_fake_cifar(tmp_path)
    train = load_dataset("cifar10", "train", tmp_path)
    test = load_dataset("cifar10", "test", tmp_path)
    assert train.images.shape == (20, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (4, 3, 32, 32)
    assert train.classes == CIFAR10_CLASSES
    with open(folder / "test_batch", "rb") as handle:
        raw = pickle.load(handle)
    # CIFAR stores each image as 1024 red, then 1024 green, then 1024 blue values, row by row.
    assert torch.equal(test.images[1, 2, 0, :], torch.from_numpy(raw["data"][1, 2048:2080]))
    assert test.labels.tolist() == raw["labels"]


@pytest.mark.parametrize("held_out", ["val", "valid", "validation"])  # torchvision's, Roboflow's, Hugging Face's
def test_image_folder_loads_with_classes_from_folder_names(tmp_path, held_out):
    for split, count in (("train", 3), (held_out, 2)):
        for label, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (40 + i, 30), color).save(folder / f"{i}.png")
    preprocess = default_preprocess("imagefolder", image_size=16, channels=3)
    train = load_dataset("imagefolder", "train", tmp_path, preprocess)
    test = load_dataset("imagefolder", "test", tmp_path, preprocess)
    assert train.classes == ["cat", "dog"]
    assert train.images.shape == (6, 3, 16, 16)
    assert test.images.shape == (4, 3, 16, 16)
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert train.images[0, :, 8, 8].tolist() == [255, 0, 0]
    mean, _ = channel_statistics(train.images)
    assert mean == pytest.approx((0.5, 0.0, 0.5), abs=1e-6)


def test_a_train_folder_without_a_held_out_one_is_refused_before_its_images_are_decoded(tmp_path):
    for name in ("train/cat/a.png", "train/dog/b.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8)).save(tmp_path / name)
    decoded = []
    with pytest.raises(DatasetError, match="a train folder but no val, valid, validation or test folder"):
        load_dataset("imagefolder", "train", tmp_path, decode=lambda *args: decoded.append(args))
    assert decoded == []  # vit-train loads the training split first: it was decoded, then the test split refused


def test_a_plain_tree_of_class_folders_is_split_by_fraction_and_seed(tmp_path):
    for label, value in (("ant", 0), ("bee", 100), ("cow", 200)):
        (tmp_path / label).mkdir()
        for i in range(5):
            Image.new("L", (40, 30), value + i).save(tmp_path / label / f"{i}.png")
    preprocess = default_preprocess("imagefolder", image_size=8, channels=1)
    split = lambda name, seed: load_dataset("imagefolder", name, tmp_path, preprocess, val_fraction=0.4, seed=seed)
    train, test = split("train", 0), split("test", 0)
    assert train.classes == test.classes == ["ant", "bee", "cow"]
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and test.labels.tolist() == [0, 0, 1, 1, 2, 2]
    pixels = lambda dataset: sorted(dataset.images[:, 0, 4, 4].tolist())
    assert sorted(pixels(train) + pixels(test)) == [value + i for value in (0, 100, 200) for i in range(5)]
    assert pixels(split("test", 0)) == pixels(test)  # the same seed, the same split
    assert any(pixels(split("test", seed)) != pixels(test) for seed in range(1, 5))


@pytest.mark.parametrize(
    "layout, message",
    [
        ({}, "no images found; expected one subfolder of images per class"),
        ({"only/a.png": 1}, "images of at least 2 classes are needed"),
        (
            {"train/cat/a.png": 1, "train/dog/b.png": 1, "tests/cat/c.png": 1},
            "a train folder but no val, valid, validation or test folder beside it, of the images to test on",
        ),
        ({"cat/a.png": 1, "dog/b.png": 1}, "no image to hold out for testing, since no class has more than one"),
        ({"a.png": 1, "b.png": 1}, "2 image files directly in it, and no class folders; put each class's images in a"),
    ],
)
def test_image_folder_mistakes_say_what_to_fix(tmp_path, layout, message):
    for name in layout:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8)).save(tmp_path / name)
    with pytest.raises(DatasetError, match=message):  # vit-train loads both splits
        load_dataset("imagefolder", "test", tmp_path)
    with pytest.raises(DatasetError, match="no such folder"):
        load_dataset("imagefolder", "train", tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("a file")
    with pytest.raises(DatasetError, match=f"^{tmp_path / 'notes.txt'}: a file, not a folder$"):
        load_dataset("imagefolder", "train", tmp_path / "notes.txt")


def test_a_data_dir_one_level_above_the_class_folders_names_the_folder_meant(tmp_path):
    write_folders(tmp_path / "insects", {"ant": 2, "bee": 2})  # a zip of insects/, unpacked into the folder given
    meant = rf"; its one folder, insects, holds 2 folders of images \(ant, bee\): was {tmp_path}/insects meant\?$"
    with pytest.raises(DatasetError, match=f"images of at least 2 classes are needed, one folder per class{meant}"):
        load_dataset("imagefolder", "train", tmp_path)  # vit-train
    with pytest.raises(DatasetError, match=f"insects: not among the classes ant, bee{meant}"):
        load_dataset("imagefolder", "test", tmp_path, classes=["ant", "bee"])  # vit-evaluate


@pytest.mark.parametrize("dataset, files", [("fashion-mnist", "FashionMNIST"), ("cifar10", "CIFAR10")])
def test_a_built_in_dataset_given_class_folders_of_images_names_imagefolder_rather_than_download_into_them(
    tmp_path, monkeypatch, dataset, files
):
    # vit-train --data-dir my-images, without --dataset imagefolder: Fashion-MNIST was downloaded there and trained on
    write_folders(tmp_path, {"ant": 1, "bee": 1})
    monkeypatch.setattr(model.data, "torchvision_module", lambda *args: pytest.fail("a download was tried"))
    said = rf"^{tmp_path}: folders of images \(ant, bee\), not {files}'s files; --dataset imagefolder reads them$"
    with pytest.raises(DatasetError, match=said):
        load_dataset(dataset, "train", tmp_path)
    monkeypatch.chdir(tmp_path)  # ./data, where a run without --data-dir downloads, may hold a folder of images too
    write_folders(tmp_path / "data", {"ant": 1, "bee": 1})
    monkeypatch.setattr(model.data, "FASHION_MNIST_DIR", tmp_path / "not-installed")
    with pytest.raises(pytest.fail.Exception, match="a download was tried"):
        load_dataset(dataset, "train")


def test_the_macosx_folder_of_a_zip_made_on_a_mac_is_not_a_class(tmp_path):
    write_folders(tmp_path, {"ant": 2, "bee": 2})
    for name in ("ant/0.png", "bee/1.png"):  # what the Finder's Compress adds, and unzip unpacks
        (tmp_path / "__MACOSX" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "__MACOSX" / name).with_name(f"._{Path(name).name}").write_bytes(b"\x00\x05\x16\x07Mac OS X")
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    train = load_dataset("imagefolder", "train", tmp_path, val_fraction=None)
    assert train.classes == ["ant", "bee"] and len(train) == 4  # __MACOSX was refused as a class without images


def test_class_folders_named_decomposed_as_a_mac_names_them_are_labelled_as_a_keyboard_types_the_names(tmp_path):
    cafe, creme = "Cafe\u0301", "Cre\u0300me"  # "Café", "Crème", as a zip made on a Mac unpacks them
    write_folders(tmp_path / "train", {cafe: 2, creme: 2})
    write_folders(tmp_path / "test", {"Caf\u00e9": 1, "Cr\u00e8me": 1})  # the same classes, typed elsewhere
    preprocess = default_preprocess("imagefolder", image_size=8, channels=1)
    train = load_dataset("imagefolder", "train", tmp_path, preprocess)
    test = load_dataset("imagefolder", "test", tmp_path, preprocess, classes=train.classes)
    assert train.classes == test.classes == ["Caf\u00e9", "Cr\u00e8me"] and test.labels.tolist() == [0, 1]
    write_folders(tmp_path / "train", {"Caf\u00e9": 1})  # two folders that look alike: which class is which?
    with pytest.raises(DatasetError, match=r'the class folders "Caf.*" and "Caf.*" are both named Caf\u00e9, in two'):
        load_dataset("imagefolder", "train", tmp_path, preprocess)


@pytest.mark.parametrize("split", ["", "val"])
def test_a_class_folder_without_image_files_stops_the_run_rather_than_leave_the_classes(tmp_path, split):
    images = ["cat/a.png", "dog/b.png"] + (["train/cat/c.png", "train/dog/d.png", "train/owl/e.png"] if split else [])
    for name in images:
        (tmp_path / split / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8)).save(tmp_path / split / name)
    (tmp_path / split / "owl").mkdir()
    (tmp_path / split / "owl" / "IMG_0001.JXL").write_bytes(b"not read")  # owl used to leave the classes unsaid
    with pytest.raises(DatasetError, match=r"owl: no image files in this class folder \(read: .*\.bmp, .*\); add some"):
        load_dataset("imagefolder", "test", tmp_path)


def test_a_folder_this_user_may_not_list_stops_the_run_by_name_rather_than_leave_its_images_out(shared_tmp_path):
    # Photos copied with their owner's permissions: a subfolder's images were left out of their class without
    # a word, a class folder was said to hold no image files, and a data folder stopped the run with a traceback.
    trees = {name: shared_tmp_path / name for name in ("subfolder", "class", "data", "split")}
    for tree in trees.values():
        for root in [tree / "train", tree / "val"] if tree.name == "split" else [tree]:
            write_folders(root, {"ant": 2, "bee": 2})
    (trees["subfolder"] / "bee" / "private").mkdir()
    Image.new("L", (8, 8)).save(trees["subfolder"] / "bee" / "private" / "2.png")
    closed = [trees["subfolder"] / "bee" / "private", trees["class"] / "bee", trees["data"], trees["split"] / "train"]
    for folder in closed:
        folder.chmod(0o000)

    def errors() -> str:
        said = []
        for tree in trees.values():
            for look in (
                partial(load_dataset, "imagefolder", "train", tree, val_fraction=0.5),
                partial(loose_pictures, tree),
            ):
                try:
                    look()
                    said.append(f"{tree}: read")
                except DatasetError as error:
                    said.append(str(error))
        return "\n".join(said)

    subfolder, subfolder_note, class_folder, class_note, *looks_inside = as_unprivileged_user(errors).splitlines()
    who = f"{as_unprivileged_user(this_user)} read it (d---------, owned by uid {os.getuid()})"  # a container's user
    for folder, error in zip(closed[:2], (subfolder, class_folder), strict=True):
        assert error == (
            f"{folder}: cannot list this folder (Permission denied), so the images in it would be left out;"
            f" let {who}, or move it away"
        )
    refused = [f"{folder}: cannot list this folder (Permission denied); let {who}" for folder in closed[2:]]
    assert looks_inside == [line for line in refused for _ in ("load_dataset", "loose_pictures")]
    assert subfolder_note == f"{trees['subfolder']}: read" and class_note == f"{trees['class']}: read"


def test_a_linked_folder_is_walked_as_torchvisions_image_folder_walks_it_and_once_however_it_is_reached(tmp_path):
    # A linked subfolder's images were left out of their class without a word; torchvision follows the link.
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    write_folders(data, {"ant": 2, "bee": 2})
    write_folders(elsewhere, {"ant": 3})
    (data / "ant" / "more").symlink_to(elsewhere / "ant")
    theirs = torchvision.datasets.ImageFolder(str(data))
    (data / "bee" / "again").symlink_to(data / "bee")  # a link to the folder it is in: torchvision walks it for ever
    (data / "bee" / "twice").symlink_to(elsewhere / "ant")
    (data / "bee" / "thrice").symlink_to(elsewhere / "ant")

    dataset = load_dataset("imagefolder", "train", data, val_fraction=None)
    counts = Counter(dataset.classes[label] for label in dataset.labels.tolist())
    assert counts["ant"] == Counter(theirs.classes[label] for _, label in theirs.samples)["ant"] == 5
    assert counts["bee"] == 2 + 3  # its own, and elsewhere's walked once, by the first link in name order
    assert image_files(data / "bee")[2:] == [data / "bee" / "thrice" / f"{index}.png" for index in range(3)]


def test_netpbm_files_are_images_of_a_folder_as_in_torchvisions_image_folder(tmp_path):
    # GTSRB's traffic signs come as .ppm: a class folder of them stopped the run as holding no image files.
    rng = np.random.default_rng(0)
    pictures = {
        "sign": Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)),
        "face": Image.new("L", (7, 9), 90),
    }
    for name, picture in pictures.items():
        (tmp_path / name).mkdir()
        picture.save(tmp_path / name / f"0.{'ppm' if picture.mode == 'RGB' else 'pgm'}")
    theirs = torchvision.datasets.ImageFolder(str(tmp_path))
    dataset = load_dataset("imagefolder", "train", tmp_path, default_preprocess("imagefolder", 8, 3), val_fraction=None)
    assert [path for path, _ in theirs.samples] == [str(path) for path in image_files(tmp_path)]
    for image, name in zip(dataset.images, ["face", "sign"], strict=True):
        expected = pictures[name].convert("RGB").resize((8, 8), Image.Resampling.BILINEAR)
        assert np.array_equal(image.permute(1, 2, 0).numpy(), np.asarray(expected))


GREY = {"ant": 0, "bee": 100, "cow": 200}  # each class's grey level (another's: 50), plus the image's number


def write_folders(root, counts):
    """`counts` images (8 x 8, in its class's grey) of each class under root, in folders by class."""
    for label, count in counts.items():
        (root / label).mkdir(parents=True)
        for i in range(count):
            Image.new("L", (8, 8), GREY.get(label, 50) + i).save(root / label / f"{i}.png")


def test_a_folder_is_decoded_into_one_tensor_without_a_second_copy_of_it_at_the_peak(tmp_path):
    write_folders(tmp_path, {"ant": 200, "bee": 200})  # 396 training images
    script = f"""
import sys
from pathlib import Path
from model.data import default_preprocess, load_dataset
status = lambda field: int(open("/proc/self/status").read().split(field + ":")[1].split()[0]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from the present
before = status("VmHWM")
preprocess = default_preprocess("imagefolder", image_size=int(sys.argv[1]), channels=3)
dataset = load_dataset("imagefolder", "train", Path({str(tmp_path)!r}), preprocess, val_fraction=0.01)
print(status("VmHWM") - before, dataset.images.numel())
"""

    def grown(size: int) -> list[int]:
        command = [sys.executable, "-c", script, str(size)]
        return [
            int(n) for n in subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT).stdout.split()
        ]

    # The same images at 224 and at 96 pixels, 57 and 10 MiB: what the threads and imports take is the same
    # in both, and varies from machine to machine, so the difference in the peaks is what the images cost.
    (large, large_bytes), (small, small_bytes) = grown(224), grown(96)
    assert (large - small) / (large_bytes - small_bytes) < 1.5  # a list of the images, stacked at the end: 2


def test_channel_statistics_are_exact_and_take_a_slice_of_memory_not_eight_copies_of_the_images():
    images = torch.randint(0, 256, (5, 3, 7, 9), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    pixels = images.double().div(255).transpose(0, 1).flatten(1)
    mean, std = channel_statistics(images)
    assert mean == pytest.approx(pixels.mean(1).tolist(), abs=1e-12)
    assert std == pytest.approx(pixels.std(1).tolist(), abs=1e-12)
    script = """
import sys
import torch
from model.data import channel_statistics
status = lambda field: int(open("/proc/self/status").read().split(field + ":")[1].split()[0]) * 1024
images = torch.randint(0, 256, (int(sys.argv[1]), 3, 224, 224), dtype=torch.uint8)
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from the present
before = status("VmHWM")
channel_statistics(images)
print(status("VmHWM") - before)
"""

    def grown(count: int) -> int:
        command = [sys.executable, "-c", script, str(count)]
        return int(subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT).stdout)

    # 200 and 800 images, 29 and 115 MiB: what torch takes whatever the count cancels in the difference.
    per_value = (grown(800) - grown(200)) / (600 * 3 * 224 * 224)
    assert per_value < 0.5  # one slice whatever the count; as floats, scaled and transposed: 8 times the images


@pytest.mark.parametrize("layout", ["plain", "train and val"])
def test_both_splits_are_labelled_by_the_training_classes_where_one_lacks_a_class(tmp_path, layout):
    if layout == "plain":  # a class of one image has none to hold out: the test split lacks it
        write_folders(tmp_path, {"ant": 1, "bee": 4, "cow": 4})
    else:
        write_folders(tmp_path / "train", {"ant": 2, "bee": 2, "cow": 2})
        write_folders(tmp_path / "val", {"bee": 2, "cow": 2})
    preprocess = default_preprocess("imagefolder", image_size=8, channels=1)
    train, test = (load_dataset("imagefolder", split, tmp_path, preprocess) for split in ("train", "test"))
    assert train.classes == test.classes == ["ant", "bee", "cow"]
    grey = test.images[:, 0, 0, 0].long()
    assert 0 not in test.labels.tolist() and torch.equal(test.labels, grey // 100)  # bee is 1 and cow 2, as in training


def test_a_plain_trees_class_keeps_an_image_to_train_whatever_the_fraction_held_out(tmp_path):
    write_folders(tmp_path, {"ant": 2, "bee": 2, "cow": 1})
    preprocess = default_preprocess("imagefolder", image_size=8, channels=1)
    split = lambda name: load_dataset("imagefolder", name, tmp_path, preprocess, val_fraction=0.9)
    assert split("train").labels.tolist() == [0, 1, 2] and split("test").labels.tolist() == [0, 1]


def test_a_plain_trees_class_unknown_to_a_checkpoint_is_named_though_none_of_its_images_is_held_out(tmp_path):
    write_folders(tmp_path, {"ant": 1, "bee": 3})  # ant's one image stays in training
    preprocess = default_preprocess("imagefolder", image_size=8, channels=1)
    with pytest.raises(DatasetError, match="ant: not among the classes bee, cow$"):
        load_dataset("imagefolder", "test", tmp_path, preprocess, classes=["bee", "cow"])


@pytest.mark.parametrize("processes", [1, 4])
def test_a_split_whose_decoded_images_exceed_the_memory_left_is_refused_before_a_file_is_decoded(
    tmp_path, monkeypatch, processes
):
    write_folders(tmp_path, {"ant": 6, "bee": 6})  # 10 to train: 3 x 32 x 32 bytes each, 30 KiB
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(processes))  # as torchrun sets it
    monkeypatch.setattr(model.data, "available_memory", lambda: 100_000)
    preprocess = default_preprocess("imagefolder", 32, 3)
    if processes == 1:  # 30 KiB fits in 100 KB, and is decoded
        assert len(load_dataset("imagefolder", "train", tmp_path, preprocess)) == 10
        monkeypatch.setattr(model.data, "available_memory", lambda: 20_000)
    decoded = lambda *args: pytest.fail("a file was decoded")
    with pytest.raises(DatasetError) as refused:
        load_dataset("imagefolder", "train", tmp_path, preprocess, decode=decoded)
    held, left = (", held by each of the 4 processes here", "98 KiB") if processes > 1 else ("", "20 KiB")
    assert str(refused.value) == (
        f"{tmp_path}: the 10 images of its train split take 30 KiB in memory (3 x 32 x 32 bytes each){held}, more "
        f"than the {left} of memory available on this machine; fewer images (--train-limit) or smaller ones "
        "(--image-size) fit"
    )


def test_the_memory_left_is_the_kernels_or_less_under_a_cgroups_limit(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 24000000 kB\nMemAvailable:   2000000 kB\nSwapFree: 1000 kB\n")
    v2, v1, none = tmp_path / "v2", tmp_path / "v1", tmp_path / "none"
    (v1 / "memory").mkdir(parents=True)
    v2.mkdir()
    none.mkdir()
    (v2 / "memory.max").write_text("1073741824\n")
    (v2 / "memory.current").write_text("536870912\n")
    (v2 / "memory.stat").write_text("anon 400000000\ninactive_file 100000000\n")
    assert available_memory(meminfo, none) == 2_001_000 * 1024  # no cgroup: the kernel's, swap included
    assert available_memory(meminfo, v2) == 1073741824 - 536870912 + 100_000_000  # the file cache is given back
    (v2 / "memory.max").write_text("max\n")
    assert available_memory(meminfo, v2) == 2_001_000 * 1024
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    (v1 / "memory" / "memory.usage_in_bytes").write_text("5000000000\n")
    (v1 / "memory" / "memory.stat").write_text("cache 1\ntotal_inactive_file 1000\n")
    assert available_memory(meminfo, v1) == 2_001_000 * 1024
    (v1 / "memory" / "memory.limit_in_bytes").write_text("6000000000\n")
    assert available_memory(meminfo, v1) == 1_000_001_000
    assert available_memory(tmp_path / "missing", none) is None


def test_a_checkpoints_classes_label_a_folder_to_score_and_one_it_does_not_know_is_named(tmp_path):
    write_folders(tmp_path / "val", {"bee": 1, "cow": 1})
    preprocess = default_preprocess("imagefolder", image_size=8, channels=1)
    scored = load_dataset("imagefolder", "test", tmp_path, preprocess, classes=["ant", "bee", "cow"])
    assert scored.classes == ["ant", "bee", "cow"] and scored.labels.tolist() == [1, 2]
    with pytest.raises(DatasetError, match="val: cow: not among the classes ant, bee$"):
        load_dataset("imagefolder", "test", tmp_path, preprocess, classes=["ant", "bee"])
    with pytest.raises(DatasetError, match="fashion-mnist has the classes T-shirt/top, .*, not bee, cow"):
        load_dataset("fashion-mnist", "test", classes=["bee", "cow"])


def test_a_folder_scored_against_a_thousand_classes_it_does_not_match_is_named_in_a_line_not_pages(tmp_path):
    # ImageNet's val folders are named by WordNet id, and an imported head's classes by name
    write_folders(tmp_path / "val", {"ant": 1, "bee": 1})
    names = [f"class number {index}" for index in range(1000)]
    with pytest.raises(DatasetError) as error:
        load_dataset("imagefolder", "test", tmp_path, default_preprocess("imagefolder", 8, 1), classes=names)
    assert str(error.value).endswith(
        "val: ant, bee: not among the classes class number 0, class number 1, class number 2, class number 3, "
        "class number 4, class number 5, class number 6, class number 7, class number 8, class number 9 and 990 more"
    )  # it listed all 1,000, 16 KB


def test_a_built_in_dataset_of_other_classes_is_refused_before_it_is_read_or_downloaded(tmp_path, monkeypatch):
    monkeypatch.setattr("model.data.load_cifar10", lambda *args: pytest.fail("CIFAR-10 was read, or downloaded"))
    with pytest.raises(DatasetError, match="^cifar10 has the classes airplane, .*, not T-shirt/top, "):
        load_dataset("cifar10", "test", tmp_path, classes=FASHION_MNIST_CLASSES)


def test_a_limit_on_a_folder_draws_its_images_across_the_classes_and_decodes_only_those(tmp_path, monkeypatch):
    write_folders(tmp_path, {"ant": 20, "bee": 20, "cow": 20})
    read = model.data.read_image_file
    decoded = []
    monkeypatch.setattr("model.data.read_image_file", lambda path, config: decoded.append(path) or read(path, config))
    preprocess = default_preprocess("imagefolder", 8, 1)
    drawn = {seed: load_dataset("imagefolder", "train", tmp_path, preprocess, seed=seed, limit=12) for seed in (0, 1)}
    assert len(decoded) == 24 and len(drawn[0]) == 12  # the first 12 files were all ants
    assert drawn[0].labels.bincount(minlength=3).min() >= 2
    assert not torch.equal(drawn[0].images, drawn[1].images)
    again = load_dataset("imagefolder", "train", tmp_path, preprocess, seed=0, limit=12)
    assert torch.equal(again.images, drawn[0].images) and torch.equal(again.labels, drawn[0].labels)
    assert torch.equal(
        load_dataset("fashion-mnist", "test", limit=5).labels, load_dataset("fashion-mnist", "test").labels[:5]
    )


def test_images_beside_the_class_folders_are_named_as_left_out(tmp_path):
    write_folders(tmp_path / "plain", {"ant": 2, "bee": 2})
    write_folders(tmp_path / "split" / "train", {"ant": 2, "bee": 2})
    write_folders(tmp_path / "split" / "val", {"ant": 1, "bee": 1})
    for stray in ("plain/stray.png", "plain/.hidden.png", "split/train/z.JPG", "split/val/a.png", "split/cover.png"):
        Image.new("L", (8, 8)).save(tmp_path / stray, format="PNG")
    assert loose_pictures(tmp_path / "plain") == (
        f"{tmp_path / 'plain'}: left out 1 image file in no class folder: stray.png; move each into its class"
    )
    assert loose_pictures(tmp_path / "split") == (  # a cover picture beside train/ and val/ is no class's
        f"{tmp_path / 'split'}: left out 2 image files in no class folder: train/z.JPG, val/a.png; move each into "
        "its class"
    )
    (tmp_path / "plain" / "stray.png").unlink()
    assert loose_pictures(tmp_path / "plain") is None and loose_pictures(tmp_path / "missing") is None


def test_hidden_folders_and_files_are_neither_classes_nor_images(tmp_path):
    write_folders(tmp_path, {"ant": 2, "bee": 2})
    (tmp_path / ".ipynb_checkpoints").mkdir()  # what Jupyter leaves beside the class folders
    (tmp_path / ".ipynb_checkpoints" / "0-checkpoint.png").write_bytes((tmp_path / "ant" / "0.png").read_bytes())
    (tmp_path / "ant" / "._0.png").write_bytes(b"\x00\x05\x16\x07")  # a Mac's metadata beside a copied file
    (tmp_path / "bee" / ".cache").mkdir()
    (tmp_path / "bee" / ".cache" / "1.png").write_bytes((tmp_path / "bee" / "1.png").read_bytes())
    preprocess = default_preprocess("imagefolder", 8, 1)
    train, test = (load_dataset("imagefolder", split, tmp_path, preprocess) for split in ("train", "test"))
    assert train.classes == ["ant", "bee"] and len(train) + len(test) == 4


def test_a_file_named_in_bytes_that_are_not_utf8_is_read_and_such_a_class_folder_refused_by_name(tmp_path):
    # What a zip made on Windows unpacks to: names in cp1252, which Python keeps as lone surrogates.
    images = tmp_path / "images"
    write_folders(images, {"ant": 2, "bee": 2})
    (images / "ant" / "0.png").rename(images / "ant" / os.fsdecode(b"caf\xe9.png"))
    preprocess = default_preprocess("imagefolder", 8, 1)
    kept = DecodedCache(tmp_path / "kept")  # its key hashes the names: it raised UnicodeEncodeError
    train, test = (load_dataset("imagefolder", split, images, preprocess, decode=kept) for split in ("train", "test"))
    assert train.classes == ["ant", "bee"] and len(train) + len(test) == 4
    (images / "bee").rename(images / os.fsdecode(b"b\xe9e"))  # a class's name is its label in every answer
    with pytest.raises(DatasetError) as refused:
        load_dataset("imagefolder", "train", images, preprocess)  # the split's shuffle raised UnicodeEncodeError
    assert str(refused.value) == (
        f"{images}: 1 class folder named in bytes that are not UTF-8 (b\\xe9e), and a class's name is its label "
        "in every answer: rename it (convmv -f cp1252 -t utf-8 --notest, where a zip made on Windows named it)"
    )


@pytest.mark.skipif(not READS_AVIF, reason="this Pillow was built without libavif, so .avif files are not images")
def test_avif_files_in_a_class_folder_are_images_of_it(tmp_path):
    write_folders(tmp_path / "train", {"ant": 2, "bee": 2})
    (tmp_path / "val" / "ant").mkdir(parents=True)
    Image.new("L", (8, 8), 0).save(tmp_path / "val" / "ant" / "photo.AVIF", "AVIF")  # as a phone or a browser names it
    test = load_dataset("imagefolder", "test", tmp_path, default_preprocess("imagefolder", 8, 1))
    assert test.labels.tolist() == [0] and test.images.max() < 16  # the black picture, within AVIF's loss


@pytest.mark.skipif(not READS_HEIF, reason="pi-heif is not installed, so .heic files are not images")
def test_an_iphones_heic_photos_in_a_class_folder_are_images_of_it_turned_upright(tmp_path):
    write_folders(tmp_path / "train", {"ant": 2, "bee": 2})
    (tmp_path / "val" / "ant").mkdir(parents=True)
    shutil.copy(HEIC_FILES / "turned.heic", tmp_path / "val" / "ant" / "IMG_0001.HEIC")  # as an iPhone names it
    preprocess = PreprocessConfig(image_size=10, channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    test = load_dataset("imagefolder", "test", tmp_path, preprocess)
    red = test.images[0, 0].float()  # stored with red growing left to right; upright, it grows downwards
    assert test.labels.tolist() == [0] and red[-1].mean() - red[0].mean() > 150 and red[5].std() < 10


def test_every_unreadable_file_of_a_folder_is_named_in_one_error(tmp_path):
    write_folders(tmp_path / "train", {"ant": 3, "bee": 3})
    write_folders(tmp_path / "val", {"ant": 1, "bee": 1})
    (tmp_path / "train" / "ant" / "notes.png").write_text("not an image")
    (tmp_path / "train" / "bee" / "2.png").write_bytes((tmp_path / "train" / "bee" / "1.png").read_bytes()[:30])
    with pytest.raises(DatasetError) as error:
        load_dataset("imagefolder", "train", tmp_path, default_preprocess("imagefolder", 8, 1))
    lines = str(error.value).splitlines()
    assert lines[0] == f"{tmp_path / 'train'}: 2 of 7 image files cannot be read; remove or fix them:"
    assert [line.strip().split(": ")[0] for line in lines[1:]] == [
        str(tmp_path / "train" / "ant" / "notes.png"),
        str(tmp_path / "train" / "bee" / "2.png"),
    ]


def test_a_folder_decoded_by_a_thread_per_cpu_is_the_one_that_one_thread_decodes_in_file_order(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for label in ("ant", "bee"):
        (tmp_path / label).mkdir()
        for index in range(40):
            size = tuple(int(side) for side in rng.integers(20, 90, 2))
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(tmp_path / label / f"{index}.jpg")
    (tmp_path / "bee" / "7.jpg").write_text("not an image")
    (tmp_path / "ant" / "30.jpg").write_text("not an image")
    monkeypatch.setattr("model.data.DECODED_AT_ONCE", 16)  # several rounds of the threads
    decoded = {}
    for threads in (1, 4):
        monkeypatch.setattr("model.data.cpu_share", lambda threads=threads: threads)
        files = sorted(tmp_path.rglob("*.jpg"))  # by class, then by name: the dataset's order
        decoded[threads] = decode_files(files, default_preprocess("imagefolder", 16, 3), "decode")
    (one, one_errors), (four, four_errors) = decoded[1], decoded[4]
    read = [index for index in range(len(files)) if index not in four_errors]
    assert torch.equal(one[read], four[read]) and one.shape == (80, 3, 16, 16) and len(read) == 78
    assert [files[index] for index in four_errors] == [tmp_path / "ant" / "30.jpg", tmp_path / "bee" / "7.jpg"]
    assert list(four_errors.items()) == list(one_errors.items())  # the same messages, in file order


def test_the_standard_input_is_read_in_the_calling_thread_and_the_files_in_the_pool(tmp_path, monkeypatch):
    # Read in a thread of the pool, it was read by one that Ctrl-C could leave unjoined (the interrupt came as the
    # pool started it), and `vit-predict a.png -` then ended in `Fatal Python error: _enter_buffered_busy` (134).
    readers, photo = {}, tmp_path / "photo.png"
    Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)).save(photo)

    read_file = Path.read_bytes

    def read(path=Path("-")):
        readers[path.name] = threading.current_thread()
        return read_file(photo)

    monkeypatch.setattr(sys, "stdin", SimpleNamespace(buffer=SimpleNamespace(read=read)))
    monkeypatch.setattr(Path, "read_bytes", read)
    preprocess = default_preprocess("imagefolder", 16, 1)
    images, errors = decode_files([photo, Path("-"), photo], preprocess, "decode")
    assert errors == {} and torch.equal(images[1], images[0]) and torch.equal(images[1], images[2])
    assert readers["-"] is threading.main_thread() and readers["photo.png"].name.startswith("decode")


def test_the_decoding_progress_bar_is_drawn_on_a_terminal_and_not_into_a_log_file(monkeypatch, capsys):
    # vit-train > train.log 2>&1 got one line of carriage returns per split, every bar redrawn into it.
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    split = ImageDataset(torch.zeros(1000, 1, 28, 28, dtype=torch.uint8), torch.zeros(1000, dtype=torch.int64), ["one"])
    preprocess = default_preprocess("imagefolder", 16, 1)
    resized(split, preprocess, "fashion-mnist", "test")
    assert capsys.readouterr().err == ""  # pytest's capture, like a file, is no terminal
    monkeypatch.setattr(sys, "stderr", terminal := Terminal())
    assert resized(split, preprocess, "fashion-mnist", "test").images.shape == (1000, 1, 16, 16)
    assert "resize test" in terminal.getvalue()


def test_decoded_images_are_kept_and_read_back_until_a_file_or_the_decoding_changes(tmp_path, capsys, monkeypatch):
    write_folders(tmp_path / "images", {"ant": 3, "bee": 3})
    files, kept_dir = sorted((tmp_path / "images").rglob("*.png")), tmp_path / "kept"
    calls = []

    def counted(paths, preprocess, description):
        calls.append(len(paths))
        return decode_files(paths, preprocess, description)

    kept = DecodedCache(kept_dir, counted)
    small = default_preprocess("imagefolder", 8, 1)
    first, errors = kept(files, small, "decode train")
    assert errors == {} and calls == [6] and first.shape == (6, 1, 8, 8)
    (path,) = kept_dir.iterdir()
    assert path.name.startswith("decode-train-")
    assert capsys.readouterr().err == f"{kept_dir}: 6 decoded images kept (0 KiB) for --resume and vit-evaluate\n"
    assert torch.equal(kept(files, small, "decode train")[0], first) and calls == [6]
    # The mean and std are applied to the decoded pixels later, as a run's own statistics are.
    assert torch.equal(kept(files, replace(small, mean=(0.3,), std=(0.2,)), "decode train")[0], first)
    assert calls == [6] and capsys.readouterr().err == ""

    Image.new("L", (8, 8), 255).save(files[0])  # a changed file: decoded again, and the new images replace the old
    changed, _ = kept(files, small, "decode train")
    assert calls == [6, 6] and changed[0].eq(255).all() and torch.equal(changed[1:], first[1:])
    assert [entry.name for entry in kept_dir.iterdir()] != [path.name] and len(list(kept_dir.iterdir())) == 1
    assert kept(files, default_preprocess("imagefolder", 16, 1), "decode train")[0].shape == (6, 1, 16, 16)
    assert calls == [6, 6, 6] and len(list(kept_dir.iterdir())) == 1
    test, _ = kept(files[:2], small, "decode test")  # another split's file, beside the training split's
    assert sorted(entry.name[:12] for entry in kept_dir.iterdir()) == ["decode-test-", "decode-train"]

    (test_file,) = kept_dir.glob("decode-test-*")
    test_file.write_bytes(test_file.read_bytes()[:100])  # a file cut short is decoded again
    assert torch.equal(kept(files[:2], small, "decode test")[0], test) and calls == [6, 6, 6, 2, 2]
    assert torch.equal(kept(files[:2], small, "decode test")[0], test) and calls == [6, 6, 6, 2, 2]
    reader = DecodedCache(tmp_path / "elsewhere", counted, writes=False)  # vit-evaluate's: it reads, and writes none
    assert torch.equal(reader(files[:2], small, "decode test")[0], test) and not (tmp_path / "elsewhere").exists()
    monkeypatch.setattr(model.decoded_cache, "HEIF_DECODER", "pi-heif 9.9, libheif 9.9")  # HEIC decoded otherwise
    assert torch.equal(kept(files[:2], small, "decode test")[0], test) and calls == [6, 6, 6, 2, 2, 2, 2]


def test_decoded_images_with_a_file_unread_are_not_kept_and_a_folder_that_cannot_be_written_costs_a_decode(
    tmp_path, capsys
):
    write_folders(tmp_path / "images", {"ant": 2})
    files, small = sorted((tmp_path / "images").rglob("*.png")), default_preprocess("imagefolder", 8, 1)
    (tmp_path / "images" / "ant" / "notes.png").write_text("not an image")
    for unread in (tmp_path / "images" / "ant" / "notes.png", tmp_path / "images" / "ant" / "gone.png"):
        images, errors = DecodedCache(tmp_path / "kept")([*files, unread], small, "decode train")
        assert list(errors) == [2] and images.shape == (3, 1, 8, 8) and not (tmp_path / "kept").exists()
    (tmp_path / "a-file").write_text("")
    images, errors = DecodedCache(tmp_path / "a-file" / "kept")(files, small, "decode train")
    assert errors == {} and torch.equal(images, decode_files(files, small, "decode")[0])
    assert (
        f"{tmp_path / 'a-file' / 'kept'}: the decoded images are not kept (Not a directory)" in capsys.readouterr().err
    )
    (tmp_path / "full").mkdir()  # a disk that fills as the file is written: /dev/full where its temporary goes
    (tmp_path / "full" / f".decode-train-{fingerprint(files, small)}.tmp.npy").symlink_to("/dev/full")
    images, errors = DecodedCache(tmp_path / "full")(files, small, "decode train")
    assert errors == {} and torch.equal(images, decode_files(files, small, "decode")[0])
    assert f"{tmp_path / 'full'}: the decoded images are not kept (No space left on device)" in capsys.readouterr().err
    assert not any((tmp_path / "full").iterdir())


def test_unreadable_files_of_a_folder_split_here_are_counted_against_the_split_they_fall_in(tmp_path):
    write_folders(tmp_path, {"ant": 5, "bee": 5})  # one of each class held out to test
    for index in range(5):
        (tmp_path / "bee" / f"{index}.png").write_text("not an image")
    preprocess = default_preprocess("imagefolder", 8, 1)
    for split, counts in (("train", "4 of 8"), ("test", "1 of 2")):
        with pytest.raises(DatasetError) as error:
            load_dataset("imagefolder", split, tmp_path, preprocess)
        first = str(error.value).splitlines()[0]
        assert first == f"{tmp_path}: {counts} image files in its {split} split cannot be read; remove or fix them:"


def test_a_folder_image_in_a_mode_that_cannot_be_converted_is_named_as_unreadable(tmp_path):
    write_folders(tmp_path / "train", {"ant": 1, "bee": 1})
    write_folders(tmp_path / "val", {"ant": 1, "bee": 1})
    Image.new("LAB", (8, 8)).save(tmp_path / "train" / "ant" / "lab.tif")
    with pytest.raises(DatasetError, match=r"lab.tif: image mode LAB is not accepted"):
        load_dataset("imagefolder", "train", tmp_path, default_preprocess("imagefolder", 8, 1))


def test_folder_images_are_turned_upright_by_their_exif_orientation_as_uploads_are(tmp_path):
    upright = Image.new("L", (8, 16), 0)
    upright.paste(255, (0, 0, 8, 8))  # white on top
    for label in ("turned", "plain"):
        (tmp_path / label).mkdir()
    upright.save(tmp_path / "plain" / "a.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: shown turned 90 degrees clockwise
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "turned" / "a.png", exif=exif)
    dataset = load_dataset("imagefolder", "train", tmp_path, default_preprocess("imagefolder", 8, 1), val_fraction=0.5)
    assert torch.equal(dataset.images[0], dataset.images[1])
    assert dataset.images[0, 0, 0].tolist() == [255] * 8 and dataset.images[0, 0, -1].tolist() == [0] * 8


def test_fashion_mnist_from_debian_files(fashion_test):
    assert fashion_test.images.shape == (10000, 1, 28, 28)
    assert fashion_test.classes == FASHION_MNIST_CLASSES
    assert torch.bincount(fashion_test.labels).tolist() == [1000] * 10


@pytest.mark.parametrize("damage", ["cut short", "not gzip", "labels of the other split"])
def test_damaged_fashion_mnist_files_are_named_not_a_traceback(tmp_path, damage):
    source = Path("/usr/share/datasets/fashion-mnist")
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (tmp_path / name).write_bytes((source / name).read_bytes())
    images = tmp_path / "t10k-images-idx3-ubyte.gz"
    if damage == "cut short":  # a download that stopped half way
        images.write_bytes(images.read_bytes()[:500_000])
        expected = f"{images}: not a whole gzipped IDX file (Compressed file ended"
    elif damage == "not gzip":
        images.write_text("<html>rate limited</html>")
        expected = f"{images}: not a whole gzipped IDX file"
    else:
        (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes((source / "train-labels-idx1-ubyte.gz").read_bytes())
        expected = f"{tmp_path}: (10000, 1, 28, 28) images and 60000 labels are not Fashion-MNIST's t10k split"
    with pytest.raises(DatasetError) as error:
        load_dataset("fashion-mnist", "test", tmp_path)
    assert str(error.value).startswith(expected)


def test_damaged_or_missing_cifar10_batches_are_named_not_a_traceback(tmp_path):
    folder = write_fake_cifar(tmp_path)
    (folder / "test_batch").write_bytes((folder / "test_batch").read_bytes()[:100])  # a download cut short
    with pytest.raises(DatasetError, match=f"^{folder / 'test_batch'}: not one of CIFAR-10's python batches"):
        load_dataset("cifar10", "test", tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match=f"^{folder / 'data_batch_3'}: not one of .*No such file"):
        load_dataset("cifar10", "train", tmp_path)


def test_unknown_dataset_is_refused():
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("mnist-but-spelled-wrong", "train")


def test_batch_augment_keeps_shapes_and_is_reproducible():
    images = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    augment = BatchAugment(crop_padding=2, flip=True, erasing=0.5, image_size=28)
    choices = augment.draw(8, torch.Generator().manual_seed(3))
    assert torch.equal(choices, augment.draw(8, torch.Generator().manual_seed(3)))
    cropped = augment.crop_and_flip(images, choices)
    assert cropped.shape == images.shape and cropped.dtype == torch.uint8
    erased = augment.erase(cropped.float(), choices)
    assert erased.shape == images.shape
    assert not torch.equal(cropped, images)


def test_crop_shifts_by_the_drawn_offsets_and_flip_mirrors():
    images = torch.zeros(2, 1, 6, 6)
    images[:, 0, 2, 1] = 1.0
    augment = BatchAugment(crop_padding=2, flip=True, erasing=0.0, image_size=6)
    # Row 0: crop at (top 0, left 2) shifts the pixel down 2 and keeps its column; no flip.
    # Row 1: crop at (2, 2) keeps it in place, then the flip mirrors column 1 to column 4.
    choices = torch.tensor([[0, 2, 0, 0, 0, 0, 0, 0], [2, 2, 1, 0, 0, 0, 0, 0]])
    out = augment.crop_and_flip(images, choices)
    assert (out[0, 0] == 1).nonzero().tolist() == [[4, 1]]
    assert (out[1, 0] == 1).nonzero().tolist() == [[2, 4]]


def test_erasing_zeroes_exactly_the_drawn_rectangle():
    images = torch.ones(2, 3, 8, 8)
    augment = BatchAugment(crop_padding=0, flip=False, erasing=1.0, image_size=8)
    choices = torch.tensor([[0, 0, 0, 1, 1, 2, 3, 4], [0, 0, 0, 0, 1, 2, 3, 4]])  # only row 0 erases
    out = augment.erase(images, choices)
    assert out[0].sum() == 3 * (64 - 12)
    assert out[0, :, 1:4, 2:6].abs().sum() == 0
    assert torch.equal(out[1], images[1])


def test_a_missing_dataset_without_torchvision_says_how_to_download_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # as in the image, which serves without torchvision
    with pytest.raises(RuntimeError, match=r"CIFAR10 is not on disk.*pip install 'vit-serving\[datasets\]'"):
        load_dataset("cifar10", "test", data_dir=tmp_path)


@pytest.mark.parametrize("dataset", ["cifar10", "fashion-mnist"])
def test_a_missing_dataset_that_cannot_be_downloaded_says_where_its_files_go(tmp_path, monkeypatch, dataset):
    def offline(request, *args, **kwargs):
        raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))

    monkeypatch.setattr(urllib.request, "urlopen", offline)  # what a machine without the internet gets
    with pytest.raises(DatasetError) as error:
        load_dataset(dataset, "test", data_dir=tmp_path)
    message = str(error.value)
    name = "CIFAR10" if dataset == "cifar10" else "FashionMNIST"
    assert message.startswith(f"{name} is not in {tmp_path}, and downloading it failed (") and "\n" not in message
    assert "Name or service not known" in message
    assert message.endswith("); put its files there, or point --data-dir at them")


def test_a_missing_fashion_mnist_split_is_downloaded_alone_and_gives_the_same_images(
    tmp_path, monkeypatch, fashion_test
):
    served = {path.name: path.read_bytes() for path in model.data.FASHION_MNIST_DIR.glob("*.gz")}
    fetched = []

    class Response(io.BytesIO):  # what urlopen answers: the file, at the address asked for
        def __init__(self, url: str) -> None:
            super().__init__(served[url.rsplit("/", 1)[1]])
            self.url, self.length = url, len(self.getvalue())

    def mirror(request, *args, **kwargs):
        if request.headers.get("Method") != "HEAD":
            fetched.append(request.full_url.rsplit("/", 1)[1])
        return Response(request.full_url)

    monkeypatch.setattr(urllib.request, "urlopen", mirror)
    # Debian's files are gzipped anew: the same images under other checksums than the mirror's
    resources = [
        (name, hashlib.md5(served[name]).hexdigest()) for name, _ in torchvision.datasets.FashionMNIST.resources
    ]
    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "resources", resources)
    downloaded = load_dataset("fashion-mnist", "test", data_dir=tmp_path)
    assert sorted(fetched) == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    assert torch.equal(downloaded.images, fashion_test.images) and torch.equal(downloaded.labels, fashion_test.labels)
    assert load_dataset("fashion-mnist", "test", data_dir=tmp_path).images.shape == (10_000, 1, 28, 28)
    assert len(fetched) == 2  # read from the folder the second time


@pytest.mark.parametrize("policy", ["trivialaugment", "randaugment"])
def test_a_policy_changes_uint8_batches_and_repeats_under_the_same_seed(policy, fashion_test):
    images = fashion_test.images[:256]
    first = apply_policy(make_policy(policy), images, seed=5)
    assert torch.equal(first, apply_policy(make_policy(policy), images, seed=5))
    assert first.shape == images.shape and first.dtype == torch.uint8
    changed = (first != images).flatten(1).any(1)  # (B,)
    groups = changed.split(GROUP)
    assert sum(group.any() for group in groups) >= len(groups) // 2  # most groups drew an op that changes pixels


def test_the_policy_workers_give_what_one_process_computes_in_the_epochs_order(fashion_test):
    images = fashion_test.images
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[: TASK + 100]
    feed = PolicyFeed("trivialaugment", images, workers=2)
    try:
        feed.submit(3, order, seed=40)
        feed.submit(4, order.flip(0), seed=50)  # the next epoch, started before this one is taken
        epoch_3, epoch_4 = feed.result(3), feed.result(4)
    finally:
        feed.close()
    policy = make_policy("trivialaugment")
    expected = [apply_policy(policy, images[order[:TASK]], 40), apply_policy(policy, images[order[TASK:]], 41)]
    assert torch.equal(epoch_3, torch.cat(expected))  # one seed per task, whichever worker ran it
    assert epoch_4.shape == (TASK + 100, 1, 28, 28) and not torch.equal(epoch_4, epoch_3.flip(0))


def test_an_epoch_from_the_policy_workers_is_gathered_into_one_tensor_as_its_tasks_are_let_go():
    script = """
import torch
from model.paths import this_user
from model.policy_feed import TASK, PolicyFeed
status = lambda field: int(open("/proc/self/status").read().split(field + ":")[1].split()[0]) * 1024
images = torch.randint(0, 256, (16 * TASK, 3, 32, 32), dtype=torch.uint8)  # 96 MiB, in 16 tasks
feed = PolicyFeed("trivialaugment", images, workers=2)
try:
    feed.submit(0, torch.arange(1), seed=0)
    feed.result(0)  # the workers have started, and the training set is in shared memory
    open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from the present
    before = status("VmHWM")
    feed.submit(1, torch.arange(len(images)), seed=1)
    epoch = feed.result(1)
    print((status("VmHWM") - before) / images.numel())
finally:
    feed.close()
"""
    grown = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT)
    # The epoch itself and one task's images: 1.06 times. Concatenated, the tasks' images were read whole while
    # the epoch was written, 2 times, and pinned for a GPU, 3.
    assert float(grown.stdout) < 1.5


def test_mixing_gives_probabilities_and_blends_pairs_of_images():
    images, labels = torch.randn(16, 1, 28, 28), torch.arange(16) % 10
    torch.manual_seed(0)
    mixed, targets = BatchMix(mixup=0.8, cutmix=0.0, num_classes=10)(images, labels)
    assert targets.shape == (16, 10) and torch.allclose(targets.sum(1), torch.ones(16))
    share = targets[0, labels[0]]  # MixUp blends each image with its neighbour in the batch, by one drawn share
    assert torch.allclose(mixed[0], share * images[0] + (1 - share) * images[-1], atol=1e-5)
    torch.manual_seed(0)
    cut, targets = BatchMix(mixup=0.0, cutmix=1.0, num_classes=10)(images, labels)
    from_neighbour = (cut[0] == images[-1]).float().mean()  # CutMix pastes a box: the label follows its area
    assert torch.allclose(1 - from_neighbour, targets[0, labels[0]], atol=1e-5)
    with pytest.raises(ValueError, match="--mixup or --cutmix"):
        BatchMix(mixup=0.0, cutmix=0.0, num_classes=10)


def test_repeated_augmentation_puts_copies_in_one_batch_and_keeps_the_epoch_length():
    indices = torch.randperm(100)
    out = repeated(indices, batch_size=12, repeats=3)
    assert len(out) == 100
    *full, last = out.split(12)
    for batch in full:
        assert len(batch.unique()) == 4
        assert torch.equal(batch[:4], batch[4:8]) and torch.equal(batch[:4], batch[8:])  # a batch-share apart
    assert len(last.unique()) == 4  # a last, short batch holds 4 images, once each
    assert len(out.unique()) == 8 * 4 + 4
    assert torch.equal(repeated(indices, batch_size=12, repeats=1), indices)


def test_an_augmentation_option_without_torchvision_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(RuntimeError, match=r"--augment trivialaugment needs torchvision: pip install"):
        PolicyFeed("trivialaugment", torch.zeros(4, 1, 28, 28, dtype=torch.uint8), workers=1)
    with pytest.raises(RuntimeError, match=r"--mixup or --cutmix needs torchvision"):
        BatchMix(mixup=0.8, cutmix=0.0, num_classes=10)
