"""uvicorn's HTTP protocol (httptools), with limits in time and size on what a client sends before the app
sees a request.

uvicorn closes a connection that is idle between requests after its keep-alive, and has no other
limit on the way in with httptools: a connection that never sends a byte, or that sends its headers
a byte at a time, is held for as long as the client likes, and a few thousand such clients
(Slowloris) hold all the file descriptors that a process may open; one header line that never ends
is gathered for as long as it comes, at a cost in CPU time that grows faster than its length, and
the process answers nobody else meanwhile. Here:

- a new connection is idle until its first byte, and is closed after the keep-alive, as one between
  requests is;
- a request's headers must arrive within VIT_RECEIVE_TIMEOUT_S of its first byte, else 408;
- a request line and headers of more than MAX_HEADER_BYTES get 431;
- bytes that are no HTTP request get 400, with the parser's reason;
and after any of these answers the connection is closed. So is one where the rest of a body that an early
answer left unread (a 405, a 401) has been coming for VIT_RECEIVE_TIMEOUT_S.

The body's deadline is the app's (app/middleware.BodyLimits), so that its 408 goes through the app
as every other error does: request id, metrics, the route's error shape. vit-serve runs this protocol;
under a plain `uvicorn app.main:app` the body's deadline still holds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from typing import Literal

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.config import get_settings

logger = logging.getLogger("app.http_protocol")
MAX_HEADER_BYTES = 16 * 1024  # a request line and headers, as uvicorn's h11 parser and Node.js allow by default
# The key of the app's HttpMetrics in the lifespan state, which uvicorn hands this protocol (app/main.py). Not
# imported from app/metrics.py: vit-serve imports this module before it points prometheus_client at its folder.
STATE_KEY = "http_metrics"


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.receive_timeout_s = get_settings().receive_timeout_s
        self.headers_deadline: asyncio.TimerHandle | None = None  # armed at a request's first byte
        self.reading: Literal["nothing", "headers", "body"] = "nothing"  # of a request, as the parser goes
        self.header_bytes = 0  # of the chunks that held only headers so far
        self.header_tail = b""  # their last bytes, where the end of the headers may have begun

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # uvicorn arms its keep-alive only after a response; its first byte disarms it, as after one.
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def data_received(self, data: bytes) -> None:
        if self.headers_deadline is None:
            self.headers_deadline = self.loop.call_later(self.receive_timeout_s, self._headers_overdue)
        if self.header_bytes + len(data) > MAX_HEADER_BYTES and self.reading != "body" and not self._headers_end(data):
            detail = f"the request line and headers pass {MAX_HEADER_BYTES} bytes"
            self._refuse(431, "Request Header Fields Too Large", detail)  # before the parser gathers them
            return
        super().data_received(data)
        if self.reading == "headers":  # all of this chunk was headers
            self.header_bytes += len(data)
            self.header_tail = data[-3:]

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes that its parser refuses: text/plain "Invalid HTTP request received.", counted
        nowhere, without the parser's reason. Here the API's shape, the reason (what is ambiguous or malformed), and
        a count in the metrics, as the 408 and 431."""
        reason = sys.exception()  # the HttpParserError that uvicorn is handling
        self._refuse(400, "Bad Request", f"invalid HTTP request: {reason}" if reason else msg)

    def _headers_end(self, data: bytes) -> bool:
        """Whether the headers end in `data` within MAX_HEADER_BYTES of the request's first byte."""
        return b"\r\n\r\n" in self.header_tail + data[: MAX_HEADER_BYTES - self.header_bytes]

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.reading = "headers"

    def on_headers_complete(self) -> None:
        self.reading, self.header_bytes, self.header_tail = "body", 0, b""
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self.reading = "nothing"
        super().on_message_complete()

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
        # A body that the app reads has the app's deadline; a request pipelined behind one running waits for it.
        if (self.cycle is not None and not self.cycle.response_complete) or self.transport.is_closing():
            return
        if self.reading == "headers":
            detail = f"the request's headers did not arrive within {self.receive_timeout_s:g} s of its first byte"
            self._refuse(408, "Request Timeout", detail)
        elif self.reading == "body":  # the rest of a body that an early answer left unread, still coming
            self.transport.close()

    def _refuse(self, status: int, reason: str, detail: str) -> None:
        """Answer before the app has the request, as uvicorn answers a request it cannot parse, and close."""
        client = "{}:{}".format(*self.client) if self.client else "a client"
        logger.info("%s: %s; answered %d and closed the connection", client, detail, status)
        if (metrics := self.app_state.get(STATE_KEY)) is not None:  # None until the app has started
            metrics.count_refused(status)
        body = json.dumps({"detail": detail}, separators=(",", ":")).encode()  # as the app's JSONResponse writes it
        head = [b"HTTP/1.1 %d %s" % (status, reason.encode())]
        head += [name + b": " + value for name, value in self.server_state.default_headers]
        head += [b"content-type: application/json", b"content-length: %d" % len(body), b"connection: close"]
        self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        self.transport.close()
