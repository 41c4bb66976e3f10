"""Operations basics: X-Request-ID, CORS (off unless VIT_CORS_ORIGINS), VIT_API_KEY, vit-serve's logs (without
the image's own health checks), and the garbage collector while serving."""

import gc
import json
import logging
import os
import socket
import subprocess
import sys

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from app.heap import YOUNG_THRESHOLD
from app.logs import OwnHealthCheckFilter
from tests.support.client import run
from tests.support.images import image_bytes
from tests.support.raw_http import everything_until_closed, multipart_request, parsed
from tests.support.server import running_server

KEY = "a-long-random-key"


@pytest.fixture(scope="module")
def boot(fashion_test) -> bytes:
    return image_bytes(fashion_test.images[0, 0].numpy())


def predict(client, boot, **headers):
    return client.post("/predict", files={"file": ("boot.png", boot, "image/png")}, headers=headers)


def test_every_answer_carries_the_clients_request_id_or_a_new_one(boot):
    async def scenario(client):
        return [
            await predict(client, boot, **{"X-Request-ID": "order-42/retry:1"}),
            await predict(client, boot),
            await client.get("/model", headers={"X-Request-ID": "two words"}),  # could split a log line
            await client.get("/model", headers={"X-Request-ID": "x" * 129}),
            await client.post("/predict", headers={"X-Request-ID": "too-big", "Content-Length": str(10**9)}),
            await client.get("/nowhere", headers={"X-Request-ID": "lost"}),
        ]

    echoed, fresh, spaced, long, too_big, missing = run(scenario)
    assert echoed.status_code == 200 and echoed.headers["x-request-id"] == "order-42/retry:1"
    for response in (fresh, spaced, long):
        assert len(response.headers["x-request-id"]) == 32 and int(response.headers["x-request-id"], 16) >= 0
    assert fresh.headers["x-request-id"] != spaced.headers["x-request-id"]
    assert (too_big.status_code, too_big.headers["x-request-id"]) == (413, "too-big")  # refused before routing
    assert (missing.status_code, missing.headers["x-request-id"]) == (404, "lost")


def test_cors_is_off_by_default_and_on_for_the_configured_origins_only(boot):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    preflight["Access-Control-Request-Headers"] = "authorization, x-request-id"

    async def scenario(client):
        return await client.options("/predict", headers=preflight), await predict(client, boot, Origin="https://a")

    closed, plain = run(scenario)
    assert closed.status_code == 405 and "access-control-allow-origin" not in closed.headers
    assert "access-control-allow-origin" not in plain.headers

    async def allowed(client):
        return (
            await client.options("/predict", headers=preflight),
            await client.options("/predict", headers=preflight | {"Origin": "https://elsewhere.example"}),
            await predict(client, boot, Origin="https://app.example"),
        )

    ok, other, answered = run(allowed, cors_origins=["https://app.example", "https://admin.example"])
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example"
    assert {"authorization", "x-request-id"} <= set(ok.headers["access-control-allow-headers"].lower().split(", "))
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    assert answered.status_code == 200 and answered.headers["access-control-allow-origin"] == "https://app.example"
    assert "x-request-id" in answered.headers["access-control-expose-headers"].lower()


