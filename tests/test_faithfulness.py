"""The deletion test on 200 test images: maps that point at evidence beat random patches."""

import torch

from bench.attention_faithfulness import blank_top_patches, deletion_table, load_inputs


def test_blanking_sets_exactly_the_top_patches():
    inputs = torch.ones(1, 1, 4, 4)
    maps = torch.tensor([[[0.9, 0.1], [0.2, 0.3]]])  # a 2 x 2 grid of 2 x 2 patches
    blanked = blank_top_patches(inputs, maps, fraction=0.5, blank=torch.tensor([-1.0]))
    assert blanked[0, 0].tolist() == [[-1, -1, 1, 1], [-1, -1, 1, 1], [1, 1, -1, -1], [1, 1, -1, -1]]


def test_gradient_and_rollout_maps_are_more_faithful_than_random_patches(shipped_checkpoint):
    model, inputs, labels, blank = load_inputs(shipped_checkpoint, 200)
    drops = deletion_table(model, inputs, labels, blank)["drop_points"]["20%"]
    print(drops)
    assert drops["gradient"] > drops["random"]
    assert drops["rollout"] > drops["random"]
