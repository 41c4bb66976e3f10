"""A LocalBackend driven as a server process drives it: one input at a time, through its batchers."""

import asyncio
import threading

import numpy as np

from app.backend import LocalBackend
from app.config import Settings
from app.served import ExplainItem, Explanation, MapRequest


def answers_to_a_lone_input(settings: Settings, pixels: np.ndarray) -> tuple[list[float], Explanation, str]:
    """/predict's probabilities and /attention's gradient map for one input sent alone, and the name of the
    thread that ran the predict batch."""

    async def answers() -> tuple[list[float], Explanation, str]:
        backend = await LocalBackend.start(settings)
        batcher = backend.batchers["predict"]
        run_batch, ran_on = batcher.run_batch, []
        batcher.run_batch = lambda items: ran_on.append(threading.current_thread().name) or run_batch(items)
        try:
            probabilities = await backend.submit("predict", pixels, 10)
            explanation = await backend.submit("attention", ExplainItem(pixels, MapRequest(method="gradient")), 10)
            return probabilities, explanation, ran_on[0]
        finally:
            await backend.stop()

    return asyncio.run(answers())
