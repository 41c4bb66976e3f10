"""The README's gallery: real /attention answers from the shipped model, one column per method.

python -m bench.attention_gallery          # writes docs/gallery/methods.png and grid.png
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import httpx
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from PIL import Image

from model.data import load_dataset
from tests.support.server import running_server

GALLERY = Path(__file__).resolve().parents[1] / "docs" / "gallery"
TEST_IMAGES = (0, 1, 8, 13, 18)  # test-set ankle boot, pullover, sandal, dress and bag
DISPLAY_SIZE = 112
METHODS = {
    "raw (layer 2)": {"method": "raw", "layer": 2},
    "last": {"method": "last"},
    "rollout": {"method": "rollout"},
    "gradient": {"method": "gradient"},
    "threshold (60 %)": {"method": "threshold", "mass": 0.6},
}


def attention_png(client: httpx.Client, image: bytes, **params) -> Image.Image:
    response = client.post("/attention", params=params, files={"file": ("image.png", image, "image/png")})
    response.raise_for_status()
    return Image.open(io.BytesIO(response.content)).convert("RGB")


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    GALLERY.mkdir(parents=True, exist_ok=True)
    test = load_dataset("fashion-mnist", "test")
    uploads = []
    for index in TEST_IMAGES:
        buffer = io.BytesIO()
        Image.fromarray(test.images[index, 0].numpy()).resize(
            (DISPLAY_SIZE, DISPLAY_SIZE), Image.Resampling.NEAREST
        ).save(buffer, "PNG")
        uploads.append((test.classes[int(test.labels[index])], buffer.getvalue()))
    with running_server({"VIT_DEVICE": "cpu"}) as server, httpx.Client(base_url=server.base_url, timeout=30) as client:
        figure, axes = plt.subplots(
            len(uploads), len(METHODS) + 1, figsize=(2 * (len(METHODS) + 1), 2 * len(uploads)), squeeze=False
        )
        for row, (label, image) in enumerate(uploads):
            cells = [Image.open(io.BytesIO(image)).convert("RGB")]
            cells += [attention_png(client, image, **params) for params in METHODS.values()]
            for column, (cell, title) in enumerate(zip(cells, ["input", *METHODS], strict=True)):
                axes[row][column].imshow(cell)
                axes[row][column].set_xticks([])
                axes[row][column].set_yticks([])
                if row == 0:
                    axes[row][column].set_title(title, fontsize=10)
            axes[row][0].set_ylabel(label, fontsize=10)
        figure.tight_layout()
        figure.savefig(GALLERY / "methods.png", dpi=80)
        plt.close(figure)
        attention_png(client, uploads[0][1], view="grid").save(GALLERY / "grid.png")
    print(f"wrote {GALLERY}")


if __name__ == "__main__":
    main()
