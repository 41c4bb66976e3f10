"""The GPUs that torch will use on this machine, asked without importing torch (seconds, and memory that
vit-serve's supervisor never needs): the NVIDIA driver's count and CUDA version, through libcuda, and the CUDA
version that the installed torch is built for, from its torch/version.py."""

from __future__ import annotations

import ctypes
import importlib.util
import re
from functools import cache
from pathlib import Path


@cache
def _driver() -> ctypes.CDLL | None:
    """The NVIDIA driver's library, loaded once; None where there is no driver."""
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None


@cache
def nvidia_gpu_count() -> int:
    """How many GPUs the NVIDIA driver reports (CUDA_VISIBLE_DEVICES applies): vit-serve decides the device, the
    worker count and the model process from it."""
    if (driver := _driver()) is None:
        return 0
    count = ctypes.c_int(0)
    return count.value if driver.cuInit(0) == 0 and driver.cuDeviceGetCount(ctypes.byref(count)) == 0 else 0


@cache
def nvidia_driver_cuda() -> tuple[int, int] | None:
    """The newest CUDA version that the NVIDIA driver runs, (12, 4) for a 550 driver; None without a driver."""
    version = ctypes.c_int(0)
    if (driver := _driver()) is None or driver.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return None
    return version.value // 1000, version.value % 1000 // 10


@cache
def torch_build() -> tuple[str, tuple[int, int] | None] | None:
    """The installed torch's version and the CUDA version it is built for (None for a CPU build); None where
    its torch/version.py cannot be read."""
    spec = importlib.util.find_spec("torch")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    try:
        text = (Path(spec.submodule_search_locations[0]) / "version.py").read_text()
    except (OSError, ValueError):
        return None
    version = re.search(r"^__version__ = '([^']+)'$", text, re.MULTILINE)  # '2.14.1+cu130'
    cuda = re.search(r"^cuda(?:: [^=]*)? = (None|'(\d+)\.(\d+)')$", text, re.MULTILINE)  # cuda: Optional[str] = '13.0'
    if version is None or cuda is None:
        return None
    return version[1], None if cuda[1] == "None" else (int(cuda[2]), int(cuda[3]))


def unusable_gpu() -> str | None:
    """Why the installed torch cannot use the GPUs that the driver reports, or None where it can (or where that
    cannot be told). torch then sees no GPU, and said only that."""
    build, driver = torch_build(), nvidia_driver_cuda()
    if build is None:
        return None
    version, cuda = build
    if cuda is None:
        return f"torch {version} is built without CUDA: install a CUDA build of torch"
    if driver is not None and driver[0] < cuda[0]:  # within one major version, CUDA runs on an older driver
        return (
            f"torch {version} is built for CUDA {cuda[0]}.{cuda[1]}, and this NVIDIA driver runs CUDA up to "
            f"{driver[0]}.{driver[1]}: update the driver, or install a torch built for CUDA {driver[0]}"
        )
    return None
