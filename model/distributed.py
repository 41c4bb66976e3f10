"""Where a process sits in a torchrun job, and the collectives that training takes: decoding an image
folder once per job, agreeing on a choice, and summing the epoch's figures.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from model.data import decode_files
from model.device import resolve_device
from model.images import PreprocessConfig

GATHERED_BYTES = 1 << 28  # of decoded images that Distributed.decode gathers at once, from all processes: 256 MiB


@dataclass(frozen=True)
class Distributed:
    """Where this process sits in a torchrun job; a plain run is rank 0 of 1, in no process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    in_group: bool = False  # launched by torchrun: DDP over NCCL or gloo, even as a job of one process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, device_name: str) -> Distributed:
        """Read torchrun's variables and join the process group (NCCL on GPUs, gloo on CPUs)."""
        if "LOCAL_RANK" not in os.environ:  # not launched by torchrun
            return cls()
        local_rank = int(os.environ["LOCAL_RANK"])
        use_cuda = resolve_device(device_name).type == "cuda"
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, in_group=True)

    def device(self, name: str) -> torch.device:
        device = resolve_device(name)
        if device.type == "cuda" and self.in_group:
            return torch.device("cuda", self.local_rank)
        return device

    def decode(
        self, paths: list[Path], preprocess: PreprocessConfig, description: str
    ) -> tuple[torch.Tensor, dict[int, str]]:
        """decode_files, a share of the files in each process, gathered whole in every one: each process
        decoded the whole folder, and a job of eight did eight times the work before its first step.
        Every process gets every file's error too, so that all stop alike, not one while the others wait."""
        if not self.in_group or not paths:
            return decode_files(paths, preprocess, description)
        share = math.ceil(len(paths) / self.world_size)  # a block of files in order: gathered, they are in order
        mine, errors = decode_files(paths[self.rank * share : (self.rank + 1) * share], preprocess, description)
        image = mine.shape[1:]
        block = torch.zeros((share, *image), dtype=mine.dtype)  # the last process's may be short
        block[: len(mine)] = mine
        del mine
        # The blocks are gathered a few rows of each at a time, through the GPU with NCCL: gathered whole,
        # the images had to fit in a GPU's memory before training could keep them in host memory.
        device = self.collective_device
        gathered = torch.empty((self.world_size, share, *image), dtype=block.dtype)
        rows = max(1, GATHERED_BYTES // (self.world_size * block[0].nbytes))
        for start in range(0, share, rows):
            part = block[start : start + rows].to(device)
            parts = torch.empty((self.world_size, *part.shape), dtype=part.dtype, device=device)
            dist.all_gather(list(parts), part)
            gathered[:, start : start + rows] = parts.cpu()
        everyone: list[dict[int, str]] = [{} for _ in range(self.world_size)]
        dist.all_gather_object(everyone, {self.rank * share + index: error for index, error in errors.items()})
        every_error = {index: error for part in everyone for index, error in part.items()}  # each in file order
        return gathered.flatten(0, 1)[: len(paths)], every_error

    @property
    def collective_device(self) -> torch.device:
        """Where this process's tensors for a collective live: NCCL takes CUDA tensors only, gloo CPU ones."""
        return torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")

    def all_agree(self, holds: bool) -> bool:
        """Whether `holds` is true in every process: a choice between collectives that one process made alone
        would leave the others waiting in one it skipped."""
        if not self.in_group:
            return holds
        votes = torch.tensor(float(holds), device=self.collective_device)
        dist.all_reduce(votes, op=dist.ReduceOp.MIN)
        return bool(votes.item())

    def sum(self, *values: torch.Tensor) -> list[float]:
        """Sum scalars over all processes."""
        stacked = torch.stack([value.float() for value in values])
        if self.in_group:
            dist.all_reduce(stacked)
        return stacked.tolist()
