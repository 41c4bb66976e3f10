"""Device choice and mixed precision, shared by training, evaluation and serving."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from model.device_names import DEVICE_NAMES, is_device_name


def resolve_device(name: str) -> torch.device:
    """'auto' means CUDA when it is available, else the CPU; cpu, cuda and cuda:N are passed to torch."""
    if not is_device_name(name):
        raise RuntimeError(f"{name!r} is not a device: {DEVICE_NAMES}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        # Fail loudly: silently falling back would serve a GPU deployment from the CPU.
        raise RuntimeError(f"device {name!r} was asked for, but torch {torch.__version__} sees no CUDA device")
    return device


# Of a GPU's free memory, the share that training may fill with its images; the rest is for the model's steps.
DEVICE_DATA_SHARE = 0.5


def fits_on_device(nbytes: int, device: torch.device) -> bool:
    """Whether `nbytes` of training images should live on `device`, where each batch is gathered without a copy
    from the host. On the CPU they are in its memory already; on a GPU, up to DEVICE_DATA_SHARE of its free memory."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # torch's cache: free to torch
    return nbytes <= DEVICE_DATA_SHARE * free


Precision = Literal["fp32", "bf16", "fp16"]
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: Precision | None = None, cache: bool = True) -> torch.autocast:
    """Mixed precision in `precision` ("fp32" turns it off) on either device.

    Without one, training's choice: bf16 on CUDA, fp32 on the CPU. `cache=False` casts weights afresh at
    each use instead of once per context, as a CUDA graph needs.
    """
    if precision is None:
        precision = "bf16" if device.type == "cuda" else "fp32"
    dtype = AUTOCAST_DTYPES.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None, cache_enabled=cache)


def cast_for_autocast(model: nn.Module, precision: Precision) -> None:
    """For inference: the weights that autocast would cast at every pass, cast once, in place.

    Autocast runs linear layers and convolutions in its dtype, and casts their fp32 weights afresh at each
    pass when they need no gradient. Cast once here, they are the same numbers, with no cast per weight per
    pass; norms and embeddings stay fp32, as autocast leaves them. Training keeps fp32 weights to update.
    """
    dtype = AUTOCAST_DTYPES.get(precision)
    if dtype is not None:
        for module in model.modules():
            if isinstance(module, nn.Linear | nn.Conv2d):
                module.to(dtype)


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX); without them oneDNN emulates bf16, slowly."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
