"""The HTTP contract, in process: every route, every bad input, and batching counted by the server."""

import asyncio
import errno
import io
import json
import re
import tempfile
import threading

import numpy as np
import pytest
import starlette.formparsers
from PIL import Image

from app.config import Settings
from app.inference import InferenceEngine
from model.images import READS_AVIF, READS_HEIF
from model.predict import main as predict_main
from tests.support.client import run
from tests.support.images import HEIC_EXAMPLE, HEIC_FILES, foreign_images, image_bytes, png_header
from tests.support.models import save_small_checkpoint


@pytest.fixture(scope="module")
def sample_images(fashion_test):
    """The first 16 test images as PNG bytes, with their labels."""
    return [(image_bytes(fashion_test.images[i, 0].numpy()), int(fashion_test.labels[i])) for i in range(16)]


def post_file(client, data, name="image.png", content_type="image/png", **params):
    return client.post("/predict", files={"file": (name, data, content_type)}, params=params)


def test_predict_several_files_in_upload_order(sample_images, fashion_test):
    async def scenario(client):
        files = [("file", (f"{i}.png", data, "image/png")) for i, (data, _) in enumerate(sample_images[:4])]
        return await client.post("/predict", files=files, params={"top_k": 3})

    response = run(scenario)
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == "vit-tiny-fashion-mnist"
    assert [result["filename"] for result in body["results"]] == ["0.png", "1.png", "2.png", "3.png"]
    for result, (_, label) in zip(body["results"], sample_images[:4], strict=True):
        predictions = result["predictions"]
        assert len(predictions) == 3
        probabilities = [p["probability"] for p in predictions]
        assert probabilities == sorted(probabilities, reverse=True)
        assert predictions[0]["index"] == label
        assert predictions[0]["label"] == fashion_test.classes[label]


