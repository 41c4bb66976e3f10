"""The real thing: uvicorn in a subprocess on a free loopback port, with the shipped weights."""

import io
import signal
import socket

import httpx
import pytest
from PIL import Image

from tests.support.images import image_bytes
from tests.support.raw_http import one_answer

SHUTDOWN_TIMEOUT_S = 10


@pytest.fixture(scope="module")
def server_env():
    return {"VIT_DEVICE": "cpu", "VIT_MAX_UPLOAD_BYTES": "500000"}


def test_predicts_the_right_label_for_a_fashion_mnist_png(server, fashion_test):
    base_url = server.base_url
    for index in range(5):
        image = image_bytes(fashion_test.images[index, 0].numpy())
        response = httpx.post(f"{base_url}/predict", files={"file": (f"{index}.png", image, "image/png")}, timeout=30)
        assert response.status_code == 200
        top = response.json()["results"][0]["predictions"][0]
        assert top["index"] == int(fashion_test.labels[index])
        assert top["label"] == fashion_test.classes[top["index"]]


def test_attention_png_opens_in_pillow(server, fashion_test):
    base_url = server.base_url
    image = image_bytes(fashion_test.images[0, 0].numpy())
    response = httpx.post(f"{base_url}/attention", files={"file": ("boot.png", image, "image/png")}, timeout=30)
    assert response.status_code == 200
    heatmap = Image.open(io.BytesIO(response.content))
    heatmap.load()
    assert heatmap.size == (28, 28)


def test_chunked_body_over_the_limit_is_cut_off_with_413(server):
    base_url = server.base_url

    def body():
        yield b'--boundary\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
        yield b"Content-Type: image/png\r\n\r\n"
        for _ in range(100):  # 6.4 MB, far over the 500 kB limit
            yield b"0" * 65536

    headers = {"content-type": "multipart/form-data; boundary=boundary"}
    try:
        response = httpx.post(f"{base_url}/predict", content=body(), headers=headers, timeout=30)
    except httpx.TransportError:
        pytest.fail("the server dropped the connection instead of answering 413")
    assert response.status_code == 413
    assert "limit" in response.json()["detail"]
    assert httpx.get(f"{base_url}/health/ready").status_code == 200


@pytest.mark.parametrize("path", ["/health/ready", "/metrics", "/", "/v2/health/live"])
def test_head_answers_as_get_without_a_body_and_the_connection_serves_on(server, path):
    # FastAPI routes only the methods a route declares: HEAD, which `curl -I` and uptime checkers send, got 405
    get = httpx.get(f"{server.base_url}{path}", timeout=10)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(f"HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(65536)
        status_line, *lines = head.partition(b"\r\n\r\n")[0].decode().split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines)
        assert status_line == "HTTP/1.1 200 OK" and headers.get("content-type") == get.headers.get("content-type")
        assert head.endswith(b"\r\n\r\n")  # and no body: the next bytes on this connection are the next answer
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert one_answer(sock).startswith(b"HTTP/1.1 200 OK\r\n")


def test_sigterm_shuts_down_gracefully(server):
    assert httpx.get(f"{server.base_url}/health/live").json() == {"status": "ok"}
    server.process.send_signal(signal.SIGTERM)
    returncode = server.process.wait(timeout=SHUTDOWN_TIMEOUT_S)
    output = server.process.stdout.read().decode()
    assert returncode in (0, -signal.SIGTERM), output  # uvicorn may re-raise SIGTERM after a clean exit
    assert "Application shutdown complete" in output
