"""Class probabilities ranked into answers: what /predict, the v2 protocol and vit-predict return.

Plain Python on lists of floats, without torch, so that a server process that never runs the model
(a front end of the model process) ranks its answers too.
"""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_TOP_K = 5


def default_top_k(num_classes: int) -> int:
    """What /predict and vit-predict return without top_k: five classes, or all of a smaller model's."""
    return min(DEFAULT_TOP_K, num_classes)


def ranked_classes(probabilities: Sequence[Sequence[float]], classes: list[str], k: int) -> list[list[dict]]:
    """Rows of class probabilities -> each row's k most likely classes as ``{"label", "index", "probability"}``.

    A stable sort, as torch.sort(stable=True) would be, but on Python floats: a request ranks one row of
    a few classes, where a tensor's set-up costs far more than the sort. Ties keep class order.
    """
    return [
        [
            {"label": classes[index], "index": index, "probability": row[index]}
            for index in sorted(range(len(row)), key=row.__getitem__, reverse=True)[:k]
        ]
        for row in probabilities
    ]
