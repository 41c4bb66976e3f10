"""The shipped checkpoint, scored on all 10,000 Fashion-MNIST test images through the serving preprocessing."""

import re
from pathlib import Path

import torch
from PIL import Image

from model.checkpoint import load_checkpoint
from model.preprocess import preprocess_image

ACCURACY_FLOOR = 90.0
CARD = Path(__file__).resolve().parents[1] / "weights" / "README.md"


def card_accuracy() -> float:
    match = re.search(r"^\| test accuracy[^|]*\| ([\d.]+) % \|", CARD.read_text(), re.MULTILINE)
    assert match, f"{CARD} has no '| test accuracy ... | NN.NN % |' row"
    return float(match.group(1))


@torch.inference_mode()
def test_shipped_checkpoint_accuracy_matches_its_model_card(shipped_checkpoint, fashion_test):
    checkpoint = load_checkpoint(shipped_checkpoint)
    # Each image goes through the same PIL path an upload does.
    inputs = torch.stack([preprocess_image(Image.fromarray(image[0].numpy()), checkpoint.preprocess) for image in fashion_test.images])
    predictions = torch.cat([checkpoint.model(batch).argmax(1) for batch in inputs.split(500)])
    accuracy = 100.0 * (predictions == fashion_test.labels).double().mean().item()
    print(f"shipped checkpoint: {accuracy:.2f} % on {len(fashion_test)} test images")
    assert accuracy >= ACCURACY_FLOOR
    assert accuracy >= card_accuracy() - 0.1
