"""A corpus of hostile and odd uploads against vit-serve with two workers: each gets its documented answer,
the server keeps serving, costly uploads neither freeze the others nor bloat memory."""

import statistics
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from model.images import READS_AVIF, READS_HEIF
from tests.support.images import (
    HEIC_EXAMPLE,
    HEIC_FILES,
    image_bytes,
    jpeg_with_fill_bytes,
    jpeg_with_repeated_scans,
    png_header,
    png_with_empty_chunks,
)
from tests.support.server import rss_mb


def bomb_png() -> bytes:
    """A small file whose header claims 100,000 x 100,000 pixels, with a little zlib data after it."""
    return png_header(100_000, 100_000, zlib.compress(b"\0" * 100_000))


def jpeg_with_corrupt_exif() -> bytes:
    jpeg = image_bytes(Image.new("L", (28, 28), 128), "JPEG")
    junk_exif = b"Exif\0\0" + b"MM\0\x2a" + b"\xff" * 40  # TIFF header, then nonsense offsets
    segment = b"\xff\xe1" + struct.pack(">H", len(junk_exif) + 2) + junk_exif
    return jpeg[:2] + segment + jpeg[2:]


EMPTY_CHUNKS_PNG = png_with_empty_chunks(10_000_000)
FILL_BYTES_JPEG = jpeg_with_fill_bytes(10_000_000)
REPEATED_SCANS_JPEG = jpeg_with_repeated_scans(1_100_000)
NOISE = Image.fromarray(np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8))
GOOD_PNG = image_bytes(NOISE)
GOOD_JPEG = image_bytes(Image.new("RGB", (64, 64), (90, 90, 90)), "JPEG")
AVIF_BOMB = image_bytes(Image.new("L", (6000, 5000)), "AVIF", speed=10) if READS_AVIF else b""
HEIC_BOMB = (HEIC_FILES / "bomb.heic").read_bytes()  # 7 KB of 30 million pixels