def test_an_api_key_guards_inference_and_leaves_health_metrics_and_docs_open(boot):
    infer = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [0.0] * 784}]}

    async def scenario(client):
        return {
            "none": await predict(client, boot),
            "wrong": await predict(client, boot, Authorization="Bearer not-the-key"),
            "basic": await predict(client, boot, Authorization="Basic YTpi"),
            "right": await predict(client, boot, Authorization=f"Bearer {KEY}"),
            "attention": await client.post("/attention", files={"file": ("boot.png", boot, "image/png")}),
            "v2": await client.post("/v2/models/vit-tiny-fashion-mnist/infer", json=infer),
            "v2 right": await client.post(
                "/v2/models/vit-tiny-fashion-mnist/infer", json=infer, headers={"Authorization": f"Bearer {KEY}"}
            ),
            "open": [await client.get(path) for path in ("/health/ready", "/metrics", "/model", "/v2/health/ready")],
            "schema": (await client.get("/openapi.json")).json(),
        }

    answers = run(scenario, api_key=KEY)
    for name in ("none", "wrong", "basic", "attention"):
        assert answers[name].status_code == 401, name
        assert answers[name].headers["www-authenticate"] == "Bearer"
        assert "Authorization: Bearer <key>" in answers[name].json()["detail"]
    assert answers["none"].json()["detail"].startswith("no API key")
    assert answers["wrong"].json()["detail"].startswith("a wrong API key")
    assert answers["right"].status_code == 200 and answers["v2 right"].status_code == 200
    assert answers["v2"].status_code == 401 and "Bearer" in answers["v2"].json()["error"]  # v2's own error shape
    assert [response.status_code for response in answers["open"]] == [200, 200, 200, 200]
    schema = answers["schema"]
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert schema["paths"]["/predict"]["post"]["security"] == [{"HTTPBearer": []}]
    assert "security" not in schema["paths"]["/health/ready"]["get"]

    assert run(lambda client: predict(client, boot)).status_code == 200  # no key set: no key needed


def test_an_upload_without_the_key_or_not_multipart_is_refused_from_its_headers_before_its_body_arrives():
    head, body = multipart_request(b"x" * 5_000_000)
    raw_image = (  # what `curl --data-binary @photo.png -H 'Content-Type: image/png'` sends, with the key
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 5000000\r\n"
        + f"Authorization: Bearer {KEY}\r\n\r\n".encode()
    )
    answers = []
    with running_server({"VIT_DEVICE": "cpu", "VIT_API_KEY": KEY}) as server:
        for request in (head + body[:5], raw_image + b"\x89PNG\r"):  # and not one byte more of their 5 MB
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                sock.sendall(request)
                answers.append(parsed(everything_until_closed(sock, 10)[1]))
    (no_key, no_key_headers, no_key_detail), (raw, raw_headers, raw_detail) = answers
    assert no_key == 401
    assert no_key_headers["connection"] == "close" and no_key_headers["www-authenticate"].lower() == "bearer"
    assert no_key_detail["detail"].startswith("no API key")
    assert raw == 415 and raw_headers["connection"] == "close"
    assert raw_detail["detail"].endswith("(curl -F file=@image.png); this request's body is image/png")


