"""Your own model, end to end through the real commands: vit-train on a generated 3-class tree of RGB images,
vit-evaluate, vit-serve with the result, /predict, /attention, v2 infer, vit-predict and the demo page."""

import base64
import json
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from playwright.sync_api import sync_playwright

from tests.support.browser import VIEWPORT, analyse, launch
from tests.support.commands import run_module
from tests.support.server import running_server

CLASSES = ["blue", "green", "red"]


def write_plain_tree(root: Path, per_class: int = 12) -> Path:
    """root/<class>/*.png, 40 x 40 RGB, one dominant channel per class: no train/ or val/ folders."""
    rng = np.random.default_rng(0)
    for channel, name in zip((2, 1, 0), CLASSES, strict=True):
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            pixels = rng.integers(0, 80, (40, 40, 3), dtype=np.uint8)
            pixels[:, :, channel] = rng.integers(170, 256, (40, 40), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{index}.png")
    return root


def test_train_evaluate_serve_explain_and_show_a_model_of_your_own_images(tmp_path):
    data = write_plain_tree(tmp_path / "colours")
    out = tmp_path / "run"
    train = run_module(
        "model.train",
        *("--dataset", "imagefolder", "--data-dir", data, "--image-size", "32", "--channels", "3"),
        *("--model", "nano", "--epochs", "3", "--warmup-epochs", "1", "--batch-size", "16", "--lr", "3e-3"),
        *("--name", "colours", "--out-dir", out, "--device", "cpu"),
    )
    assert train.returncode == 0, train.stderr
    checkpoint = out / "model.safetensors"

    evaluate = run_module("model.evaluate", "--checkpoint", checkpoint, "--device", "cpu")  # the dataset: recorded
    assert evaluate.returncode == 0, evaluate.stderr
    assert "on 6 imagefolder test images" in evaluate.stdout  # 2 of each class's 12 held out
    assert (out / "model-confusion.png").is_file()

    sample = data / "red" / "0.png"
    upload = {"file": ("red.png", sample.read_bytes(), "image/png")}
    with running_server({"VIT_CHECKPOINT": str(checkpoint), "VIT_DEVICE": "cpu", "VIT_WORKERS": "1"}, app=None) as s:
        predicted = httpx.post(f"{s.base_url}/predict", files=upload, timeout=30)
        attention = httpx.post(f"{s.base_url}/attention", files=upload, timeout=30)
        encoded = base64.b64encode(sample.read_bytes()).decode()
        infer = httpx.post(
            f"{s.base_url}/v2/models/colours/infer",
            json={"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [encoded]}]},
            timeout=30,
        )
        with sync_playwright() as playwright:
            browser = launch(playwright)
            page = browser.new_page(viewport=VIEWPORT)
            analyse(page, s.base_url, sample)
            shown = page.locator("#predictions .label").all_inner_texts()
            browser.close()

    assert predicted.status_code == 200, predicted.text
    answer = predicted.json()
    assert answer["model"] == "colours"
    assert sorted(p["label"] for p in answer["results"][0]["predictions"]) == CLASSES  # top_k: min(5, 3)
    assert attention.status_code == 200 and attention.headers["content-type"] == "image/png"
    assert infer.status_code == 200 and infer.json()["outputs"][0]["shape"] == [1, 3]
    assert sorted(shown) == CLASSES

    cli = run_module("model.predict", sample, "--checkpoint", checkpoint, "--format", "json", "--device", "cpu")
    assert cli.returncode == 0, cli.stderr
    printed = json.loads(cli.stdout)["results"][0]["predictions"]
    assert [p["label"] for p in printed] == [p["label"] for p in answer["results"][0]["predictions"]]
