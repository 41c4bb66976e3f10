"""/predict's batch replayed from CUDA graphs, one per batch size (VIT_CUDA_GRAPHS).

A small model at a small batch spends its time launching kernels, not running them: a graph
launches the whole batch at once. What is captured is everything from the uint8 pixels on the
device to the class probabilities (normalisation, the forward pass and the softmax), so that a
batch costs the copies in and out and one launch. Each batch is padded to the next captured size;
a batch larger than all of them, or of another dtype, runs the function as it is.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

WARM_UP_RUNS = 3  # before capture, on a side stream, as torch.cuda.graphs asks


class CudaGraphForward:
    def __init__(
        self,
        function: Callable[[torch.Tensor], torch.Tensor],
        input_shape: tuple[int, ...],
        dtype: torch.dtype,
        sizes: list[int],
        device: torch.device,
    ) -> None:
        """Capture `function` for a batch of each size in `sizes` of `input_shape` and `dtype` on `device`."""
        self.function = function
        self.dtype = dtype
        self.sizes = sorted(set(sizes))
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        pool = None  # one memory pool for every graph: they never run at the same time
        with torch.cuda.device(device):  # a capture runs on the current device's streams, cuda:1's for cuda:1
            for size in self.sizes:
                static_input = torch.zeros(size, *input_shape, dtype=dtype, device=device)
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side), torch.inference_mode():
                    for _ in range(WARM_UP_RUNS):
                        function(static_input)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool), torch.inference_mode():
                    static_output = function(static_input)
                pool = graph.pool()
                self.graphs[size] = (graph, static_input, static_output)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        count = batch.shape[0]
        size = next((size for size in self.sizes if size >= count), None)
        if size is None or batch.dtype != self.dtype:
            return self.function(batch)
        graph, static_input, static_output = self.graphs[size]
        static_input[:count].copy_(batch)
        graph.replay()
        return static_output[:count].clone()  # the next replay overwrites static_output
