"""Device choice and mixed precision, shared by training, evaluation and serving."""

from __future__ import annotations

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


def autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA; plain fp32 elsewhere (bf16 on a CPU is slower, not faster)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
