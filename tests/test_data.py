import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from model.data import CIFAR10_CLASSES, FASHION_MNIST_CLASSES, BatchAugment, channel_statistics, default_preprocess, load_dataset


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


def test_image_folder_loads_with_classes_from_folder_names(tmp_path):
    for split, count in (("train", 3), ("val", 2)):
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
    mean, std = channel_statistics(train.images)
    assert mean == pytest.approx((0.5, 0.0, 0.5), abs=1e-6)


def test_image_folder_without_splits_says_what_it_needs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no train folder"):
        load_dataset("imagefolder", "train", tmp_path)


def test_fashion_mnist_from_debian_files(fashion_test):
    assert fashion_test.images.shape == (10000, 1, 28, 28)
    assert fashion_test.classes == FASHION_MNIST_CLASSES
    assert torch.bincount(fashion_test.labels).tolist() == [1000] * 10


def test_unknown_dataset_is_refused():
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("mnist-but-spelled-wrong", "train")


def test_batch_augment_keeps_shapes_and_is_reproducible():
    images = torch.rand(8, 1, 28, 28)
    first = BatchAugment(2, True, 0.5, torch.Generator().manual_seed(3))
    second = BatchAugment(2, True, 0.5, torch.Generator().manual_seed(3))
    out = first.erase(first.crop_and_flip(images))
    assert out.shape == images.shape
    assert torch.equal(out, second.erase(second.crop_and_flip(images)))
    assert not torch.equal(out, images)


def test_crop_with_padding_shifts_content():
    images = torch.zeros(1, 1, 6, 6)
    images[0, 0, 2, 2] = 1.0
    augment = BatchAugment(crop_padding=2, flip=False, erasing=0.0, generator=torch.Generator().manual_seed(0))
    shifted = augment.crop_and_flip(images)
    assert shifted.sum() <= 1.0  # a crop moves the pixel or cuts it off, never duplicates it
    if shifted.sum() == 1.0:
        row, col = (shifted[0, 0] == 1).nonzero()[0].tolist()
        assert abs(row - 2) <= 2 and abs(col - 2) <= 2
