"""Soak: 5,000 requests at concurrency 64, good and bad mixed, against vit-serve as the image runs it.
Every answer is the expected one, no connection is reset, and memory stops growing."""

import asyncio

import httpx

from tests.support.images import image_bytes
from tests.support.server import rss_mb, running_server

REQUESTS = 5000
CONCURRENCY = 64


def test_soak_mixed_traffic_gives_expected_statuses_and_bounded_memory(fashion_test):
    good = [image_bytes(fashion_test.images[i, 0].numpy()) for i in range(16)]
    kinds = {
        "good": (lambda i: {"files": {"file": ("ok.png", good[i % 16], "image/png")}}, 200),
        "attention": (lambda i: {"files": {"file": ("ok.png", good[i % 16], "image/png")}, "path": "/attention"}, 200),
        "truncated": (lambda i: {"files": {"file": ("bad.png", good[i % 16][:100], "image/png")}}, 400),
        "text": (lambda i: {"files": {"file": ("bad.txt", b"not an image", "text/plain")}}, 415),
        "bad top_k": (
            lambda i: {"files": {"file": ("ok.png", good[i % 16], "image/png")}, "params": {"top_k": 0}},
            422,
        ),
    }
    schedule = [list(kinds)[i % len(kinds)] for i in range(REQUESTS)]
    unexpected: list[tuple[str, int]] = []
    rss: dict[int, float] = {}

    async def worker(client: httpx.AsyncClient, queue: asyncio.Queue, pid: int) -> None:
        while not queue.empty():
            index = queue.get_nowait()
            make, expected = kinds[schedule[index]]
            request = make(index)
            response = await client.post(request.pop("path", "/predict"), **request)
            if response.status_code != expected:
                unexpected.append((schedule[index], response.status_code))
            if index in (1000, 4999):
                rss[index] = rss_mb(pid)

    async def soak(base_url: str, pid: int) -> None:
        queue: asyncio.Queue = asyncio.Queue()
        for index in range(REQUESTS):
            queue.put_nowait(index)
        limits = httpx.Limits(max_connections=CONCURRENCY)
        async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:
            await asyncio.wait_for(
                asyncio.gather(*(worker(client, queue, pid) for _ in range(CONCURRENCY))), timeout=300
            )

    with running_server({"VIT_DEVICE": "cpu", "VIT_QUEUE_SIZE": "1024"}, app=None) as server:
        asyncio.run(soak(server.base_url, server.process.pid))
    assert unexpected == []
    growth = (rss[4999] - rss[1000]) / rss[1000]
    print(f"RSS {rss[1000]:.0f} MB at request 1000, {rss[4999]:.0f} MB at 5000 ({100 * growth:+.1f} %)")
    assert growth < 0.10