# name -> (files for the multipart body, allowed statuses)
CORPUS = {
    "truncated jpeg": ({"file": ("a.jpg", GOOD_JPEG[: len(GOOD_JPEG) // 3], "image/jpeg")}, {400}),
    "truncated png": ({"file": ("a.png", GOOD_PNG[: len(GOOD_PNG) // 2], "image/png")}, {400}),
    "zero bytes": ({"file": ("a.png", b"", "image/png")}, {400}),
    "random bytes named png": ({"file": ("a.png", np.random.default_rng(0).bytes(4096), "image/png")}, {400}),
    "gif header over script (polyglot)": (
        {"file": ("a.gif", b"GIF89a/*" + b"\0" * 8 + b"*/=alert(1);", "image/gif")},
        {400},
    ),
    "jpeg with corrupt exif": ({"file": ("a.jpg", jpeg_with_corrupt_exif(), "image/jpeg")}, {200}),  # EXIF is ignored
    "decompression bomb png": ({"file": ("bomb.png", bomb_png(), "image/png")}, {413}),
    # 900 bytes that decode to 30 million pixels
    **({"decompression bomb avif": ({"file": ("bomb.avif", AVIF_BOMB, "image/avif")}, {413})} if READS_AVIF else {}),
    **(
        {
            "decompression bomb heic": ({"file": ("bomb.heic", HEIC_BOMB, "image/heic")}, {413}),
            "truncated heic": ({"file": ("a.heic", HEIC_EXAMPLE.read_bytes()[:1500], "image/heic")}, {400}),
        }
        if READS_HEIF
        else {}
    ),
    "65535 x 1 image": ({"file": ("wide.png", image_bytes(Image.new("L", (65535, 1), 255)), "image/png")}, {400}),
    "100 x 1 image (at the aspect limit)": (
        {"file": ("strip.png", image_bytes(Image.new("L", (100, 1), 255)), "image/png")},
        {200},
    ),
    "1 x 1 image": ({"file": ("dot.png", image_bytes(Image.new("L", (1, 1), 255)), "image/png")}, {200}),
    "16-bit png": (
        {"file": ("deep.png", image_bytes(Image.fromarray(np.full((28, 28), 50000, np.uint16))), "image/png")},
        {200},
    ),
    "cmyk jpeg": (
        {"file": ("cmyk.jpg", image_bytes(Image.new("CMYK", (28, 28), (0, 0, 0, 0)), "JPEG"), "image/jpeg")},
        {200},
    ),
    "animated gif": (
        {
            "file": (
                "anim.gif",
                image_bytes(
                    Image.new("P", (28, 28)), "GIF", save_all=True, append_images=[Image.new("P", (28, 28), 1)]
                ),
                "image/gif",
            )
        },
        {200},
    ),
    "svg": ({"file": ("a.svg", b'<svg xmlns="http://www.w3.org/2000/svg"/>', "image/svg+xml")}, {415}),
    "pdf": (
        {"file": ("a.pdf", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", "application/pdf")},
        {415},
    ),
    "ico (readable, not allowed)": (
        {"file": ("a.ico", image_bytes(Image.new("L", (16, 16)), "ICO"), "image/x-icon")},
        {415},
    ),
    "lab tiff (readable, a mode not converted)": (
        {"file": ("lab.tif", image_bytes(Image.new("LAB", (28, 28)), "TIFF"), "image/tiff")},
        {415},
    ),
    "float tiff with nan and infinite pixels": (
        {
            "file": (
                "depth.tif",
                image_bytes(Image.fromarray(np.array([[np.nan, np.inf, -np.inf, 1.0]] * 4, np.float32), "F"), "TIFF"),
                "image/tiff",
            )
        },
        {200},
    ),
    "wrong field name": ({"picture": ("a.png", GOOD_PNG, "image/png")}, {422}),
    "huge filename": ({"file": ("a" * 100_000 + ".png", GOOD_PNG, "image/png")}, {400}),
    # Cheap to send and slow to parse: seconds of CPU each, in a decoder process under VIT_DECODE_TIMEOUT_S.
    "png led by 830,000 empty chunks (10 MB)": (
        {"file": ("chunks.png", EMPTY_CHUNKS_PNG, "image/png")},
        {200, 413},
    ),
    "jpeg padded with 10 MB of fill bytes": ({"file": ("fill.jpg", FILL_BYTES_JPEG, "image/jpeg")}, {200, 413}),
    "progressive jpeg repeating a scan 20,000 times (1 MB)": (
        {"file": ("scans.jpg", REPEATED_SCANS_JPEG, "image/jpeg")},
        {413},
    ),
}


@pytest.fixture(scope="module")
def server_env():
    return {"VIT_DEVICE": "cpu", "VIT_WORKERS": "2", "VIT_MAX_UPLOAD_BYTES": "11000000", "VIT_DECODE_TIMEOUT_S": "1"}


@pytest.fixture(scope="module")
def server_app():
    return None  # vit-serve, as the image runs it


@pytest.mark.parametrize("case", CORPUS)
def test_hostile_upload_gets_its_answer_and_the_server_keeps_serving(server, case):
    files, allowed = CORPUS[case]
    response = httpx.post(f"{server.base_url}/predict", files=files, timeout=30)
    assert response.status_code in allowed, (response.status_code, response.text[:300])
    if response.status_code >= 400:
        assert response.json()["detail"]
    assert (
        httpx.post(
            f"{server.base_url}/predict", files={"file": ("ok.png", GOOD_PNG, "image/png")}, timeout=30
        ).status_code
        == 200
    )


@pytest.mark.parametrize(
    "name, kwargs, allowed",
    [
        ("json body instead of multipart", {"json": {"file": "x"}}, {415}),
        ("text body", {"content": b"hello", "headers": {"content-type": "text/plain"}}, {415}),
        (
            "multipart header without a boundary",
            {"content": GOOD_PNG, "headers": {"content-type": "multipart/form-data"}},
            {400, 422},
        ),
        (
            "multipart header, body is not multipart",
            {"content": GOOD_PNG, "headers": {"content-type": "multipart/form-data; boundary=xyz"}},
            {400, 422},
        ),
    ],
)
def test_malformed_requests_get_4xx(server, name, kwargs, allowed):
    response = httpx.post(f"{server.base_url}/predict", timeout=30, **kwargs)
    assert response.status_code in allowed, (name, response.status_code, response.text[:300])
    assert response.json()["detail"]
    assert httpx.get(f"{server.base_url}/health/ready").status_code == 200


def test_costly_uploads_in_flight_leave_everyone_else_their_idle_latency(server):
    def latency(send) -> float:
        started = time.monotonic()
        assert send().status_code == 200
        return time.monotonic() - started

    live = lambda: httpx.get(f"{server.base_url}/health/live", timeout=30)
    predict = lambda: httpx.post(f"{server.base_url}/predict", files={"file": ("ok.png", GOOD_PNG)}, timeout=30)
    idle = [latency(live) for _ in range(5)] + [latency(predict) for _ in range(5)]
    with ThreadPoolExecutor(4) as senders:  # two of each kind, all the time
        costly = [
            senders.submit(httpx.post, f"{server.base_url}/predict", files={"file": ("x", data)}, timeout=60)
            for data in (EMPTY_CHUNKS_PNG, FILL_BYTES_JPEG, EMPTY_CHUNKS_PNG, FILL_BYTES_JPEG)
        ]
        time.sleep(0.5)  # uploaded and decoding
        busy = [latency(live) for _ in range(5)] + [latency(predict) for _ in range(5)]
        answers = [future.result().status_code for future in costly]
    assert set(answers) <= {200, 413}
    # The figures (README, Odd and hostile uploads) are measured; the bound here only tells a frozen loop
    # (seconds, before decoding moved to processes) from a busy machine.
    assert statistics.median(busy) < statistics.median(idle) + 0.25, (idle, busy)


def test_large_decodes_four_at_a_time_stay_within_400_mb_a_worker(server):
    rgba = image_bytes(Image.new("RGBA", (5000, 5000), (200, 100, 50, 255)))  # 100 MB decoded, 75 KB encoded
    files = [("file", (f"{index}.png", rgba, "image/png")) for index in range(16)]
    workers = 2
    idle_mb = rss_mb(server.process.pid)
    peak_mb = idle_mb
    with ThreadPoolExecutor(4) as senders:
        requests = [
            senders.submit(httpx.post, f"{server.base_url}/predict", files=files, timeout=120) for _ in range(4)
        ]
        while not all(request.done() for request in requests):
            peak_mb = max(peak_mb, rss_mb(server.process.pid))
            time.sleep(0.05)
        answers = [request.result() for request in requests]
    after_mb = rss_mb(server.process.pid)
    assert [answer.status_code for answer in answers] == [200] * 4
    assert peak_mb - idle_mb <= 400 * workers, (idle_mb, peak_mb, after_mb)
    assert after_mb - idle_mb <= 200 * workers, (idle_mb, peak_mb, after_mb)


def test_the_schema_documents_every_status_the_corpus_may_get(server):
    schema = httpx.get(f"{server.base_url}/openapi.json").json()
    responses = schema["paths"]["/predict"]["post"]["responses"]
    possible = set().union(*(allowed for _, allowed in CORPUS.values()))
    assert possible <= {int(status) for status in responses}
    for status in possible - {200}:  # each error with the error model and an example of its sentence
        content = responses[str(status)]["content"]["application/json"]
        assert content["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
        assert content["example"]["detail"]
