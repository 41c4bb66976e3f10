"""/attention through HTTP: every method and view, JSON values, batching invariance, bad parameters."""

import asyncio
import io
import itertools

import numpy as np
import pytest
from PIL import Image

from tests.support.client import explain, maps_alone_and_together, run
from tests.support.images import image_bytes
from tests.support.models import save_small_checkpoint

METHODS = ["raw", "last", "rollout", "gradient", "threshold"]
SIZES = ["original", "input"]


@pytest.fixture(scope="module")
def boot_png(fashion_test):
    """A test-set ankle boot, enlarged to 84 x 56 so the output size tells original from input."""
    return image_bytes(Image.fromarray(fashion_test.images[0, 0].numpy()).resize((84, 56)))


def test_every_method_and_view_gives_a_png_at_the_requested_size(boot_png):
    # the grid is every head's raw attention, whatever the method: it is asked for with raw or no method
    cases = [*itertools.product(METHODS, ["overlay", "heatmap"], SIZES), *(("raw", "grid", size) for size in SIZES)]

    async def scenario(client):
        return [
            await explain(client, boot_png, method=m, view=v, size=s, colormap="magma", upsample="nearest")
            for m, v, s in cases
        ]

    for (method, view, size), response in zip(cases, run(scenario), strict=True):
        assert response.status_code == 200, (method, view, size, response.text)
        assert response.headers["content-type"] == "image/png"
        picture = Image.open(io.BytesIO(response.content))
        picture.load()
        if view != "grid":
            assert picture.size == ((84, 56) if size == "original" else (28, 28)), (method, view, size)
        else:
            assert picture.width > 300 and picture.height > 500  # 6 layers x 4 heads of labelled cells


def test_the_png_is_named_after_the_upload_and_the_method_for_curl_oj_and_downloads(boot_png):
    names = ["boot.jpg", "C:\\photos\\boot.png", "Stiefel \u00fc; x.png", "."]

    async def scenario(client):
        asked = [
            ("boot.jpg", {}),
            *((name, {"method": "gradient"}) for name in names[1:]),
            ("boot.jpg", {"view": "grid"}),
        ]
        return [
            await client.post("/attention", files={"file": (name, boot_png, "image/png")}, params=params)
            for name, params in asked
        ]

    answers = run(scenario)
    assert [answer.status_code for answer in answers] == [200] * 5
    assert [answer.headers["content-disposition"] for answer in answers] == [
        'inline; filename="boot-rollout.png"',
        'inline; filename="boot-gradient.png"',  # a Windows browser's path, cut to its last part
        "inline; filename*=utf-8''Stiefel%20%C3%BC%3B%20x-gradient.png",  # no upload's name can break the header
        'inline; filename="image-gradient.png"',  # a name with no stem
        'inline; filename="boot-grid.png"',
    ]


