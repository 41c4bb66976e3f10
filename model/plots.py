"""Matplotlib figures written as PNG files: training curves and confusion matrices."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator


def plot_training_curves(records: list[dict], path: Path) -> None:
    """Loss and accuracy per epoch, train beside test, from the lines of metrics.jsonl, as a PNG."""
    figure = training_curves(records)
    figure.savefig(path, format="png", dpi=100)
    plt.close(figure)


def training_curves(records: list[dict]) -> plt.Figure:
    epochs = [record["epoch"] for record in records]
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    loss_axes.plot(epochs, [r["train_loss"] for r in records], label="train (augmented, smoothed labels)")
    loss_axes.plot(epochs, [r["test_loss"] for r in records], label="test")
    loss_axes.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    accuracy_axes.plot(epochs, [100 * r["train_accuracy"] for r in records], label="train (augmented)")
    accuracy_axes.plot(epochs, [100 * r["test_accuracy"] for r in records], label="test")
    accuracy_axes.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    short = len(epochs) <= 30  # a point and a tick per epoch: a 1-epoch run has a single point, no line
    for axes in (loss_axes, accuracy_axes):
        for line in axes.get_lines():
            line.set_marker("o" if short else "")
        if short:
            axes.set_xticks(epochs)
        else:
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        axes.legend()
    return figure


# Up to ANNOTATED classes each cell shows its count, and up to NAMED each row and column its class; beyond,
# the colours say it, in a figure of at most MAX_INCHES a side. Drawn at 0.75 inch a class with every count,
# 101 classes took 25 s and 1.7 GB, and 1,000 (an ImageNet head) a picture of 5 billion pixels.
ANNOTATED, NAMED, MAX_INCHES = 30, 100, 16.0


MISSING_GLYPH = re.compile(r"Glyph (\d+) .*missing from font")  # Matplotlib's warning, one per character


def plot_confusion_matrix(matrix: np.ndarray, classes: list[str], path: Path, title: str) -> str:
    """The confusion matrix as a PNG under the name given, whatever its suffix. Returns the characters of class
    names that the font has no glyph for, which it draws as boxes (猫, where only DejaVu Sans is installed):
    Matplotlib warned of each in two lines of its own source."""
    figure = confusion_figure(matrix, classes, title)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        figure.savefig(path, format="png", dpi=100)
    plt.close(figure)
    lacking = []
    for warning in caught:
        if found := MISSING_GLYPH.match(str(warning.message)):
            lacking.append(chr(int(found[1])))
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return "".join(dict.fromkeys(lacking))


def confusion_figure(matrix: np.ndarray, classes: list[str], title: str) -> plt.Figure:
    """Rows are true classes, columns predicted ones; each cell shows its count where there is room."""
    count = len(classes)
    size = (min(1.0 + 0.75 * count, MAX_INCHES), min(0.75 + 0.7 * count, MAX_INCHES))
    figure, axes = plt.subplots(figsize=size, layout="constrained")
    image = axes.imshow(matrix, cmap="viridis", interpolation="nearest")
    axes.set(xlabel="predicted", ylabel="true", title=title)
    if count <= NAMED:
        font = min(10.0, 0.6 * 72 * MAX_INCHES / count)  # points: a label's share of the side, with room between
        axes.set_xticks(range(count), classes, rotation=45, ha="right", fontsize=font)
        axes.set_yticks(range(count), classes, fontsize=font)
    else:
        axes.set(xticks=[], yticks=[], xlabel=f"predicted ({count} classes, in the checkpoint's order)")
    if count <= ANNOTATED:
        threshold = matrix.max() / 2
        for row in range(count):
            for column in range(count):
                color = "black" if matrix[row, column] > threshold else "white"
                axes.text(column, row, int(matrix[row, column]), ha="center", va="center", color=color, fontsize=8)
    figure.colorbar(image, ax=axes, shrink=0.8)
    return figure
