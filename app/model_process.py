"""The model process: one copy of the model, fed by every front end of a vit-serve with VIT_MODEL_PROCESS.

Front ends (uvicorn workers) parse HTTP and decode images; they send decoded uint8 images here over
a Unix socket (app/model_protocol.py), so batches form across all of them and the device gets them
whole. The model and its batchers are the same as in a single process (app/backend.LocalBackend).

It stops when its lifeline closes: vit-serve closes it once its front ends have drained. Signals are
ignored, so that a Ctrl-C or a SIGTERM sent to the whole process group cannot stop the model before
the front ends have answered what they accepted.
"""

from __future__ import annotations

import asyncio
import logging
import logging.config
import signal
from collections.abc import Awaitable
from functools import partial
from multiprocessing.connection import Connection

from uvicorn.config import STARTUP_FAILURE
from uvicorn.loops.auto import auto_loop_factory

from app.backend import LocalBackend
from app.batcher import QueueFullError
from app.config import get_settings
from app.heap import frozen_heap
from app.logs import log_config
from app.model_protocol import FrameWriter, error_reply, read_messages
from model.metadata import CheckpointError

logger = logging.getLogger("app.model_process")


async def _answer(writer: FrameWriter, request_id: int, work: Awaitable) -> None:
    """A stats or metrics request's reply."""
    try:
        reply = (request_id, True, await work)
    except Exception as error:  # noqa: BLE001 - every failure goes back to the front end that asked
        reply = error_reply(request_id, error)
    writer.send(reply)


class FrontEnd:
    """One front end's connection: its inputs are queued as they arrive, and each reply goes back when ready.

    Every request of every front end passes through this loop, so an input costs it no task and no
    timer: a callback on the batcher's future sends the reply, and a cancel cancels that future.
    """

    def __init__(self, backend: LocalBackend, writer: FrameWriter) -> None:
        self.backend = backend
        self.writer = writer
        self.waiting: dict[int, asyncio.Future] = {}  # request id -> its input's future in a batcher

    def handle(self, message: tuple) -> None:
        kind, request_id = message[0], message[1]
        if kind == "submit":  # (endpoint, item, timeout_s)
            try:
                future = self.backend.enqueue(*message[2:])
            except QueueFullError as error:
                self.writer.send(error_reply(request_id, error))
                return
            self.waiting[request_id] = future
            future.add_done_callback(partial(self._reply, request_id))
        elif kind == "cancel":
            if (future := self.waiting.get(request_id)) is not None:
                future.cancel()  # the batcher drops it; no reply
        elif kind == "stats":
            asyncio.ensure_future(_answer(self.writer, request_id, self.backend.stats()))
        else:
            asyncio.ensure_future(_answer(self.writer, request_id, self.backend.metrics()))

    def _reply(self, request_id: int, future: asyncio.Future) -> None:
        del self.waiting[request_id]
        if future.cancelled():
            return
        error = future.exception()
        self.writer.send((request_id, True, future.result()) if error is None else error_reply(request_id, error))

    def drop_waiting(self) -> None:
        """The front end has gone: its inputs still queued are dropped before they run."""
        for future in list(self.waiting.values()):
            future.cancel()


async def _serve_front_end(
    started: asyncio.Future[LocalBackend], reader: asyncio.StreamReader, stream: asyncio.StreamWriter
) -> None:
    writer = FrameWriter(stream)
    front_end: FrontEnd | None = None
    try:
        try:
            backend = await started  # the front end's hello waits until the model is loaded and warmed up
        except Exception:  # noqa: BLE001 - whatever stopped the load, main() logs; closing tells the front end
            return
        front_end = FrontEnd(backend, writer)
        while True:
            for message in await read_messages(reader):
                if message[0] == "hello":
                    writer.send(("hello", backend.model))
                else:
                    front_end.handle(message)
    except (asyncio.IncompleteReadError, ConnectionError):
        pass  # the front end has gone
    finally:
        if front_end is not None:
            front_end.drop_waiting()
        writer.close()


async def serve(socket_path: str, lifeline: Connection) -> None:
    """Listen at once, so that front ends connect and wait for the model; if loading it fails, they see the
    socket close and fail their start-up, instead of waiting for a model that will never come."""
    started: asyncio.Future[LocalBackend] = asyncio.get_running_loop().create_future()
    server = await asyncio.start_unix_server(partial(_serve_front_end, started), path=socket_path)
    settings = get_settings()
    # The workers are front ends: torch gets the whole quota, and each front end the queue it would have alone.
    settings = settings.model_copy(update={"workers": 1, "queue_size": settings.queue_size * max(1, settings.workers)})
    try:
        backend = await LocalBackend.start(settings)
    except BaseException as error:
        started.set_exception(error)
        server.close()
        await asyncio.sleep(0)  # the front ends' connections see it and close before this loop ends
        raise
    started.set_result(backend)
    logger.info("model process: serving %s on %s", backend.model.name, backend.model.description["device"])
    closed = asyncio.Event()
    asyncio.get_running_loop().add_reader(lifeline.fileno(), closed.set)  # readable at EOF: vit-serve is done
    try:
        with frozen_heap():
            await closed.wait()
    finally:
        server.close()
        await backend.stop()


def main(socket_path: str, lifeline: Connection) -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    logging.config.dictConfig(log_config(get_settings().log_format))
    # The loop that uvicorn picks for the front ends: uvloop where it is installed.
    with asyncio.Runner(loop_factory=auto_loop_factory()) as runner:
        try:
            runner.run(serve(socket_path, lifeline))
        except CheckpointError as error:  # the user's to fix, in one line, as a worker's start-up says it
            logger.error("cannot start: %s", error)
            raise SystemExit(STARTUP_FAILURE) from None
