"""/metrics after real traffic: the counters moved by exactly what was sent."""

from base64 import b64encode

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.client import run
from tests.support.images import image_bytes
from tests.support.server import running_server


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(scraped: dict, name: str, **labels) -> float:
    return scraped.get((name, frozenset(labels.items())), 0.0)


def test_metrics_count_requests_batches_and_the_model(fashion_test):
    image = image_bytes(fashion_test.images[0, 0].numpy())

    async def scenario(client):
        for _ in range(3):
            await client.post("/predict", files={"file": ("a.png", image, "image/png")})
        await client.post("/predict", files={"file": ("a.txt", b"text", "text/plain")})
        await client.post("/predict", files=[("file", ("a.png", image, "image/png"))] * 2)
        await client.post("/attention", files={"file": ("a.png", image, "image/png")})
        await client.get("/nowhere")
        await client.get("/openapi.json")
        await client.get("/static/demo.js")
        response = await client.get("/metrics")
        return response

    response = run(scenario)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    scraped = samples(response.text)
    assert not [name for name, _ in scraped if name.endswith("_created")]  # one more series per series, of no use
    assert value(scraped, "vit_requests_total", route="/predict", method="POST", status="200") == 4
    assert value(scraped, "vit_requests_total", route="/predict", method="POST", status="415") == 1
    assert value(scraped, "vit_requests_total", route="/attention", method="POST", status="200") == 1
    assert value(scraped, "vit_requests_total", route="unmatched", method="GET", status="404") == 1
    assert value(scraped, "vit_requests_total", route="/openapi.json", method="GET", status="200") == 1
    assert value(scraped, "vit_requests_total", route="/static", method="GET", status="200") == 1  # a mount's
    assert value(scraped, "vit_requests_total", route="unmatched", method="GET", status="200") == 0
    assert value(scraped, "vit_request_duration_seconds_count", route="/predict") == 5
    assert value(scraped, "vit_batch_size_sum", batcher="predict") == 5  # images, the two-file request included
    assert value(scraped, "vit_queue_seconds_count", batcher="predict") == 5
    assert 1 <= value(scraped, "vit_compute_seconds_count", batcher="predict") <= 4
    assert value(scraped, "vit_image_compute_seconds_count", batcher="predict") == 5  # its batch's time, per image
    assert value(scraped, "vit_infer_seconds_count", outcome="success") == 0  # exported before any infer request
    assert value(scraped, "vit_batch_size_count", batcher="attention") == 1
    assert value(scraped, "vit_queue_depth", batcher="predict") == 0
    batches = value(scraped, "vit_batch_size_count", batcher="predict")
    assert value(scraped, "vit_batch_size_bucket", batcher="predict", le="+Inf") == batches
    assert value(scraped, "vit_batch_size_bucket", batcher="predict", le="2.0") == batches  # none held more than 2
    assert value(scraped, "vit_batch_size_bucket", batcher="predict", le="1.0") >= 3  # the three lone images
    assert ("vit_dropped_requests_total", frozenset({("batcher", "attention")})) in scraped
    assert value(scraped, "vit_failed_batches_total", batcher="predict") == 0
    info = [labels for (name, labels) in scraped if name == "vit_model_info"]
    assert info and dict(info[0])["name"] == "vit-tiny-fashion-mnist" and dict(info[0])["parameters"] == "805130"


@pytest.mark.parametrize("layout", [{}, {"VIT_MODEL_PROCESS": "true"}], ids=["workers", "model process"])
def test_every_scrape_of_a_two_process_server_counts_every_request_and_so_do_its_statistics(layout, fashion_test):
    image = image_bytes(fashion_test.images[0, 0].numpy())
    sent, infers = 24, 6
    with running_server({"VIT_DEVICE": "cpu", "VIT_WORKERS": "2"} | layout, app=None) as server:
        for _ in range(sent):  # a connection each: the kernel spreads them over both processes
            response = httpx.post(f"{server.base_url}/predict", files={"file": ("a.png", image, "image/png")})
            assert response.status_code == 200
        infer = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64encode(image).decode()]}]}
        for _ in range(infers):  # and the Open Inference Protocol's
            response = httpx.post(f"{server.base_url}/v2/models/vit-tiny-fashion-mnist/infer", json=infer)
            assert response.status_code == 200
        scrapes = [samples(httpx.get(f"{server.base_url}/metrics").text) for _ in range(6)]
        statistics = [httpx.get(f"{server.base_url}/v2/models/stats").json()["model_stats"][0] for _ in range(6)]
    for model in statistics:  # Triton's statistics, read from the same sum
        assert model["inference_count"] == model["inference_stats"]["compute_infer"]["count"] == sent + infers
        assert model["inference_stats"]["success"]["count"] == infers
    for scraped in scrapes:
        assert value(scraped, "vit_requests_total", route="/predict", method="POST", status="200") == sent
        assert value(scraped, "vit_batch_size_sum", batcher="predict") == sent + infers
        assert value(scraped, "vit_queue_seconds_count", batcher="predict") == sent + infers
        assert ("vit_dropped_requests_total", frozenset({("batcher", "attention")})) in scraped
        assert [dict(labels)["name"] for name, labels in scraped if name == "vit_model_info"] == [
            "vit-tiny-fashion-mnist"
        ]
