"""uvicorn's HTTP protocol (httptools), with deadlines for what a client sends before the app sees a request.

uvicorn closes a connection that is idle between requests after its keep-alive, and has no other
timeout on the way in: a connection that never sends a byte, or that sends its headers a byte at a
time, is held for as long as the client likes, and a few thousand such clients (Slowloris) hold all
the file descriptors that a process may open. Here:

- a new connection is idle until its first byte, and is closed after the keep-alive, as one between
  requests is;
- a request's headers must arrive within VIT_RECEIVE_TIMEOUT_S of its first byte; past it, the
  client gets 408 and the connection is closed.

The body's deadline is the app's (app/middleware.BodyLimits), so that its 408 goes through the app
as every other error does: request id, metrics, the route's error shape. vit-serve runs this protocol;
under a plain `uvicorn app.main:app` the body's deadline still holds.
"""

from __future__ import annotations

import asyncio
import json
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.config import get_settings

logger = logging.getLogger("app.http_protocol")


class DeadlineHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.receive_timeout_s = get_settings().receive_timeout_s
        self.headers_deadline: asyncio.TimerHandle | None = None  # armed at a request's first byte

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # uvicorn arms its keep-alive only after a response; its first byte disarms it, as after one.
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def data_received(self, data: bytes) -> None:
        if self.headers_deadline is None:
            self.headers_deadline = self.loop.call_later(self.receive_timeout_s, self._headers_overdue)
        super().data_received(data)

    def on_response_complete(self) -> None:
        self._disarm()  # the next request's first byte arms it again
        super().on_response_complete()

    def handle_websocket_upgrade(self) -> None:
        self._disarm()  # the connection is the WebSocket protocol's from here on
        super().handle_websocket_upgrade()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _disarm(self) -> None:
        if self.headers_deadline is not None:
            self.headers_deadline.cancel()
            self.headers_deadline = None

    def _headers_overdue(self) -> None:
        self.headers_deadline = None
        if self.cycle is not None and not self.cycle.response_complete:
            return  # the headers are in, and the app has the request: its body's deadline is the app's
        if self.transport.is_closing():
            return
        detail = f"the request's headers did not arrive within {self.receive_timeout_s:g} s of its first byte"
        client = "{}:{}".format(*self.client) if self.client else "a client"
        logger.info("%s: %s; connection closed", client, detail)
        body = json.dumps({"detail": detail}).encode()
        head = [b"HTTP/1.1 408 Request Timeout"]
        head += [name + b": " + value for name, value in self.server_state.default_headers]
        head += [b"content-type: application/json", b"content-length: %d" % len(body), b"connection: close"]
        self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        self.transport.close()
