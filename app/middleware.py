"""ASGI middleware: request ids, trailing slashes and HEAD, the request body's limits in size and time, request
counting and timing for Prometheus, and start-up failures that are the user's to fix, in one line."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid

from fastapi import HTTPException
from starlette.routing import Match, Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.config import SettingsError
from app.errors import error_body, root_prefix
from app.logs import REQUEST_ID
from app.metrics import HttpMetrics
from app.remote_backend import ModelProcessError
from model.metadata import CheckpointError

ACCEPTED_REQUEST_ID = re.compile(rb"[\x21-\x7e]{1,128}")  # visible ASCII: nothing that could split a log line


class RequestId:
    """Every answer carries X-Request-ID: the client's own, if it sent a usable one, else a new UUID.

    The id is set for the request's task (app.logs.REQUEST_ID), so its access log line carries it too.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"")
        request_id = given if ACCEPTED_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex.encode()
        token = REQUEST_ID.set(request_id.decode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = message | {"headers": [*message.get("headers", []), (b"x-request-id", request_id)]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)


class RoutedAlike:
    """Requests that mean the same as a route's own answer as it does, with no redirect: `/model/` as
    `/model`, and HEAD as GET, whose body uvicorn then leaves out.

    Starlette's redirect_slashes answered `/model/` with a redirect to an absolute URL built from the Host
    header, which any client sets: `Host: evil.example` got `location: http://evil.example/model`. And
    FastAPI routes only the methods that a route declares, so HEAD, which `curl -I` and uptime checkers
    send and RFC 9110 asks every server for, got 405 everywhere. The scope is a copy: uvicorn's own still
    says HEAD, and so sends no body. A 405's Allow header then names HEAD wherever it names GET.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope = _without_trailing_slash(scope)
            if scope["method"] == "HEAD":
                scope = scope | {"method": "GET"}
            send = _allowing_head(send)
        await self.app(scope, receive, send)


def _without_trailing_slash(scope: Scope) -> Scope:
    """`/model/` as `/model`; under a root path (VIT_ROOT_PATH, which uvicorn puts before every path),
    `/vit/model/` as `/vit/model`, leaving `/vit/`, the demo page, as it is."""
    path, prefix = scope["path"], root_prefix(scope)
    routed = path[len(prefix) :].rstrip("/") or "/"
    if prefix + routed == path:
        return scope
    raw_path = scope.get("raw_path") or path.encode()
    raw_routed = raw_path[len(prefix.encode()) :].rstrip(b"/") or b"/"
    return scope | {"path": prefix + routed, "raw_path": prefix.encode() + raw_routed}


def _allowing_head(send: Send) -> Send:
    async def send_allowing_head(message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] == 405:
            headers = message.get("headers", [])
            message = message | {
                "headers": [(key, _with_head(value) if key == b"allow" else value) for key, value in headers]
            }
        await send(message)

    return send_allowing_head


def _with_head(allowed: bytes) -> bytes:
    methods = allowed.split(b", ")
    return allowed + b", HEAD" if b"GET" in methods and b"HEAD" not in methods else allowed


class BodyTooLargeError(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than the limit of {limit} bytes")


class BodyTimeoutError(HTTPException):
    def __init__(self, timeout_s: float) -> None:
        # The rest of the body may still come: read as the next request's, it would be garbage.
        detail = f"the request body did not arrive within {timeout_s:g} s of its headers"
        super().__init__(408, detail, headers={"Connection": "close"})


class BodyLimits:
    """Refuse request bodies over `max_bytes` with 413, counting while they stream in, and bodies not in
    `timeout_s` after their headers with 408.

    A declared Content-Length is refused before reading; a chunked body is cut off as soon as it
    passes the limit, so an oversized upload never sits whole in memory. A client that stalls, or
    sends a byte at a time, holds its connection and its part-spooled upload until the deadline, and
    no longer. (The headers' deadline is the server's: app/http_protocol.py.)
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, send)
            return
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        received = 0
        complete = False

        async def limited_receive() -> Message:
            nonlocal received, complete
            if complete:  # what may follow the body is the client's disconnect, whenever it comes
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise BodyTimeoutError(self.timeout_s) from None  # an HTTPException: FastAPI answers 408
            received += len(message.get("body", b""))
            complete = not message.get("more_body", False)
            if received > self.max_bytes:
                raise BodyTooLargeError(self.max_bytes)  # an HTTPException: FastAPI answers 413
            return message

        await self.app(scope, limited_receive, send)

    async def _refuse(self, scope: Scope, send: Send) -> None:
        body = json.dumps(error_body(scope, BodyTooLargeError(self.max_bytes).detail), separators=(",", ":")).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class RequestMetrics:
    """Count every HTTP request by its route template and status, and time it."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # if the app raises before answering, the server answers 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        root_path = scope.get("root_path", "")  # as received: a mount that routes the request extends it
        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = _route_template(scope, root_path)
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)


def _route_template(routed: Scope, root_path: str) -> str:
    """The template of the route that answered, so that labels stay few; "unmatched" where none did.

    FastAPI names its own routes in the scope (`route`), but not the Starlette routes beside them:
    /openapi.json and the mounts of static files counted as unmatched, their 200s among the 404s.
    Those few are matched again here, with the root path that the request arrived with.
    """
    if (route := routed.get("route")) is not None:
        return route.path
    as_received = routed | {"root_path": root_path}
    for route in getattr(routed.get("app"), "routes", ()):
        if isinstance(route, Route | Mount) and route.matches(as_received)[0] is Match.FULL:
            return route.path
    return "unmatched"


class StartupFailures:
    """A start-up that fails on a checkpoint whose weights contradict its metadata, on settings that the
    device rules out (under plain uvicorn, which has not checked them), or on a model process that exited
    while loading the model (its log says why), is one line in the log: `cannot start: ...`, as one whose
    metadata is unusable is (app.main.create_app). Starlette reports any failure of the lifespan with its
    whole traceback, and such a checkpoint gave two screens of them. Other failures keep theirs."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        failure: Message | None = None

        async def holding_failure(message: Message) -> None:
            nonlocal failure
            if message["type"] == "lifespan.startup.failed":
                failure = message  # sent once the exception that follows it says whether to shorten it
            else:
                await send(message)

        try:
            await self.app(scope, receive, holding_failure)
        except (CheckpointError, ModelProcessError, SettingsError) as error:
            if failure is None:
                raise
            failure |= {"message": f"cannot start: {error}"}  # and the exception ends here, told
        finally:
            if failure is not None:
                await send(failure)
