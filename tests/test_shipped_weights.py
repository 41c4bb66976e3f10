"""The shipped checkpoint, scored on all 10,000 Fashion-MNIST test images through the serving preprocessing."""

import re

import torch

from model import DEFAULT_CHECKPOINT
from model.checkpoint import load_checkpoint
from model.evaluate import predict, preprocess_dataset

ACCURACY_FLOOR = 93.0
CARD = DEFAULT_CHECKPOINT.parent / "README.md"


def card_accuracy() -> float:
    match = re.search(r"^\| test accuracy[^|]*\| ([\d.]+) % \|", CARD.read_text(), re.MULTILINE)
    assert match, f"{CARD} has no '| test accuracy ... | NN.NN % |' row"
    return float(match.group(1))


def test_shipped_checkpoint_accuracy_matches_its_model_card(shipped_checkpoint, fashion_test):
    checkpoint = load_checkpoint(shipped_checkpoint)
    # Each image goes through the same PIL path an upload does.
    inputs = preprocess_dataset(fashion_test, checkpoint.preprocess)
    predictions = predict(checkpoint.model, inputs, torch.device("cpu"))
    accuracy = 100.0 * (predictions == fashion_test.labels).double().mean().item()
    print(f"shipped checkpoint: {accuracy:.2f} % on {len(fashion_test)} test images")
    assert accuracy >= ACCURACY_FLOOR
    assert accuracy >= card_accuracy() - 0.1
