"""The /predict forward pass replayed from CUDA graphs, one per batch size (VIT_CUDA_GRAPHS).

A small model at a small batch spends its time launching kernels, not running them: a graph
launches the whole forward pass at once. Each batch is padded to the next captured size; a batch
larger than all of them runs the model as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn

WARM_UP_RUNS = 3  # before capture, on a side stream, as torch.cuda.graphs asks


class CudaGraphForward:
    def __init__(
        self,
        model: nn.Module,
        input_shape: tuple[int, ...],
        sizes: list[int],
        precision: Callable[[], AbstractContextManager],
    ) -> None:
        """Capture `model` for each batch size in `sizes`, under `precision()` (the engine's autocast)."""
        self.model = model
        self.sizes = sorted(set(sizes))
        device = next(model.parameters()).device
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        pool = None  # one memory pool for every graph: they never run at the same time
        for size in self.sizes:
            static_input = torch.zeros(size, *input_shape, device=device)
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side), torch.inference_mode(), precision():
                for _ in range(WARM_UP_RUNS):
                    model(static_input)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool), torch.inference_mode(), precision():
                static_output = model(static_input)
            pool = graph.pool()
            self.graphs[size] = (graph, static_input, static_output)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        count = batch.shape[0]
        size = next((size for size in self.sizes if size >= count), None)
        if size is None:
            return self.model(batch)
        graph, static_input, static_output = self.graphs[size]
        static_input[:count].copy_(batch)
        graph.replay()
        return static_output[:count].clone()  # the next replay overwrites static_output
