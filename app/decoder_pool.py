"""Decoder processes: uploads decoded where the work can be bounded and stopped.

A thread cannot be stopped; a process can. Each decoder process takes one image at a time, under a
CPU-time limit (RLIMIT_CPU, VIT_DECODE_TIMEOUT_S rounded up to whole seconds): an image that needs
more, a progressive JPEG with thousands of scans say, ends with the kernel's SIGXCPU, and the
process is replaced. A decode whose caller gives up (its client left, or its deadline passed) is
stopped the same way, by killing its process. They import Pillow and numpy, not torch.

Front ends of a model process and plain workers decode through the same pool (app/uploads.py).
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import os
import resource
import signal
from multiprocessing.connection import Connection

from app.decoding import Decoded, DecodeJob, decode


class DecodeTimeoutError(Exception):
    """The decode used up its CPU time; its process was ended."""


class DecoderCrashError(Exception):
    """The decoder process died for another reason than its CPU limit."""


class DecoderProcess:
    def __init__(self, context: multiprocessing.context.SpawnContext) -> None:
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child,), name="vit-decoder", daemon=True)
        self.process.start()
        child.close()

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.connection.close()


class DecoderPool:
    def __init__(self, size: int, cpu_limit_s: float) -> None:
        # spawn, not fork: the server process runs threads (torch's among them), which a fork would copy mid-flight
        self._context = multiprocessing.get_context("spawn")
        self.cpu_limit_s = max(1, math.ceil(cpu_limit_s))
        self._idle: asyncio.Queue[DecoderProcess] = asyncio.Queue()
        self._all: set[DecoderProcess] = set()
        for _ in range(size):
            self._add()

    def _add(self) -> None:
        decoder = DecoderProcess(self._context)
        self._all.add(decoder)
        self._idle.put_nowait(decoder)

    async def decode(self, job: DecodeJob) -> Decoded:
        """Decode in the next free process. Raises what decoding raised, DecodeTimeoutError or DecoderCrashError."""
        decoder = await self._idle.get()
        finished = False
        try:
            os.set_blocking(decoder.connection.fileno(), True)  # uvloop's add_reader leaves it non-blocking
            try:  # a send fails too if the process has died since its last image (the OOM killer, say)
                decoder.connection.send((job, self.cpu_limit_s))
                await _readable(decoder.connection)
                os.set_blocking(decoder.connection.fileno(), True)
                ok, value = decoder.connection.recv()
            except (EOFError, OSError):
                decoder.process.join()
                if decoder.process.exitcode == -signal.SIGXCPU:
                    raise DecodeTimeoutError(f"decoding needs more than {self.cpu_limit_s} s of CPU time") from None
                raise DecoderCrashError(f"the decoder process exited with {decoder.process.exitcode}") from None
            finished = True
        finally:
            if finished:
                self._idle.put_nowait(decoder)
            else:  # ended by its limit, or still working for a caller that has gone: stop it, start another
                self._all.discard(decoder)
                decoder.kill()
                self._add()
        if not ok:
            raise value
        return value

    @property
    def pids(self) -> list[int]:
        return sorted(decoder.process.pid for decoder in self._all)

    @property
    def busy(self) -> int:
        """Decoders at work now."""
        return len(self._all) - self._idle.qsize()

    def stop(self) -> None:
        for decoder in self._all:
            decoder.kill()
        self._all.clear()


async def _readable(connection: Connection) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(connection.fileno(), lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_reader(connection.fileno())


def _serve(connection: Connection) -> None:
    """A decoder process: jobs in, (ok, Decoded or the exception) out, until its pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the server decides
    os.nice(10)  # a costly upload must not take the CPU from the event loops that answer everyone else
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    while True:
        # No limit while idle and while the next job arrives: the last job's would still run, and a process
        # near its end would be killed as a 10 MB upload came down the pipe, charged to the wrong image.
        resource.setrlimit(resource.RLIMIT_CPU, (hard, hard))
        try:
            job, cpu_limit_s = connection.recv()
        except EOFError:
            return
        usage = resource.getrusage(resource.RUSAGE_SELF)
        limit = math.ceil(usage.ru_utime + usage.ru_stime) + cpu_limit_s
        resource.setrlimit(resource.RLIMIT_CPU, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
        try:
            reply = (True, decode(job))
        except Exception as error:  # noqa: BLE001 - every failure goes back to the caller, typed
            reply = (False, error)
        connection.send(reply)
