"""Decoder processes: a CPU-time limit that really stops the work, a caller that gives up stops it too,
and the pool decodes on afterwards."""

import asyncio
import os
import signal
import time

import numpy as np
import pytest

from app.decoder_pool import DecoderCrashError, DecoderPool, DecodeTimeoutError
from app.decoding import DecodeJob
from model.images import ImageTooLargeError
from tests.support.images import image_bytes, jpeg_with_repeated_scans
from tests.support.models import FASHION_PREPROCESS
from tests.support.server import running

SLOW_JPEG = jpeg_with_repeated_scans(1_100_000)  # several CPU-seconds to decode
GOOD_PNG = image_bytes(np.full((28, 28), 200, dtype=np.uint8))


def job(data: bytes, display_pixels: int = 0) -> DecodeJob:
    return DecodeJob(data, FASHION_PREPROCESS, 25_000_000, 100.0, display_pixels)


def with_pool(scenario, size: int = 1, cpu_limit_s: float = 1.0):
    async def main():
        pool = DecoderPool(size, cpu_limit_s)
        try:
            return await scenario(pool)
        finally:
            pool.stop()

    return asyncio.run(main())


def test_an_image_past_its_cpu_time_is_stopped_and_the_next_one_decodes():
    async def scenario(pool):
        [before] = pool.pids
        with pytest.raises(DecodeTimeoutError, match="more than 1 s of CPU time"):
            await pool.decode(job(SLOW_JPEG))
        decoded = await pool.decode(job(GOOD_PNG))
        return before, pool.pids, decoded

    before, after, decoded = with_pool(scenario)
    assert not running(before) and after != [before]  # the kernel ended it; a new process took its place
    assert decoded.pixels.shape == (1, 28, 28) and (decoded.pixels == 200).all()


def test_a_decode_whose_caller_gives_up_is_killed_at_once():
    async def scenario(pool):
        [worker] = pool.pids
        decoding = asyncio.create_task(pool.decode(job(SLOW_JPEG)))
        await asyncio.sleep(0.3)
        decoding.cancel()
        await asyncio.gather(decoding, return_exceptions=True)
        stopped = not running(worker)
        return stopped, await pool.decode(job(GOOD_PNG))

    stopped, decoded = with_pool(scenario, cpu_limit_s=30)
    assert stopped and decoded.size == (28, 28)


def test_images_decode_at_once_in_as_many_processes_and_errors_come_back_typed():
    async def scenario(pool):
        decodings = [asyncio.create_task(pool.decode(job(SLOW_JPEG))) for _ in range(2)]
        await asyncio.sleep(0.3)
        busy = pool.busy
        for decoding in decodings:
            decoding.cancel()
        await asyncio.gather(*decodings, return_exceptions=True)
        with pytest.raises(ImageTooLargeError):
            await pool.decode(DecodeJob(GOOD_PNG, FASHION_PREPROCESS, 100, 100.0))
        return busy

    assert with_pool(scenario, size=2, cpu_limit_s=30) == 2


def test_a_picture_kept_for_rendering_is_shrunk_to_the_limit():
    large = image_bytes(np.zeros((1200, 1600, 3), dtype=np.uint8))
    decoded = with_pool(lambda pool: pool.decode(job(large, display_pixels=120_000)))
    assert decoded.size == (1600, 1200) and decoded.display.mode == "RGB"
    width, height = decoded.display.size
    assert width * height <= 120_000 and abs(width / height - 4 / 3) < 0.01


def soft_cpu_limit(pid: int) -> str:
    """The soft RLIMIT_CPU of a process, as /proc/PID/limits writes it ('unlimited', or seconds)."""
    with open(f"/proc/{pid}/limits") as limits:
        [line] = [line for line in limits if line.startswith("Max cpu time")]
    return line.split()[3]


def test_an_idle_decoder_has_no_cpu_limit_so_receiving_the_next_image_is_not_charged_to_the_last_ones():
    async def scenario(pool):
        [worker] = pool.pids
        await pool.decode(job(GOOD_PNG))
        deadline = time.monotonic() + 5  # the reply is sent before the process is back waiting for a job
        while soft_cpu_limit(worker) != "unlimited" and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return soft_cpu_limit(worker)

    # A limit left from the last image used to stay in force while the next, 10 MB say, came down the pipe:
    # a decoder near the end of it was killed then, and the next image was answered as too costly or corrupt.
    assert with_pool(scenario) == "unlimited"


def test_a_decoder_that_died_while_idle_is_a_crash_not_a_corrupt_image_and_is_replaced():
    async def scenario(pool):
        [worker] = pool.pids
        os.kill(worker, signal.SIGKILL)  # as the kernel's OOM killer would
        while running(worker):
            await asyncio.sleep(0.05)
        with pytest.raises(DecoderCrashError):
            await pool.decode(job(GOOD_PNG * 20_000))  # larger than a pipe's buffer: the send itself fails
        return worker, pool.pids, await pool.decode(job(GOOD_PNG))

    worker, after, decoded = with_pool(scenario)
    assert after != [worker] and decoded.size == (28, 28)
