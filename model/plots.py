"""Matplotlib figures written as PNG files: training curves and confusion matrices."""

from __future__ import annotations

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


def plot_confusion_matrix(matrix: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    """Rows are true classes, columns predicted ones; each cell shows its count."""
    figure, axes = plt.subplots(figsize=(1.0 + 0.75 * len(classes), 0.75 + 0.7 * len(classes)), layout="constrained")
    image = axes.imshow(matrix, cmap="viridis")
    axes.set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted", ylabel="true", title=title)
    axes.set_xticklabels(classes, rotation=45, ha="right")
    axes.set_yticklabels(classes)
    threshold = matrix.max() / 2
    for row in range(len(classes)):
        for column in range(len(classes)):
            color = "black" if matrix[row, column] > threshold else "white"
            axes.text(column, row, int(matrix[row, column]), ha="center", va="center", color=color, fontsize=8)
    figure.colorbar(image, ax=axes, shrink=0.8)
    figure.savefig(path, format="png", dpi=100)  # a PNG under the name given, whatever its suffix
    plt.close(figure)
