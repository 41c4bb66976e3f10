"""Graceful drain on SIGTERM: readiness turns 503 at once, accepted requests finish, then uvicorn exits.

uvicorn's own SIGTERM handler stops accepting connections at once. Ours runs first: it marks the
service not ready (so /health/ready and new inference requests answer 503 while a load balancer
notices), waits for the requests in flight for half of VIT_SHUTDOWN_GRACE_S, and then hands the
signal to uvicorn, whose shutdown cuts the connections still open after the other half (app/cli.py).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from types import FrameType

from app.service import ModelService

logger = logging.getLogger("app")
POLL_S = 0.02


class SigtermDrain:
    def __init__(self, service: ModelService, grace_s: float) -> None:
        self.service = service
        self.grace_s = grace_s
        self.loop = asyncio.get_running_loop()
        self.previous: Callable | int | None = None
        self.task: asyncio.Task | None = None

    def install(self) -> None:
        self.previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def uninstall(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if not self.service.ready:  # a second SIGTERM: stop draining, exit now
            self._hand_over(signum, frame)
            return
        self.service.ready = False
        logger.info("SIGTERM: draining %d requests in flight", self.service.in_flight)
        self.loop.call_soon_threadsafe(self._start_drain, signum)

    def _start_drain(self, signum: int) -> None:
        self.task = self.loop.create_task(self._drain(signum))

    async def _drain(self, signum: int) -> None:
        deadline = time.monotonic() + self.grace_s / 2  # the other half is uvicorn's own shutdown
        while self.service.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
        self._hand_over(signum, None)

    def _hand_over(self, signum: int, frame: FrameType | None) -> None:
        if callable(self.previous):
            self.previous(signum, frame)
