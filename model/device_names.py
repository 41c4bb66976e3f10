"""The device names that the commands and the server take, checked without torch, so that vit-serve's
supervisor, which never imports it, refuses the same names as the commands do."""

from __future__ import annotations

import re

DEVICE_NAMES = "auto, cpu, cuda or cuda:N"


def is_device_name(name: str) -> bool:
    """Whether this code runs on `name`. torch takes other names too (mps, xpu, meta), where it never ran:
    vit-predict --device mps said the shipped weights do not match their config, and xpu ended in a traceback."""
    return re.fullmatch(r"auto|cpu|cuda(:\d+)?", name) is not None
