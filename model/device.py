"""Device choice and mixed precision, shared by training, evaluation and serving."""

from __future__ import annotations

from typing import Literal

import torch


def resolve_device(name: str) -> torch.device:
    """'auto' means CUDA when it is available, else the CPU; anything else is passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        # Fail loudly: silently falling back would serve a GPU deployment from the CPU.
        raise RuntimeError(f"device {name!r} was asked for, but torch {torch.__version__} sees no CUDA device")
    return device


Precision = Literal["fp32", "bf16", "fp16"]
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: Precision = "bf16", cache: bool = True) -> torch.autocast:
    """Mixed precision on CUDA ("fp32" turns it off); plain fp32 elsewhere (bf16 on a CPU is slower, not faster).

    `cache=False` casts weights afresh at each use instead of once per context, as a CUDA graph needs."""
    dtype = AUTOCAST_DTYPES.get(precision)
    enabled = dtype is not None and device.type == "cuda"
    return torch.autocast(device.type, dtype=dtype, enabled=enabled, cache_enabled=cache)
