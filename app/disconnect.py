"""Work for a client that has gone is cancelled, so that its queued inputs are dropped before they run."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import HTTPException, Request

T = TypeVar("T")
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the answer
WATCH_AFTER_S = 0.005


async def _wait_for_disconnect(request: Request) -> None:
    """The body is already read, so the next ASGI message is the disconnect (or the end of the response)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def while_connected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it.

    The watcher, a task waiting for the disconnect, starts only once the work has run WATCH_AFTER_S:
    most answers come sooner, and a task per request costs more than a timer that never fires.
    """
    task = asyncio.current_task()
    watcher: asyncio.Future | None = None

    def watch() -> None:
        nonlocal watcher
        watcher = asyncio.ensure_future(_wait_for_disconnect(request))
        watcher.add_done_callback(lambda done: None if done.cancelled() else task.cancel())

    start_watching = asyncio.get_running_loop().call_later(WATCH_AFTER_S, watch)
    try:
        return await work
    except asyncio.CancelledError:
        if watcher is not None and watcher.done() and not watcher.cancelled():  # the disconnect, not the server
            task.uncancel()
            raise HTTPException(CLIENT_CLOSED_REQUEST, "the client closed the connection") from None
        raise
    finally:
        start_watching.cancel()
        if watcher is not None:
            watcher.cancel()
