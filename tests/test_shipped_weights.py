"""The shipped checkpoint, scored on all 10,000 Fashion-MNIST test images through the serving preprocessing,
by our model and by timm's with the same weights."""

import re

import pytest
import torch

from model import DEFAULT_CHECKPOINT
from model.checkpoint import Checkpoint, load_checkpoint
from model.evaluate import predict, preprocess_dataset, timm_copy

ACCURACY_FLOOR = 93.0
CARD = DEFAULT_CHECKPOINT.parent / "README.md"


def card_accuracy() -> float:
    match = re.search(r"^\| test accuracy[^|]*\| ([\d.]+) % \|", CARD.read_text(), re.MULTILINE)
    assert match, f"{CARD} has no '| test accuracy ... | NN.NN % |' row"
    return float(match.group(1))


@pytest.fixture(scope="module")
def shipped(shipped_checkpoint, fashion_test) -> tuple[Checkpoint, torch.Tensor, torch.Tensor]:
    """The checkpoint, the test images through the same PIL path an upload takes, and our top-1 for each."""
    checkpoint = load_checkpoint(shipped_checkpoint)
    inputs = preprocess_dataset(fashion_test, checkpoint.preprocess)
    return checkpoint, inputs, predict(checkpoint.model, inputs, torch.device("cpu"))


def test_shipped_checkpoint_accuracy_matches_its_model_card(shipped, fashion_test):
    _, _, predictions = shipped
    accuracy = 100.0 * (predictions == fashion_test.labels).double().mean().item()
    print(f"shipped checkpoint: {accuracy:.2f} % on {len(fashion_test)} test images")
    assert accuracy >= ACCURACY_FLOOR
    assert accuracy >= card_accuracy() - 0.1


def test_timm_with_the_shipped_weights_gives_our_class_for_every_test_image(shipped):
    checkpoint, inputs, predictions = shipped
    theirs = predict(timm_copy(checkpoint.model), inputs, torch.device("cpu"))
    assert torch.equal(theirs, predictions)
