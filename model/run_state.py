"""The resumable state of a training run, split into files of at most MAX_FILE_BYTES each.

A GPU may be at hand only in windows whose results come back as files of limited size. So the state
(weights, AdamW's moments, the EMA) is written as numbered shards beside one small index, ``state.pt``,
that holds everything else and says which shard holds each tensor. Shards are named after their epoch and
the index is replaced last, atomically: a run killed while saving keeps the previous epoch's state whole.
"""

from __future__ import annotations

import io
import itertools
import pickle
from pathlib import Path
from typing import Any

import torch

from model.files import written

MAX_FILE_BYTES = 15 * 2**20
FILE_OVERHEAD, TENSOR_OVERHEAD = 4096, 256  # what torch.save's zip adds to the bytes of the tensors, at most
SHARD_KEY = "__shard__"  # marks where a tensor stood in the index: {"__shard__": file name, "key": key}


def shard_paths(index: Path) -> list[Path]:
    """Every shard file written beside `index`, of any epoch."""
    return sorted(index.parent.glob(f"{index.stem}-e*.pt"))


def save_state(state: dict, index: Path, tag: str) -> None:
    """Write `state` as `index` plus shards named `<index stem>-<tag>-<n>.pt`, then drop other tags' shards."""
    shards: list[dict[str, torch.Tensor]] = []
    sizes: list[int] = []
    keys = itertools.count()

    def stash(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            size = value.numel() * value.element_size() + TENSOR_OVERHEAD
            if not shards or sizes[-1] + size > MAX_FILE_BYTES - FILE_OVERHEAD:
                shards.append({})
                sizes.append(0)
            key = str(next(keys))
            shards[-1][key] = value
            sizes[-1] += size
            return {SHARD_KEY: f"{index.stem}-{tag}-{len(shards)}.pt", "key": key}
        if isinstance(value, dict):
            return {name: stash(item) for name, item in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(stash(item) for item in value)
        return value

    skeleton = stash(state)
    for number, shard in enumerate(shards, start=1):
        _save_atomically(shard, index.with_name(f"{index.stem}-{tag}-{number}.pt"))
    _save_atomically(skeleton, index)
    written = {f"{index.stem}-{tag}-{number}.pt" for number in range(1, len(shards) + 1)}
    for path in shard_paths(index):
        if path.name not in written:
            path.unlink()


class StateError(ValueError):
    """A state that cannot be loaded, in a sentence: a shard not copied along, or a file that is none of ours."""


def load_state(index: Path, device: torch.device) -> dict:
    """The state that save_state wrote, its tensors on `device`; an unsharded state.pt loads as it is."""
    skeleton = _loaded(index, device)
    shards: dict[str, dict[str, torch.Tensor]] = {}

    def restore(value: Any) -> Any:
        if isinstance(value, dict) and SHARD_KEY in value:
            name = value[SHARD_KEY]
            if name not in shards:
                path = index.with_name(name)
                if not path.exists():
                    raise StateError(f"{index} needs {path}, which is missing: copy every {index.stem}-* file")
                shards[name] = _loaded(path, device)
            return shards[name][value["key"]]
        if isinstance(value, dict):
            return {name: restore(item) for name, item in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(restore(item) for item in value)
        return value

    return restore(skeleton)


def state_index(index: Path) -> dict:
    """The index alone, on the CPU: what load_state reads first, without the tensors in the shards beside it."""
    return _loaded(index, torch.device("cpu"))


def _loaded(path: Path, device: torch.device) -> Any:
    """One file of a state. One that torch cannot read was its traceback, whose weights_only message went on to
    advise loading the file with weights_only=False, which runs whatever code it holds."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as error:  # OSError: a zip cut short, too
        reason = f" ({error.strerror})" if isinstance(error, OSError) and error.strerror else ""
        raise StateError(f"{path}: not a file of the state that vit-train writes, or one cut short{reason}") from error


def _save_atomically(value: Any, path: Path) -> None:
    """torch.save into memory (a shard is at most MAX_FILE_BYTES), then one write, so that a full disk is the
    OSError that it is: torch.save to a file raised "[enforce fail at inline_container.cc:672] . unexpected pos 576
    vs 534"."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    with written(path) as temporary:
        temporary.write_bytes(buffer.getbuffer())
