"""The model process's protocol: length-prefixed frames over a Unix socket, each a pickled list of messages.

Both ends are processes of one server, started by one vit-serve: the socket lives in a directory
that only its user can open, so nothing else can send the pickles that are read here.

Pixels travel inside the frames, as numpy arrays (a front end never loads torch), not in shared
memory: a slot of shared memory could only be reused once the model process said it was done with
it, a cancel included, and for the images a model takes (784 bytes for the shipped one, 150 KB at
224 x 224 RGB) the copies that this saves cost less than a forward pass of such a model (README,
"One model process, many front ends").

    front end -> model process          model process -> front end
    ("hello",)                          ("hello", ServedModel)
    ("submit", id, endpoint, item, s)   (id, True, result) or (id, False, error class name, message)
    ("cancel", id)                      nothing: the submit's reply is never sent
    ("stats", id), ("metrics", id)      (id, True, each batcher's report or the Prometheus exposition)
"""

from __future__ import annotations

import asyncio
import io
import pickle
import struct
from typing import Any

import numpy as np

from app.batcher import BatchError, QueueFullError, ShuttingDownError

LENGTH = struct.Struct("<I")
# The failures a submit may end with, by name, so that the front end raises what a local batcher would.
ERRORS: dict[str, type[Exception]] = {
    error.__name__: error for error in (QueueFullError, BatchError, ShuttingDownError, TimeoutError)
}


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        """Arrays travel as their bytes, their dtype and their shape.

        numpy's own pickling, which rebuilds an array through its constructor, costs more each way. A
        writable buffer is pickled in band as a bytearray, which the array then shares, writable.
        """
        if isinstance(obj, np.ndarray):
            contiguous_and_writable = obj.flags.c_contiguous and obj.flags.writeable
            array = obj if contiguous_and_writable else obj.copy(order="C")
            return _array, (pickle.PickleBuffer(array), array.dtype.str, array.shape)
        return NotImplemented


def _array(data: bytearray, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """The array that _Pickler sent."""
    return np.frombuffer(data, dtype=dtype).reshape(shape)


class FrameWriter:
    """Sends messages over a stream; those sent in one turn of the event loop leave as one frame.

    Under load a front end submits many requests in one turn, and the model process answers a whole
    batch at once: one pickling, one write and one wake-up of the other end per turn, instead of one
    of each per message. The model process's loop is the one that every request of every front end
    passes through, so its cost per message bounds the whole server.
    """

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._pending: list[tuple] = []

    def send(self, message: tuple) -> None:
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(message)

    def _flush(self) -> None:
        messages, self._pending = self._pending, []
        if not self._writer.is_closing():
            self._writer.write(frame(messages))

    def close(self) -> None:
        self._writer.close()


def frame(messages: list[tuple]) -> bytes:
    buffer = io.BytesIO()
    buffer.write(b"\0" * LENGTH.size)
    _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(messages)
    body = buffer.getbuffer()
    LENGTH.pack_into(body, 0, len(body) - LENGTH.size)
    return bytes(body)


async def read_messages(reader: asyncio.StreamReader) -> list[tuple]:
    """The messages of the next frame; asyncio.IncompleteReadError when the other end has closed."""
    (length,) = LENGTH.unpack(await reader.readexactly(LENGTH.size))
    return pickle.loads(await reader.readexactly(length))


def error_reply(request_id: int, error: Exception) -> tuple:
    name = type(error).__name__ if type(error).__name__ in ERRORS else BatchError.__name__
    return (request_id, False, name, str(error))


def reply_error(name: str, message: str) -> Exception:
    """The exception that an error reply stands for."""
    return ERRORS.get(name, BatchError)(message)
