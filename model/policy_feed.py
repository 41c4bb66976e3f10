"""torchvision's TrivialAugmentWide or RandAugment, run by CPU worker processes an epoch ahead of training.

On a GPU, torchvision's geometric operations copy their parameters from the host at every call, and each
copy waits for all the work queued before it: run on the device, a policy would stall every step. So
workers apply it on the CPU to the next epoch's images, in the epoch's order, while the device trains on
this one; the epoch's images then reach the device in one copy.

Given a batch, a torchvision policy draws one operation and magnitude for all of it; here each group of
GROUP images draws its own. Every task seeds its own draws, so an epoch's images depend only on the
seed and the order, not on which worker ran what: a resumed run repeats them.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor

import torch

from model.data import torchvision_module

POLICIES = ("none", "trivialaugment", "randaugment")
GROUP = 32  # images per draw of the policy
TASK = 64 * GROUP  # images per worker task

_policy = None  # in a worker: the policy
_images: torch.Tensor | None = None  # in a worker: the whole training set, (N, C, H, W) uint8


def make_policy(name: str):
    v2 = torchvision_module("transforms.v2", f"--augment {name}")
    return {"trivialaugment": v2.TrivialAugmentWide, "randaugment": v2.RandAugment}[name]()


def apply_policy(policy, images: torch.Tensor, seed: int) -> torch.Tensor:
    """(B, C, H, W) uint8 through `policy`, one draw per GROUP images, the draws seeded by `seed`."""
    torch.manual_seed(seed)
    return torch.cat([policy(group) for group in images.split(GROUP)])


def _start_worker(name: str, images: torch.Tensor) -> None:
    global _policy, _images
    torch.set_num_threads(1)
    _policy, _images = make_policy(name), images


def _augment(indices: torch.Tensor, seed: int) -> torch.Tensor:
    return apply_policy(_policy, _images[indices], seed)


class PolicyFeed:
    """Worker processes that turn an epoch's image indices into its policy-augmented images."""

    def __init__(self, name: str, images: torch.Tensor, workers: int) -> None:
        make_policy(name)  # fail here, not in a worker, without torchvision
        self.name, self.images, self.workers = name, images, workers
        self.pool: ProcessPoolExecutor | None = None  # started at the first epoch
        self.pending: dict[int, tuple[int, list[Future]]] = {}  # by epoch: its image count, its tasks in order

    def submit(self, epoch: int, indices: torch.Tensor, seed: int) -> None:
        """Start on `epoch`: the images at `indices` (CPU, int64), in that order."""
        if self.pool is None:
            context = multiprocessing.get_context("spawn")  # no fork of a process that holds CUDA or threads
            self.pool = ProcessPoolExecutor(
                self.workers, mp_context=context, initializer=_start_worker, initargs=(self.name, self.images)
            )
        tasks = indices.split(TASK)
        futures = [self.pool.submit(_augment, task, seed + number) for number, task in enumerate(tasks)]
        self.pending[epoch] = (len(indices), futures)

    def result(self, epoch: int, pinned: bool = False) -> torch.Tensor:
        """The epoch's augmented images, (len(indices), C, H, W) uint8, in pinned memory if asked: for one
        copy to a GPU that does not make the host wait. Training that keeps them in host memory pins a
        batch at a time instead: page-locked, the epoch's images would be memory the system cannot page.

        Each task's images are copied into their place and let go: concatenated and then pinned, the
        epoch's images were held three times at the peak."""
        count, tasks = self.pending.pop(epoch)
        shape = (count, *self.images.shape[1:])
        images, start = torch.empty(shape, dtype=self.images.dtype, pin_memory=pinned), 0
        while tasks:
            chunk = tasks.pop(0).result()
            images[start : start + len(chunk)] = chunk
            start += len(chunk)
        return images

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        self.pending.clear()
