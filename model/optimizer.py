"""AdamW, with no weight decay on tokens, norms and biases; its state resumed into another run; and the
learning-rate schedule.
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

from model.vit import no_weight_decay_names


def build_optimizer(
    model: nn.Module, args: argparse.Namespace, device: torch.device, lr: float | torch.Tensor
) -> torch.optim.AdamW:
    """AdamW, fused on CUDA; `lr` is a device tensor where the step is replayed from a CUDA graph."""
    skip = no_weight_decay_names(model)
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if n not in skip], "weight_decay": args.weight_decay},
        {"params": [p for n, p in named if n in skip], "weight_decay": 0.0},
    ]
    # Each group takes the defaults as they are: a tensor `lr` is the one object that every group reads.
    return torch.optim.AdamW(groups, lr=lr, fused=device.type == "cuda", capturable=args.cuda_graphs)


# AdamW's settings that belong to the run, not to the state: the device and --cuda-graphs may have changed.
RUN_SETTINGS = ("fused", "capturable", "foreach")


def load_optimizer_state(optimizer: torch.optim.AdamW, saved: dict, lr: float | torch.Tensor) -> None:
    """Resume `optimizer` from `saved`, keeping this run's settings whichever run saved the state.

    load_state_dict takes each group's settings from the saved state, and puts each step counter where
    they say: on the device where fused or capturable, else on the CPU. So a state saved on a CPU and
    resumed on CUDA would step unfused, and a graphed step would find its counters on the host. This
    run's settings go into the saved groups first; its `lr` is bound after the load, which would copy
    the one tensor that every group of a graphed run reads.
    """
    own = [{key: group[key] for key in RUN_SETTINGS} for group in optimizer.param_groups]
    groups = [group | settings for group, settings in zip(saved["param_groups"], own, strict=True)]
    optimizer.load_state_dict(saved | {"param_groups": groups})
    for group in optimizer.param_groups:
        group["lr"] = lr


def learning_rate(step: int, total_steps: int, warmup_steps: int, peak: float, floor: float) -> float:
    """Linear warmup to `peak`, then a cosine down to `floor`."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(progress, 1.0)))