BAD_INPUTS = {
    "text file": (lambda image: post_file_args(b"just some words\n", "notes.txt", "text/plain"), {400, 415}),
    "truncated png": (lambda image: post_file_args(image[: len(image) // 2]), {400}),
    "zero-byte file": (lambda image: post_file_args(b""), {400}),
    "random bytes named png": (lambda image: post_file_args(bytes(range(256)) * 4), {400}),
    "30000x30000 header": (lambda image: post_file_args(png_header(30000, 30000)), {413}),
    "too many files": (lambda image: {"files": [("file", ("a.png", image, "image/png"))] * 3}, {413}),
    "body over the byte limit": (lambda image: post_file_args(b"\x89PNG" + b"0" * 300_000), {413}),
    "top_k=0": (lambda image: post_file_args(image) | {"params": {"top_k": 0}}, {422}),
    "top_k=10000": (lambda image: post_file_args(image) | {"params": {"top_k": 10000}}, {422}),
    "top_k above the class count": (lambda image: post_file_args(image) | {"params": {"top_k": 11}}, {422}),
    "missing file part": (lambda image: {"files": {"picture": ("a.png", image, "image/png")}}, {422}),
    "no body at all": (lambda image: {}, {422}),
    "a raw image, not multipart": (lambda image: {"content": image, "headers": {"Content-Type": "image/png"}}, {415}),
}


def post_file_args(data, name="image.png", content_type="image/png"):
    return {"files": {"file": (name, data, content_type)}}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gets_its_status_and_the_server_keeps_serving(case, sample_images):
    image, label = sample_images[0]
    make_request, statuses = BAD_INPUTS[case]

    async def scenario(client):
        bad = await client.post("/predict", **make_request(image))
        good = await post_file(client, image)
        return bad, good

    bad, good = run(scenario, max_files=2, max_upload_bytes=200_000)
    assert bad.status_code in statuses, bad.text
    assert isinstance(bad.json()["detail"], str) and bad.json()["detail"]  # one shape: a sentence
    assert good.status_code == 200
    assert good.json()["results"][0]["predictions"][0]["index"] == label


@pytest.mark.parametrize("name", foreign_images())
def test_an_image_in_a_format_pillow_cannot_read_gets_415_that_names_the_format(name):
    filename, data = foreign_images()[name]  # sent as curl sends a file of an unknown type
    response = run(lambda client: client.post("/predict", **post_file_args(data, filename, "application/octet-stream")))
    assert response.status_code == 415, response.text  # it was 400, "not an image in a format we can read"
    avif, heif = "AVIF, " * READS_AVIF, "HEIF, " * READS_HEIF
    accepted = f"use one of {avif}BMP, GIF, {heif}JPEG, MPO, PNG, TIFF, WEBP"
    assert response.json()["detail"] == f"{filename}: image format {name} is not accepted; {accepted}"


@pytest.mark.skipif(not READS_AVIF, reason="this Pillow was built without libavif, so AVIF is refused by name")
def test_an_avif_image_as_browsers_save_them_is_classified_as_the_same_picture_in_png(fashion_test):
    pictures = [fashion_test.images[i, 0].numpy() for i in range(8)]
    files = lambda kind, **options: [
        ("file", (f"{i}.{kind}", image_bytes(picture, kind.upper(), **options), f"image/{kind}"))
        for i, picture in enumerate(pictures)
    ]

    async def scenario(client):
        return await client.post("/predict", files=files("png")), await client.post("/predict", files=files("avif"))

    png, avif = run(scenario)
    assert avif.status_code == 200, avif.text  # it was 415, "image format AVIF is not accepted"
    top = lambda answer: [result["predictions"][0]["index"] for result in answer.json()["results"]]
    assert top(avif) == top(png) and len(top(avif)) == 8


@pytest.mark.skipif(not READS_HEIF, reason="pi-heif is not installed, so HEIC is refused by name")
def test_a_heic_photo_as_an_iphone_saves_it_is_classified_as_its_png_and_drawn_upright():
    png = (HEIC_EXAMPLE.parent / "ankle-boot-224.png").read_bytes()  # what the HEIC was made from
    turned, example = (HEIC_FILES / "turned.heic").read_bytes(), HEIC_EXAMPLE.read_bytes()

    async def scenario(client):
        return [
            await post_file(client, png),
            await post_file(client, example, "boot.heic", "image/heic"),
            await client.post("/attention", files={"file": ("turned.heic", turned, "image/heic")}, params={"alpha": 0}),
            await post_file(client, example[:1200], "cut.heic", "image/heic"),
        ]

    png, heic, overlay, cut = run(scenario)
    assert heic.status_code == 200, heic.text  # it was 415, "image format HEIF is not accepted"
    best = lambda answer: answer.json()["results"][0]["predictions"][0]
    assert best(heic)["label"] == best(png)["label"] == "Ankle boot"
    assert best(heic)["probability"] == pytest.approx(best(png)["probability"], abs=0.02)  # HEVC's loss
    picture = np.asarray(Image.open(io.BytesIO(overlay.content)).convert("RGB")).astype(int)
    assert picture.shape == (300, 200, 3)  # stored 300 x 200, turned by its irot box, and only once
    rows = picture[:, :, 0].mean(axis=1)
    assert rows[-20:].mean() - rows[:20].mean() > 200 and np.ptp(picture[150, :, 0]) < 20  # red grows downwards
    assert cut.status_code == 400 and re.fullmatch(r"cut\.heic: corrupt image \(\S[^\n]*\S\)", cut.json()["detail"])


def test_concurrent_requests_are_batched_and_match_predictions_made_alone(sample_images):
    async def scenario(client):
        alone = [(await post_file(client, data)).json() for data, _ in sample_images]
        before = (await client.get("/model")).json()["batching"]["stats"]["predict"]
        together = await asyncio.gather(*(post_file(client, data) for data, _ in sample_images))
        after = (await client.get("/model")).json()["batching"]["stats"]["predict"]
        return alone, [response.json() for response in together], before, after

    alone, together, before, after = run(scenario, max_batch_size=8, max_wait_ms=50)
    assert before["max_batch_size_seen"] == 1 and before["requests"] == 16
    assert after["requests"] == 32
    assert after["max_batch_size_seen"] > 1
    assert after["batches"] - before["batches"] < 16  # fewer forward passes than requests
    for single, batched in zip(alone, together, strict=True):
        single_top = single["results"][0]["predictions"]
        batched_top = batched["results"][0]["predictions"]
        assert single_top[0]["index"] == batched_top[0]["index"]
        for a, b in zip(single_top, batched_top, strict=True):
            assert a["probability"] == pytest.approx(b["probability"], abs=1e-4)


def test_health_and_model_description(shipped_checkpoint):
    async def scenario(client):
        return [await client.get(path) for path in ("/health/live", "/health/ready", "/model", "/openapi.json")]

    live, ready, model, openapi = run(scenario)
    assert live.json() == {"status": "ok"} and ready.status_code == 200
    info = model.json()
    assert info["parameters"] == 805_130
    assert info["classes"][9] == "Ankle boot"
    assert info["device"] == "cpu"
    assert info["preprocess"]["image_size"] == 28
    assert len(info["checkpoint_sha256"]) == 64
    assert info["batching"]["max_batch_size"] == 32
    assert {"/predict", "/attention", "/health/ready", "/model"} <= set(openapi.json()["paths"])


def test_settings_come_from_vit_environment_variables(monkeypatch):
    monkeypatch.setenv("VIT_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("VIT_DEVICE", "cpu")
    settings = Settings()
    assert settings.max_batch_size == 7 and settings.device == "cpu"


def test_large_uploads_decode_in_decoder_processes_with_the_same_errors(fashion_test):
    boot = Image.fromarray(fashion_test.images[0, 0].numpy()).resize((300, 300))  # 90,000 pixels: off the loop
    jpeg = image_bytes(boot.convert("RGB"), format="JPEG")
    truncated = image_bytes(boot)[:2000]

    async def scenario(client):
        good = await client.post("/predict", files={"file": ("boot.jpg", jpeg, "image/jpeg")})
        bad = await client.post("/predict", files={"file": ("boot.png", truncated, "image/png")})
        return good, bad

    good, bad = run(scenario, inline_decode_pixels=1000)
    assert good.status_code == 200 and good.json()["results"][0]["predictions"][0]["label"] == "Ankle boot"
    assert bad.status_code == 400 and "corrupt image" in bad.json()["detail"]


def test_a_batch_that_loses_a_result_answers_500_saying_so_and_the_next_request_succeeds(sample_images, monkeypatch):
    predict_batch = InferenceEngine.predict_batch
    lose_a_row = threading.Event()

    def losing_a_row(self, inputs):
        rows = predict_batch(self, inputs)
        return rows[:-1] if lose_a_row.is_set() else rows

    monkeypatch.setattr(InferenceEngine, "predict_batch", losing_a_row)
    image, label = sample_images[0]

    async def scenario(client):
        lose_a_row.set()
        lost = await post_file(client, image)
        lose_a_row.clear()
        return lost, await post_file(client, image), (await client.get("/model")).json()["batching"]["stats"]["predict"]

    lost, after, stats = run(scenario)
    assert lost.status_code == 500
    assert lost.json()["detail"] == "inference failed: run_batch returned 0 results for 1 inputs"
    assert after.status_code == 200 and after.json()["results"][0]["predictions"][0]["index"] == label
    assert stats["failed_batches"] == 1 and stats["requests"] == 1


def test_a_trailing_slash_is_answered_directly_not_redirected_to_the_host_header(shipped_checkpoint):
    async def scenario(client):
        plain = await client.get("/model")
        slashed = await client.get("/model/", headers={"Host": "evil.example"})
        return plain, slashed

    plain, slashed = run(scenario)
    assert slashed.status_code == 200 and "location" not in slashed.headers
    assert slashed.json() == plain.json()


def test_a_wrong_method_gets_405_with_an_allow_header_that_names_head_where_get_is_allowed(shipped_checkpoint):
    async def scenario(client):
        return [
            await client.delete("/model"),
            await client.put("/predict", content=b"\x89PNG\r\n", headers={"content-type": "image/png"}),  # curl -T
            await client.post("/v2/health/ready"),
        ]

    model, predict, ready = run(scenario)
    assert model.status_code == 405 and model.headers["allow"] == "GET, HEAD"  # HEAD is answered as GET
    assert predict.status_code == 405 and predict.headers["allow"] == "POST"
    assert predict.json()["detail"] == (  # TorchServe takes a PUT of the image: it was told "Method Not Allowed"
        "PUT is not answered here: send the image as multipart/form-data, in a part named 'file', in a POST "
        "(curl -F file=@image.png)"
    )
    assert model.json()["detail"] == "Method Not Allowed" and ready.json() == {"error": "Method Not Allowed"}
    assert ready.status_code == 405 and ready.headers["allow"] == "GET, HEAD"


def test_model_leaves_out_the_training_command_and_paths_unless_told(shipped_checkpoint):
    training_of = lambda **settings: run(lambda client: client.get("/model"), **settings).json()["training"]
    shown, exposed = json.dumps(training_of()), training_of(expose_training=True)
    assert "command" in exposed and "runs/" in json.dumps(exposed)  # what the shipped checkpoint records
    for detail in ('"command"', '"out_dir"', '"data_dir"', '"path"', "runs/", "/tmp/"):
        assert detail not in shown
    assert json.loads(shown)["test_accuracy"] == exposed["test_accuracy"]


@pytest.mark.parametrize(
    "fault, detail",
    [
        (OSError(errno.ENOSPC, "No space left on device"), "no space left"),
        (OSError(errno.EROFS, "Read-only file system"), "no writable temporary directory"),
        # what tempfile raises where no candidate directory is writable: a read-only root file system
        (FileNotFoundError(errno.ENOENT, "No usable temporary directory found in ['/tmp']"), "no writable temporary"),
    ],
    ids=["full", "read-only", "none writable"],
)
def test_an_upload_the_temporary_directory_cannot_hold_gets_507_and_a_log_line(monkeypatch, caplog, fault, detail):
    class Unwritable(tempfile.SpooledTemporaryFile):
        def rollover(self):  # what writing past the 1 MB in memory meets
            raise fault

    monkeypatch.setattr(starlette.formparsers, "SpooledTemporaryFile", Unwritable)
    large = b"\0" * (2 * 1024 * 1024)
    response = run(lambda client: client.post("/predict", files={"file": ("big.png", large, "image/png")}))
    assert response.status_code == 507 and detail in response.json()["detail"]  # the read-only ones were 400
    assert any("could not be stored" in record.getMessage() for record in caplog.records)


def test_a_two_class_model_answers_predict_and_vit_predict_with_both_classes_by_default(tmp_path, capsys):
    checkpoint = save_small_checkpoint(tmp_path / "pair.safetensors", ["cat", "dog"])
    upload = {"file": ("boot.png", image_bytes(np.full((28, 28), 90, dtype=np.uint8)), "image/png")}
    answer = run(lambda client: client.post("/predict", files=upload), checkpoint=checkpoint, device="cpu")
    assert answer.status_code == 200, answer.text
    assert sorted(p["label"] for p in answer.json()["results"][0]["predictions"]) == ["cat", "dog"]
    (tmp_path / "boot.png").write_bytes(upload["file"][1])
    predict_main([str(tmp_path / "boot.png"), "--checkpoint", str(checkpoint), "--format", "json", "--device", "cpu"])
    printed = json.loads(capsys.readouterr().out)
    assert len(printed["results"][0]["predictions"]) == 2


def test_an_unknown_query_parameter_on_predict_is_refused_by_name(sample_images):
    data, _ = sample_images[0]
    upload = {"file": ("0.png", data, "image/png")}
    response = run(lambda client: client.post("/predict", files=upload, params={"topk": 3}))
    assert response.status_code == 422 and "topk" in response.text


def test_a_query_parameter_given_twice_is_refused_by_name_not_taken_at_its_last_value(sample_images):
    data, _ = sample_images[0]
    upload = {"file": ("0.png", data, "image/png")}

    async def scenario(client):
        return [
            await client.post("/predict?top_k=1&top_k=3", files=upload),
            await client.post("/attention?method=raw&layer=0&layer=-1&method=raw", files=upload),
            await client.post("/predict?top_k=2", files=upload),
        ]

    twice, attention, once = run(scenario)
    assert twice.status_code == 422
    assert twice.json()["detail"] == "query parameter 'top_k': given 2 times ('1', '3'); give it once"
    assert attention.status_code == 422 and attention.json()["detail"] == (
        "query parameter 'method': given 2 times ('raw', 'raw'); give it once; "
        "query parameter 'layer': given 2 times ('0', '-1'); give it once"
    )
    assert once.status_code == 200 and len(once.json()["results"][0]["predictions"]) == 2


def test_an_upload_that_is_not_a_part_named_file_is_told_how_to_send_one(sample_images):
    image, _ = sample_images[0]
    url_encoded = {"Content-Type": "application/x-www-form-urlencoded"}  # curl --data-binary @a.png, without -H

    async def scenario(client):
        return [
            await client.post("/predict", files={"image": ("a.png", image, "image/png")}),
            await client.post("/predict", content=image, headers={"Content-Type": "image/png"}),
            await client.post("/attention", json={"url": "https://example.com/boot.png"}),
            await client.post("/predict", content=image, headers=url_encoded),
            await client.post("/attention", content=image),
            await client.post(
                "/predict", content=b"--b--\r\n", headers={"Content-Type": "multipart/form-data; boundary=b"}
            ),
            await client.post("/predict", files={"file": ("a.png", image, "image/png")}, params={"top_k": 0}),
            await client.post("/predict", files=[(f"part{i}" + "a" * 1000, (None, "v")) for i in range(999)]),
        ]

    named_image, raw, as_json, url_encoded_image, untyped, no_parts, bad_top_k, many_long_names = run(scenario)
    how = "send the image as multipart/form-data, in a part named 'file'"
    assert (
        named_image.status_code == 422
        and named_image.json()["detail"] == f"{how}; this request's parts are named 'image'"
    )
    # Another body than multipart is a type the route does not read (415), and is told so from its header;
    # a URL-encoded one was read, and its bytes listed as the names of its parts.
    assert [answer.status_code for answer in (raw, as_json, url_encoded_image, untyped)] == [415] * 4
    how_with_curl = f"{how} (curl -F file=@image.png)"
    assert raw.json()["detail"] == f"{how_with_curl}; this request's body is image/png"
    assert as_json.json()["detail"] == f"{how_with_curl}; this request's body is application/json"
    assert url_encoded_image.json()["detail"] == (
        f"{how_with_curl}; this request's body is application/x-www-form-urlencoded, "
        "what curl's -d and --data-binary declare by default"
    )
    assert untyped.json()["detail"] == f"{how_with_curl}; this request's body has no Content-Type"
    assert no_parts.status_code == 422 and no_parts.json()["detail"] == f"{how}; this request has no parts"
    assert bad_top_k.json()["detail"] == "query parameter 'top_k': Input should be greater than or equal to 1, not '0'"
    detail = many_long_names.json()["detail"]  # a megabyte of part names used to come back whole
    first = f"'part0{'a' * 94}... (1007 characters)"
    assert many_long_names.status_code == 422 and detail.startswith(f"{how}; this request's parts are named {first}, ")
    assert detail.endswith("... (1007 characters) and 994 more") and len(detail) < 1000


def test_a_part_beside_the_images_is_refused_by_name_not_dropped_unread(sample_images):
    image, _ = sample_images[0]
    upload = ("file", ("a.png", image, "image/png"))

    async def scenario(client):
        return [
            await client.post("/predict", files=[upload], data={"top_k": "2"}),
            await client.post("/attention", files=[upload], data={"method": "raw & last", "layer": "0"}),
            await client.post("/predict", files=[upload, ("image", ("b.png", image, "image/png"))]),
            await client.post("/predict", files=[upload] + [(f"p{i}", (None, "v" * 50)) for i in range(999)]),
            await client.post("/predict", files=[upload], params={"top_k": 2}),
        ]

    as_field, attention_fields, other_file, many, as_query = run(scenario)
    assert as_field.status_code == 422 and as_field.json()["detail"] == (
        "part 'top_k' not read: /predict reads images from parts named 'file', "
        "and parameters from the query string (/predict?top_k=2)"
    )
    assert attention_fields.status_code == 422 and attention_fields.json()["detail"] == (
        "parts 'method', 'layer' not read: /attention reads images from parts named 'file', "
        "and parameters from the query string (/attention?method=raw+%26+last)"
    )
    assert other_file.status_code == 422
    assert other_file.json()["detail"] == "part 'image' not read: /predict reads images from parts named 'file'"
    detail = many.json()["detail"]  # one clause, not a thousand, and no value of 50 characters shown
    assert many.status_code == 422 and detail == (
        "parts 'p0', 'p1', 'p2', 'p3', 'p4' and 994 more not read: /predict reads images from parts named 'file', "
        "and parameters from the query string"
    )
    assert as_query.status_code == 200 and len(as_query.json()["results"][0]["predictions"]) == 2


def test_a_multipart_body_the_parser_cannot_read_gets_400_with_the_parsers_reason(sample_images):
    image, _ = sample_images[0]
    wrong_boundary = b"--xyq\r\n\r\n" + image
    headers = {"Content-Type": "multipart/form-data; boundary=xyz"}

    async def scenario(client):
        return [
            await client.post("/predict", files={"file": ("a" * 5000 + ".png", image, "image/png")}),
            await client.post("/predict", content=wrong_boundary, headers=headers),
            await client.post("/predict", files={"file": ("a.png", image, "image/png")}),
        ]

    long_header, wrong, fine = run(scenario)
    assert long_header.status_code == 400
    assert long_header.json()["detail"] == "invalid multipart body: Maximum header size exceeded"
    assert wrong.status_code == 400 and wrong.json()["detail"].startswith("invalid multipart body: Expected boundary")
    assert fine.status_code == 200


def test_a_file_part_sent_as_text_is_told_to_send_a_file_and_a_long_value_is_not_sent_back(sample_images):
    image, _ = sample_images[0]

    async def scenario(client):
        return [
            await client.post("/predict", files={"file": (None, image, "image/png")}),  # no filename: a text field
            await client.post("/attention", files={"file": (None, "x" * 1_000_000)}),
            await client.post("/predict", files={"file": ("a.png", image)}, params={"top_k": "9" * 5000}),
        ]

    no_filename, megabyte, long_top_k = run(scenario)
    how = "a text field, not a file; send the image as a file, with a filename (curl -F file=@image.png)"
    assert no_filename.status_code == 422 and no_filename.json()["detail"] == f"field 'file.0': {how}"
    assert megabyte.status_code == 422 and megabyte.json()["detail"] == f"field 'file': {how}"
    detail = long_top_k.json()["detail"]  # used to quote the whole value, as a megabyte field was quoted
    assert long_top_k.status_code == 422 and detail.startswith("query parameter 'top_k': Unable to parse input")
    assert detail.endswith(f", not '{'9' * 99}... (5002 characters)")


def test_a_route_without_parameters_refuses_any_by_name():
    async def scenario(client):
        return [
            await client.get("/model", params={"verbose": "1"}),
            await client.get("/health/ready", params={"probe": "k8s", "x": "2"}),
            await client.get("/metrics", params={"name[]": "vit_requests_total"}),
            await client.get("/health/live"),
        ]

    model, ready, metrics, live = run(scenario)
    assert (
        model.status_code == 422
        and model.json()["detail"] == "query parameter 'verbose': not a parameter of this route"
    )
    assert ready.json()["detail"] == (
        "query parameter 'probe': not a parameter of this route; query parameter 'x': not a parameter of this route"
    )
    assert metrics.status_code == 422 and "'name[]'" in metrics.json()["detail"]
    assert live.status_code == 200