def test_fastapis_opentelemetry_spans_come_only_with_vit_opentelemetry(boot, monkeypatch):
    """A process with a configured tracer provider (as opentelemetry-instrument sets up) gets FastAPI's spans
    only when asked: otherwise no request pays FastAPI's look for a provider."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)

    assert run(lambda client: predict(client, boot)).status_code == 200
    assert exporter.get_finished_spans() == ()
    assert run(lambda client: predict(client, boot), opentelemetry=True).status_code == 200
    names = [span.name for span in exporter.get_finished_spans()]
    assert "POST /predict" in names and "fastapi.dependencies" in names, names


def test_while_the_app_serves_its_start_up_objects_are_frozen_and_young_collections_are_rarer(boot):
    """Full collections would walk every object of torch and FastAPI, stopping the event loop each time."""
    threshold = gc.get_threshold()

    async def scenario(client):
        answer = await predict(client, boot)
        return answer.status_code, gc.get_freeze_count(), gc.get_threshold()

    status, frozen, serving_threshold = run(scenario)
    assert status == 200
    assert frozen > 100_000  # torch alone is more than that
    assert serving_threshold == (YOUNG_THRESHOLD, *threshold[1:]) and YOUNG_THRESHOLD > threshold[0]
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == threshold  # as before, once the app has stopped


@pytest.mark.parametrize(
    "app, env",
    [(None, {"VIT_LOG_FORMAT": "json"}), ("app.main:create_app", {})],
    ids=["vit-serve-json", "plain-uvicorn"],
)
def test_a_body_the_multipart_parser_cannot_read_leaves_no_bare_line_in_the_log(app, env):
    with running_server({"VIT_DEVICE": "cpu", "VIT_WORKERS": "1", **env}, app=app) as server:
        for _ in range(3):
            response = httpx.post(
                f"{server.base_url}/predict",
                content=b"--xyq\r\n\r\nabc",
                headers={"Content-Type": "multipart/form-data; boundary=xyz"},
            )
            assert response.status_code == 400 and "Expected boundary character" in response.json()["detail"]
        _, output = server.stop()
    # python-multipart warned of each through Python's last-resort handler: a bare line, among JSON ones too
    assert "Expected boundary character" not in output
    if app is None:
        assert all(json.loads(line) for line in output.splitlines() if line.strip())


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_vit_serve_logs_each_request_with_its_id(log_format, boot):
    env = {"VIT_DEVICE": "cpu", "VIT_WORKERS": "1", "VIT_ACCESS_LOG": "true", "VIT_LOG_FORMAT": log_format}
    with running_server(env, app=None) as server:
        response = httpx.post(
            f"{server.base_url}/predict",
            files={"file": ("boot.png", boot, "image/png")},
            headers={"X-Request-ID": "trace-7f3a"},
        )
        assert response.status_code == 200
        _, output = server.stop()
    lines = [line for line in output.splitlines() if line.strip()]
    if log_format == "text":
        (access,) = [line for line in lines if '"POST /predict HTTP/1.1" 200' in line]
        assert access.endswith(" trace-7f3a")
        return
    records = [json.loads(line) for line in lines]  # every line, uvicorn's and the app's, is one JSON object
    (access,) = [record for record in records if record.get("path") == "/predict"]
    assert access["request_id"] == "trace-7f3a" and access["status_code"] == 200 and access["method"] == "POST"
    assert any(record["name"] == "app" and record["message"].startswith("serving ") for record in records)
    assert all({"asctime", "levelname", "name", "message"} <= record.keys() for record in records)
    assert not [record for record in records if "color_message" in record]  # uvicorn's template, with its escapes


def test_the_images_own_health_check_is_left_out_of_the_access_log_and_other_requests_are_not():
    # Docker asks every 10 s: its line was most of an idle server's log.
    env = {"VIT_DEVICE": "cpu", "VIT_WORKERS": "1", "VIT_ACCESS_LOG": "true"}
    with running_server(env, app=None) as server:
        port = server.base_url.rpartition(":")[2]
        checked = subprocess.run(
            [sys.executable, "-m", "app.healthcheck"], env=os.environ | {"VIT_PORT": port}, timeout=30, check=False
        )
        assert checked.returncode == 0 and httpx.get(f"{server.base_url}/health/live").status_code == 200
        _, output = server.stop()
    assert '"GET /health/live HTTP/1.1" 200' in output
    assert "/health/ready" not in output  # the check's, and the harness's own wait for the server to be ready


@pytest.mark.parametrize(
    "client, path, status, logged",
    [
        ("127.0.0.1:50000", "/health/ready", 200, False),
        ("::1:50000", "/health/ready", 200, False),
        ("::ffff:127.0.0.1:50000", "/health/ready", 200, False),  # VIT_HOST=::
        ("127.0.0.1:50000", "/vit/health/ready", 200, False),  # under VIT_ROOT_PATH=/vit
        ("127.0.0.1:50000", "/health/ready", 503, True),  # draining, or not yet ready
        ("10.0.0.7:50000", "/health/ready", 200, True),  # Kubernetes' probe, a load balancer's
        ("127.0.0.1:50000", "/health/live", 200, True),
        ("127.0.0.1:50000", "/v2/health/ready", 200, True),  # a v2 client's
        ("127.0.0.1:50000", "/model", 200, True),
    ],
)
def test_only_a_ready_answer_to_this_machines_own_health_check_leaves_no_access_line(client, path, status, logged):
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, "%s %s %s %s %d", None, None)
    record.args = (client, "GET", path, "1.1", status)
    root_path = "/vit" if path.startswith("/vit/") else ""
    assert OwnHealthCheckFilter(root_path).filter(record) is logged
