"""A front end's backend when vit-serve runs a model process: every call goes over its socket.

Answers come back in any order, matched to their requests by id. The front end times its own wait;
a request whose caller gives up (timeout, or the client left) is cancelled in the model process too,
so it is dropped before it runs.
If the model process goes away, every request waiting on it, and every later one, fails with
ShuttingDownError (503), and the front end reports itself not ready.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from typing import Any

from app.batcher import ShuttingDownError
from app.model_protocol import FrameWriter, frame, read_messages, reply_error
from app.served import ServedModel

logger = logging.getLogger("app.remote_backend")
CONNECT_POLL_S = 0.1
STATS_TIMEOUT_S = 1.0  # for a stats or metrics request


class ModelProcessError(RuntimeError):
    """The model process is not there to connect to, or exited while loading the model; its log says why."""


class RemoteBackend:
    def __init__(self, model: ServedModel, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.model = model
        self._writer = FrameWriter(writer)
        self._ids = itertools.count()
        self._waiting: dict[int, asyncio.Future] = {}
        self._receiver = asyncio.create_task(self._receive(reader), name="model-process-replies")

    @classmethod
    async def connect(cls, socket_path: str, timeout_s: float) -> RemoteBackend:
        """Connect, and say hello: the model process answers once it has loaded and warmed up the model.

        Its socket appears when it starts listening, before it loads the model. Until then the socket is
        missing and the front end waits; a socket that refuses, or a folder that vit-serve has removed,
        means that the model process has exited.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(socket_path)
                break
            except FileNotFoundError:
                if not os.path.isdir(os.path.dirname(socket_path)):
                    raise ModelProcessError("the model process has exited") from None
                if time.monotonic() > deadline:
                    raise ModelProcessError(
                        f"no model process listened at {socket_path} within {timeout_s} s"
                    ) from None
                await asyncio.sleep(CONNECT_POLL_S)
            except ConnectionRefusedError:
                raise ModelProcessError("the model process has exited") from None
        writer.write(frame([("hello",)]))
        try:
            [(kind, model)] = await read_messages(reader)
        except asyncio.IncompleteReadError:
            raise ModelProcessError("the model process exited while loading the model (its log says why)") from None
        assert kind == "hello", kind
        return cls(model, reader, writer)

    @property
    def alive(self) -> bool:
        return not self._receiver.done()

    async def submit(self, endpoint: str, item: Any, timeout_s: float) -> Any:
        return await self._call("submit", timeout_s, endpoint, item, timeout_s)

    async def stats(self) -> dict[str, dict]:
        return await self._call("stats", STATS_TIMEOUT_S)

    async def metrics(self) -> bytes:
        return await self._call("metrics", STATS_TIMEOUT_S)

    async def stop(self) -> None:
        self._receiver.cancel()
        self._writer.close()

    async def _call(self, kind: str, timeout_s: float, *arguments: Any) -> Any:
        if not self.alive:
            raise ShuttingDownError("the model process has stopped")
        request_id = next(self._ids)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._waiting[request_id] = future
        self._writer.send((kind, request_id, *arguments))
        # A timer on the future itself: asyncio.wait_for would add a second future and a callback per call.
        expiry = loop.call_later(timeout_s, _expire, future)
        try:
            return await future
        except (asyncio.CancelledError, TimeoutError):
            self._writer.send(("cancel", request_id))
            raise
        finally:
            expiry.cancel()
            self._waiting.pop(request_id, None)

    async def _receive(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                for request_id, ok, *reply in await read_messages(reader):
                    future = self._waiting.get(request_id)
                    if future is None or future.done():
                        continue  # its caller has given up
                    if ok:
                        future.set_result(reply[0])
                    else:
                        future.set_exception(reply_error(*reply))
        except (asyncio.IncompleteReadError, ConnectionError):
            logger.error("the model process has closed its socket")
        finally:
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(ShuttingDownError("the model process has stopped"))


def _expire(future: asyncio.Future) -> None:
    if not future.done():
        future.set_exception(TimeoutError())
