"""Ctrl-C and SIGTERM in a training run: raised where the run is, or held back while an epoch is saved."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Terminated(BaseException):  # as KeyboardInterrupt is: no `except Exception` on the way may keep it
    """SIGTERM (docker stop, a scheduler taking the machine back, timeout), raised where the run is, as Ctrl-C's
    KeyboardInterrupt is: the process used to end without a word about what it had saved."""


def raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


@contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait for the block to end, and then stop the run as they would have.

    Around an epoch's save: its log line, checkpoint and state are written whole and together, and the
    line that a stop prints names the epoch they hold. A signal that came as the state was written
    used to stop the run before it was counted, and the line named the epoch before the one on disk."""
    if threading.current_thread() is not threading.main_thread():  # where Python lets no handler be set
        yield
        return
    caught: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    before = {signum: signal.signal(signum, lambda signum, frame: caught.append(signum)) for signum in held}
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
    if caught:
        handler = before[caught[0]]
        if callable(handler):
            handler(caught[0], None)  # KeyboardInterrupt, or Terminated
        elif handler == signal.SIG_DFL:
            os.kill(os.getpid(), caught[0])
