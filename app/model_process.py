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
from functools import partial
from multiprocessing.connection import Connection
from typing import Any

from app.backend import LocalBackend
from app.config import get_settings
from app.logs import log_config
from app.model_protocol import FrameWriter, error_reply, read_message

logger = logging.getLogger("app.model_process")


async def _answer(writer: FrameWriter, request_id: int, work: Any) -> None:
    try:
        reply = (request_id, True, await work)
    except asyncio.CancelledError:  # the front end gave up on it: no reply
        return
    except Exception as error:  # noqa: BLE001 - every failure goes back to the front end that asked
        reply = error_reply(request_id, error)
    writer.send(reply)


async def _serve_front_end(
    started: asyncio.Future[LocalBackend], reader: asyncio.StreamReader, stream: asyncio.StreamWriter
) -> None:
    """One front end's connection: its requests run concurrently, and each reply goes back when ready."""
    writer = FrameWriter(stream)
    tasks: dict[int, asyncio.Task] = {}
    try:
        backend = await started  # the front end's hello waits until the model is loaded and warmed up
        while True:
            message = await read_message(reader)
            kind = message[0]
            if kind == "hello":
                writer.send(("hello", backend.model))
                continue
            request_id = message[1]
            if kind == "cancel":
                if (task := tasks.get(request_id)) is not None:
                    task.cancel()
                continue
            if kind == "submit":  # (endpoint, item, timeout_s)
                work = backend.submit(*message[2:])
            elif kind == "stats":
                work = backend.stats()
            else:
                work = backend.metrics()
            task = asyncio.create_task(_answer(writer, request_id, work))
            tasks[request_id] = task
            task.add_done_callback(lambda _, request_id=request_id: tasks.pop(request_id, None))
    except (asyncio.IncompleteReadError, ConnectionError):
        pass  # the front end has gone
    finally:
        for task in list(tasks.values()):
            task.cancel()
        writer.close()


async def serve(socket_path: str, lifeline: Connection) -> None:
    """Listen at once, so that front ends connect and wait for the model; if loading it fails, they see the
    socket close and fail their start-up, instead of waiting for a model that will never come."""
    started: asyncio.Future[LocalBackend] = asyncio.get_running_loop().create_future()
    server = await asyncio.start_unix_server(partial(_serve_front_end, started), path=socket_path)
    settings = get_settings()
    # The workers are front ends: torch gets the whole quota, and each front end the queue it would have alone.
    settings = settings.model_copy(update={"workers": 1, "queue_size": settings.queue_size * max(1, settings.workers)})
    backend = await LocalBackend.start(settings)
    started.set_result(backend)
    logger.info("model process: serving %s on %s", backend.model.name, backend.model.description["device"])
    closed = asyncio.Event()
    asyncio.get_running_loop().add_reader(lifeline.fileno(), closed.set)  # readable at EOF: vit-serve is done
    try:
        await closed.wait()
    finally:
        server.close()
        await backend.stop()


def main(socket_path: str, lifeline: Connection) -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    logging.config.dictConfig(log_config(get_settings().log_format))
    asyncio.run(serve(socket_path, lifeline))
