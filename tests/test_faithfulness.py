"""The deletion test on 200 test images: maps that point at evidence beat random patches."""

import torch

from model.checkpoint import load_checkpoint
from model.evaluate import preprocess_dataset
from model.faithfulness import blank_top_patches, deletion_table
from model.preprocess import normalize


def test_blanking_sets_exactly_the_top_patches():
    inputs = torch.ones(1, 1, 4, 4)
    maps = torch.tensor([[[0.9, 0.1], [0.2, 0.3]]])  # a 2 x 2 grid of 2 x 2 patches
    blanked = blank_top_patches(inputs, maps, fraction=0.5, blank=torch.tensor([-1.0]))
    assert blanked[0, 0].tolist() == [[-1, -1, 1, 1], [-1, -1, 1, 1], [1, 1, -1, -1], [1, 1, -1, -1]]


def test_gradient_and_rollout_maps_are_more_faithful_than_random_patches(shipped_checkpoint, fashion_test):
    checkpoint = load_checkpoint(shipped_checkpoint)
    images = fashion_test.subset(200)
    inputs = preprocess_dataset(images, checkpoint.preprocess)
    black = normalize(
        torch.zeros(checkpoint.preprocess.channels, 1, 1, dtype=torch.uint8), checkpoint.preprocess
    ).flatten()
    drops = deletion_table(checkpoint.model, inputs, images.labels, black)["drop_points"]["20%"]
    print(drops)
    assert drops["gradient"] > drops["random"]
    assert drops["rollout"] > drops["random"]