def test_a_centre_cropping_models_overlay_covers_the_part_of_the_picture_it_saw(tmp_path):
    checkpoint = save_small_checkpoint(tmp_path / "crop.safetensors", ["a", "b"], rgb_size=32, crop_pct=0.8)
    picture = np.zeros((200, 300, 3), np.uint8)
    picture[:, :, 0] = np.arange(300) * 255 // 299  # red rises from left to right, green from top to bottom
    picture[:, :, 1] = (np.arange(200) * 255 // 199)[:, None]
    upload = image_bytes(picture)
    overlay = run(lambda client: explain(client, upload, alpha=0.0), checkpoint=checkpoint)
    assert overlay.status_code == 200, overlay.text
    seen = np.asarray(Image.open(io.BytesIO(overlay.content)).convert("RGB")).astype(int)
    # short side 200 -> 40 pixels (32 / 0.8), so 60 x 40, of which the centre 32 x 32: x 14..46 and y 4..36 there,
    # that is x 70..230 and y 20..180 of the picture. The whole picture under a map of its centre misplaced it.
    assert seen.shape == (160, 160, 3)
    assert np.abs(seen - picture[20:180, 70:230]).max() <= 2


def test_grid_of_one_layer_shows_its_heads_in_one_row(boot_png):
    async def scenario(client):
        return await explain(client, boot_png, view="grid", layer=-1), await explain(client, boot_png, view="grid")

    one_layer, all_layers = run(scenario)
    one, every = Image.open(io.BytesIO(one_layer.content)), Image.open(io.BytesIO(all_layers.content))
    assert one.width == every.width and one.height < every.height / 3


def test_json_gives_the_patch_grid_prediction_target_and_parameters(boot_png):
    async def scenario(client):
        return (
            await explain(client, boot_png, method="gradient", target=7, format="json"),
            await explain(client, boot_png, method="rollout", discard_ratio=0.5, format="json"),
            await explain(client, boot_png, view="grid", format="json"),
        )

    gradient, rollout, grid = (response.json() for response in run(scenario))
    assert gradient["predicted"]["label"] == "Ankle boot" and gradient["predicted"]["index"] == 9
    assert gradient["target"] == {
        "index": 7,
        "label": "Sneaker",
        "probability": pytest.approx(gradient["target"]["probability"]),
    }
    assert gradient["parameters"]["target"] == 7 and gradient["method"] == "gradient"
    assert len(gradient["map"]) == 7 and all(len(row) == 7 for row in gradient["map"])
    assert rollout["target"]["index"] == 9 and rollout["parameters"]["discard_ratio"] == 0.5
    assert sum(map(sum, rollout["map"])) < 1.0  # the class token keeps part of the rolled-out mass
    assert [len(grid["map"]), len(grid["map"][0]), len(grid["map"][0][0])] == [6, 4, 7]
    assert grid["method"] == grid["parameters"]["method"] == "raw"  # what it shows, not the default's rollout


def test_the_gradient_target_is_a_class_index_or_label_and_a_label_of_no_class_is_refused_with_the_classes(boot_png):
    async def scenario(client):
        targets = (7, "Sneaker", "T-shirt/top", "sneaker", 10, "\u00b2")
        return [await explain(client, boot_png, method="gradient", target=target, format="json") for target in targets]

    index, label, slashed, *refused = run(scenario)
    assert label.status_code == 200, label.text
    assert label.json()["target"]["index"] == 7 and label.json()["parameters"]["target"] == 7
    assert np.ravel(label.json()["map"]) == pytest.approx(np.ravel(index.json()["map"]), abs=1e-6)
    assert slashed.json()["target"] == {"index": 0, "label": "T-shirt/top", "probability": pytest.approx(0, abs=0.1)}
    assert [response.status_code for response in refused] == [422] * 3
    labels = (
        "give an index in [0, 9] or a label: T-shirt/top, Trouser, Pullover, Dress, Coat, Sandal, Shirt, Sneaker, Bag"
    )
    assert [response.json()["detail"] for response in refused] == [
        f"target 'sneaker' is not a class of this model (did you mean 'Sneaker'?); {labels}, Ankle boot",
        "target must be in [0, 9], or a label",
        f"target '\u00b2' is not a class of this model; {labels}, Ankle boot",  # a digit that int() does not read
    ]


def test_a_target_label_with_an_accent_is_the_class_in_either_unicode_form(tmp_path, boot_png):
    checkpoint = save_small_checkpoint(tmp_path / "accents.safetensors", ["Caf\u00e9", "Cr\u00e8me"])
    typed, pasted = "Caf\u00e9", "Cafe\u0301"  # pasted from the name of a file on a Mac: "Cafe" and an accent

    async def scenario(client):
        return [await explain(client, boot_png, method="gradient", target=t, format="json") for t in (typed, pasted)]

    answers = run(scenario, checkpoint=checkpoint)
    assert [answer.status_code for answer in answers] == [200, 200], answers[1].text  # was "did you mean 'Café'?"
    assert [answer.json()["target"]["label"] for answer in answers] == [typed, typed]


@pytest.mark.parametrize("method", ["rollout", "gradient"])
def test_an_images_map_is_the_same_alone_and_in_a_batch(method, fashion_test):
    images = [image_bytes(fashion_test.images[i, 0].numpy()) for i in range(8)]

    async def scenario(client):
        return await maps_alone_and_together(client, images, method)

    alone, together, stats = run(scenario, max_batch_size=8, max_wait_ms=50)
    assert stats["max_batch_size_seen"] > 1
    for single, batched in zip(alone, together, strict=True):
        flat = lambda grid: [value for row in grid for value in row]
        assert flat(batched) == pytest.approx(flat(single), abs=1e-5)


def test_the_reported_target_does_not_depend_on_what_shares_the_batch(boot_png):
    async def scenario(client):
        alone = await explain(client, boot_png, method="rollout", format="json")
        beside_gradient = await asyncio.gather(
            explain(client, boot_png, method="rollout", format="json"),
            explain(client, boot_png, method="gradient", target=3, format="json"),
        )
        stats = (await client.get("/model")).json()["batching"]["stats"]["attention"]
        return alone.json(), [response.json() for response in beside_gradient], stats

    alone, (rollout, gradient), stats = run(scenario, max_batch_size=2, max_wait_ms=500)
    assert stats["batch_size_counts"] == {"1": 1, "2": 1}  # the second pair really shared a batch
    # Only a gradient map explains a chosen class; the others are about the top-1, whatever shares their batch.
    assert alone["target"]["index"] == rollout["target"]["index"] == alone["predicted"]["index"] == 9
    assert np.ravel(alone["map"]) == pytest.approx(np.ravel(rollout["map"]), abs=1e-5)
    assert gradient["target"]["index"] == 3


@pytest.mark.parametrize(
    "params",
    [
        {"layer": 6},
        {"layer": -7},
        {"head": 4},
        {"head": -1},
        {"start_layer": 6},
        {"target": 10},
        {"method": "magic"},
        {"colormap": "rainbow"},
        {"alpha": 1.5},
        {"alpha": -0.1},
        {"view": "collage"},
        {"format": "gif"},
        {"discard_ratio": 1.0},
        {"mass": 0},
        {"upsample": "lanczos"},
        {"size": "huge"},
    ],
)
def test_bad_parameters_get_422(params, boot_png):
    async def scenario(client):
        return await explain(client, boot_png, **params)

    response = run(scenario)
    assert response.status_code == 422, response.text
    assert response.json()["detail"]


@pytest.mark.parametrize(
    "params, message",
    [
        ({"metod": "gradient"}, "metod"),
        ({"method": "rollout", "head": 3}, "head not used by method rollout, which reads discard_ratio"),
        ({"method": "gradient", "head_fusion": "max"}, "head_fusion not used by method gradient, which reads target"),
        ({"view": "grid", "discard_ratio": 0.5}, "discard_ratio not used by view grid, which reads layer"),
        ({"view": "grid", "method": "gradient"}, "method gradient not used by view grid, which shows each head's raw"),
        ({"method": "last", "head": 1, "head_fusion": "max"}, "head and head_fusion both given: head shows one head"),
        ({"format": "json", "colormap": "jet", "size": "input"}, "colormap, size not used by format json"),
        ({"view": "heatmap", "alpha": 0.9}, "alpha not used by view heatmap, which draws the map alone"),
    ],
)
def test_a_parameter_that_would_change_nothing_is_refused_by_name(boot_png, params, message):
    response = run(lambda client: explain(client, boot_png, **params))
    assert response.status_code == 422 and message in response.text


def test_a_second_file_on_attention_is_refused_not_dropped(boot_png):
    files = [("file", ("a.png", boot_png, "image/png")), ("file", ("b.png", boot_png, "image/png"))]
    response = run(lambda client: client.post("/attention", files=files))
    assert response.status_code == 422 and "send one file to /attention" in response.json()["detail"]
