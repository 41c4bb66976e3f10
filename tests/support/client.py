"""The app in process: its lifespan run for real, requests through httpx's ASGI transport."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import httpx

from app.config import Settings
from app.main import create_app

T = TypeVar("T")


@asynccontextmanager
async def client_for(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
            yield client


def run(scenario: Callable[[httpx.AsyncClient], Awaitable[T]], **overrides) -> T:
    """Run `scenario(client)` against a fresh app (the shipped checkpoint unless overridden)."""

    async def main() -> T:
        async with client_for(Settings(**overrides)) as client:
            return await scenario(client)

    return asyncio.run(main())


def explain(client: httpx.AsyncClient, image: bytes, **params) -> Awaitable[httpx.Response]:
    return client.post("/attention", files={"file": ("boot.png", image, "image/png")}, params=params)


async def maps_alone_and_together(client: httpx.AsyncClient, images: list[bytes], method: str) -> tuple:
    """Each image's attention map asked for alone, then all at once (so that they share batches), with the
    attention batcher's statistics after both."""
    alone = [(await explain(client, image, method=method, format="json")).json()["map"] for image in images]
    together = await asyncio.gather(*(explain(client, image, method=method, format="json") for image in images))
    stats = (await client.get("/model")).json()["batching"]["stats"]["attention"]
    return alone, [response.json()["map"] for response in together], stats
