"""A training step replayed from one CUDA graph: forward, backward and AdamW's update (vit-train --cuda-graphs).

A small ViT's step is a few hundred small kernels. On a GPU each is launched by the host, and the step
costs what the launches cost, almost whatever the batch. Captured once, the whole step is one launch.
This is torch's whole-network capture (torch/cuda/graphs.py, "CUDA Graphs" in torch's CUDA notes):
eager warm-up steps on a side stream, then one capture of the step on static inputs, and from then
on each batch is copied into those inputs and the graph replayed.

What changes from step to step must reach the graph through memory, not through the host:
- the batch: augmentation and MixUp/CutMix run before the step, outside the graph (their parameters
  are drawn on the host), and their result is copied into the static inputs;
- the learning rate: AdamW reads it from a device tensor (`capturable=True`), filled before each replay;
- stochastic depth: a replay reads the CUDA generator's seed and offset at that moment, so reseeding
  it still works and every replay draws new numbers.
Autocast's weight cache must be off inside the step: it is emptied when the context exits, and the
graph would go on reading the freed casts.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

WARM_UP_STEPS = 3  # before capture: kernels loaded, AdamW's state made, torch.compile's code generated

Step = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]


class GraphedStep:
    """Runs `step(inputs, targets)` eagerly WARM_UP_STEPS times, then captures it and replays it.

    Every call is one real training step, the warm-up ones and the captured one included. The outputs
    of a replayed step are the graph's own tensors, overwritten by the next call: read them first.
    Each call's batch must have the shapes and dtypes of the first captured one.
    """

    def __init__(self, step: Step, warm_up_steps: int = WARM_UP_STEPS) -> None:
        self.step = step
        self.warm_up_left = warm_up_steps
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_inputs: tuple[torch.Tensor, ...] = ()
        self.static_outputs: tuple[torch.Tensor, ...] = ()

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.graph is None:
            if self.warm_up_left:
                self.warm_up_left -= 1
                return self._on_side_stream(inputs, targets)
            self._capture(inputs, targets)
        else:
            for static, value in zip(self.static_inputs, (inputs, targets), strict=True):
                static.copy_(value)
        self.graph.replay()
        return self.static_outputs

    def _on_side_stream(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """An eager step on a side stream, as capture asks of the work it follows."""
        current = torch.cuda.current_stream(inputs.device)
        side = torch.cuda.Stream(inputs.device)
        side.wait_stream(current)
        with torch.cuda.stream(side), warnings.catch_warnings():
            # A capturable optimizer warns when it steps outside a capture; these steps precede one.
            warnings.filterwarnings("ignore", "This instance was constructed with capturable=True", UserWarning)
            outputs = self.step(inputs, targets)
        current.wait_stream(side)
        return outputs

    def _capture(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Record the step on copies of this batch; recording runs nothing, so the caller replays it once."""
        self.static_inputs = (inputs.clone(), targets.clone())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.static_outputs = self.step(*self.static_inputs)
        self.graph = graph
