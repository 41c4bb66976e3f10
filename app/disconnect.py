"""Work for a client that has gone is cancelled, so that its queued inputs are dropped before they run."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import HTTPException, Request

T = TypeVar("T")
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the answer


async def _wait_for_disconnect(request: Request) -> None:
    """The body is already read, so the next ASGI message is the disconnect (or the end of the response)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def while_connected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it."""
    task = asyncio.current_task()
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    watcher.add_done_callback(lambda done: None if done.cancelled() else task.cancel())
    try:
        return await work
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled():  # cancelled by the disconnect, not by the server
            task.uncancel()
            raise HTTPException(CLIENT_CLOSED_REQUEST, "the client closed the connection") from None
        raise
    finally:
        watcher.cancel()
