"""The model as the service uses it: loaded once, and run on one inference thread.

Every torch computation of the service (loading, warm-up, forward passes, attention maps) runs on
that single thread, but for a lone input on an idle thread where VIT_INLINE_LONE_BATCHES has it run on
the event loop (app.batcher.InferenceThread). OpenMP gives each thread that runs parallel torch code its
own team of worker threads; a second team would fight the first for the same cores (measured: README,
How serving works), so by default that happens only where torch runs on one thread, without a team.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import numpy as np
import torch

from app.config import Settings, SettingsError, conflicts
from app.cuda_graphs import CudaGraphForward
from app.served import ExplainItem, Explanation, MapRequest, ServedModel
from model.attention import attention_gradients, attention_map, raw_attention
from model.checkpoint import Checkpoint, load_checkpoint
from model.cpu import cpu_quota
from model.device import autocast, cast_for_autocast, cpu_computes_bf16, resolve_device
from model.preprocess import normalize
from model.vit import count_parameters

logger = logging.getLogger("app.inference")
# What a checkpoint's training record says about the machine it was trained on, not about the model.
LOCAL_DETAILS = frozenset({"command", "path", "data_dir", "out_dir", "init_from"})


def without_local_details(training: dict) -> dict:
    """The training record without command lines and local paths, at any depth (an init_from's record too).

    An init_from that is a record, not a path, stays with its own path left out.
    """
    return {
        key: without_local_details(value) if isinstance(value, dict) else value
        for key, value in training.items()
        if key not in LOCAL_DETAILS or isinstance(value, dict)
    }


class InferenceEngine:
    """Build it on the inference thread. Inputs arrive as uint8 pixels and are normalised as one batch."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # This thread's OpenMP team; worker processes share the CPU quota. workers is 0 only under a
        # plain `uvicorn` without WEB_CONCURRENCY, which runs one process (vit-serve exports its count).
        self.torch_threads = settings.torch_threads or max(1, cpu_quota() // (settings.workers or 1))
        torch.set_num_threads(self.torch_threads)
        try:
            self.device = resolve_device(settings.device)
        except RuntimeError as error:
            raise SettingsError(f"VIT_DEVICE={settings.device}: {error}") from None
        if problems := conflicts(settings, on_cuda=self.device.type == "cuda"):  # before any weight is loaded
            raise SettingsError("; ".join(problems))
        self.checkpoint: Checkpoint = load_checkpoint(settings.checkpoint, self.device)
        self.model.requires_grad_(False)  # serving never needs weight gradients
        self.forward = self._build_forward()
        self.warm_up()

    def inline_lone_batches(self) -> bool:
        """VIT_INLINE_LONE_BATCHES, or unset: on the CPU with one torch thread. There it was measured faster at
        every load; with more, the event loop's torch calls get an OpenMP team of their own, which fights the
        inference thread's for the cores (README, VIT_INLINE_LONE_BATCHES).

        Call it on the event loop's thread: where the answer is yes, that thread gets the engine's torch
        thread count too, which OpenMP keeps per thread (a new thread starts with one per core)."""
        inline = self.settings.inline_lone_batches
        if inline is None:
            inline = self.device.type == "cpu" and self.torch_threads == 1
        if inline:
            torch.set_num_threads(self.torch_threads)
        return inline

    @property
    def model(self) -> torch.nn.Module:
        return self.checkpoint.model

    @property
    def classes(self) -> list[str]:
        return self.checkpoint.classes

    def _build_forward(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """What /predict runs on a batch on the device (uint8 pixels, or normalised floats): class probabilities.

        The model may be int8-quantized or compiled; on CUDA the whole function, normalisation and softmax
        included, is replayed from graphs for uint8 batches.
        """
        settings = self.settings
        model = self.model
        if self.device.type == "cpu" and settings.precision == "bf16" and not cpu_computes_bf16():
            logger.warning("VIT_PRECISION=bf16 on a CPU without bf16 instructions (AVX512-BF16, AMX): emulated")
        if settings.quantize == "int8":
            with warnings.catch_warnings():
                # torch deprecates torch.ao.quantization and its quantized tensors for torchao, and said so in
                # each worker's log at every start; they still run in torch 2.14, as the README's VIT_QUANTIZE says.
                warnings.filterwarnings("ignore", "torch.ao.quantization is deprecated", DeprecationWarning)
                warnings.filterwarnings("ignore", "torch.quantize_per_tensor.*deprecated", UserWarning)
                model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        cast_for_autocast(self.model, settings.precision)  # the model that /attention runs, too
        if settings.compile:
            model = torch.compile(model, dynamic=True)

        def probabilities(batch: torch.Tensor) -> torch.Tensor:
            images = self._normalized(batch)
            with autocast(self.device, settings.precision):
                logits = model(images)
            return logits.float().softmax(dim=-1)

        if not (self.device.type == "cuda" if settings.cuda_graphs is None else settings.cuda_graphs):
            return probabilities
        sizes = [1 << power for power in range(settings.max_batch_size.bit_length())] + [settings.max_batch_size]
        return CudaGraphForward(probabilities, self.checkpoint.preprocess.image_shape, torch.uint8, sizes, self.device)

    def _batch(self, inputs: list[np.ndarray | torch.Tensor]) -> torch.Tensor:
        """The one place where inputs become tensors and reach the engine's device, as one batch.

        Inputs arrive as numpy arrays from the service (a front end of the model process has no torch),
        or as tensors. uint8 pixels travel as they are (a quarter of the bytes of float) and are
        normalised on the device, by _normalized; float inputs (v2 FP32 tensors) come normalised.
        """
        tensors = [torch.as_tensor(item) for item in inputs]  # a numpy array's memory is shared, not copied
        if all(item.dtype == torch.uint8 for item in tensors):
            batch = torch.stack(tensors)
        else:  # a mix: the pixels are normalised here, to stack with the floats
            batch = torch.stack([self._normalized(item) for item in tensors])
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        return batch

    def _normalized(self, batch: torch.Tensor) -> torch.Tensor:
        return normalize(batch, self.checkpoint.preprocess) if batch.dtype == torch.uint8 else batch

    @torch.inference_mode()
    def predict_batch(self, inputs: list[np.ndarray | torch.Tensor]) -> list[list[float]]:
        """(C, H, W) images, uint8 pixels or normalised floats -> one list of class probabilities per image."""
        return self.forward(self._batch(inputs)).cpu().tolist()

    def explain_batch(self, items: list[ExplainItem]) -> list[Explanation]:
        """One forward pass with attention weights (plus a backward pass if any item needs gradients)."""
        images = self._normalized(self._batch([item.pixels for item in items]))
        with autocast(self.device, self.settings.precision):
            if any(item.request.needs_gradients for item in items):
                targets = [item.request.explained_class for item in items]
                logits, attentions, gradients, chosen = attention_gradients(self.model, images, targets)
            else:
                with torch.inference_mode():
                    logits, attentions = self.model.forward_with_attention(images)
                gradients, chosen = None, logits.argmax(dim=-1)
        probabilities = logits.float().softmax(dim=-1).cpu().tolist()
        explained = chosen.cpu().tolist()
        maps = self._maps(items, attentions.float(), gradients.float() if gradients is not None else None)
        return [
            Explanation(probabilities[index], values, explained[index], layers)
            for index, (values, layers) in enumerate(maps)
        ]

    @torch.inference_mode()
    def _maps(
        self, items: list[ExplainItem], attentions: torch.Tensor, gradients: torch.Tensor | None
    ) -> list[tuple[np.ndarray, list[int]]]:
        """Each item's map, computed on the engine's device once per distinct request in the batch.

        attentions (and gradients) are (layers, B, heads, N, N). Every method maps each image on its own,
        so the images that ask for the same map share one batched computation, and one copy to the host,
        instead of a few dozen small operations each on this one thread.
        """
        groups: dict[MapRequest, list[int]] = {}
        for index, item in enumerate(items):
            groups.setdefault(item.request, []).append(index)
        maps: list[tuple[np.ndarray, list[int]]] = [(np.empty(0), [])] * len(items)
        for request, indices in groups.items():
            chosen = torch.tensor(indices, device=attentions.device)
            own_gradients = gradients.index_select(1, chosen) if gradients is not None else None
            values, layers = self._values(request, attentions.index_select(1, chosen), own_gradients)
            for index, item_values in zip(indices, values.cpu().numpy(), strict=True):
                maps[index] = (item_values, layers)
        return maps

    @staticmethod
    def _values(
        request: MapRequest, attentions: torch.Tensor, gradients: torch.Tensor | None
    ) -> tuple[torch.Tensor, list[int]]:
        """(B, grid, grid) maps, or (B, layers, heads, grid, grid) for a grid request, and the layers shown."""
        depth, _, heads = attentions.shape[:3]
        if request.grid:
            layers = [request.layer % depth] if request.layer is not None else list(range(depth))
            grid = torch.stack(
                [torch.stack([raw_attention(attentions, layer, head) for head in range(heads)], 1) for layer in layers],
                1,
            )
            return grid, layers
        values = attention_map(
            request.method,
            attentions,
            gradients,
            layer=-1 if request.layer is None else request.layer,
            head=request.head,
            head_fusion=request.head_fusion,
            discard_ratio=request.discard_ratio,
            start_layer=request.start_layer,
            mass=request.mass,
        )
        return values, []

    def warm_up(self) -> None:
        """Each path once (and /predict at a few batch sizes), so first requests pay no lazy initialisation."""
        blank = np.zeros(self.checkpoint.preprocess.image_shape, dtype=np.uint8)  # as decoded uploads arrive
        for batch_size in sorted({1, 2, self.settings.max_batch_size}):
            self.predict_batch([blank] * batch_size)
        self.explain_batch([ExplainItem(blank, MapRequest()), ExplainItem(blank, MapRequest(method="gradient"))])

    def served_model(self) -> ServedModel:
        checkpoint = self.checkpoint
        config = self.model.config
        return ServedModel(
            checkpoint.name, self.classes, config.depth, config.num_heads, checkpoint.preprocess, self.describe()
        )

    def describe(self) -> dict:
        return {
            "name": self.checkpoint.name,
            "classes": self.classes,
            "config": self.model.config.to_dict(),
            "parameters": count_parameters(self.model),
            "device": str(self.device),
            "precision": self.settings.precision,
            "quantize": self.settings.quantize,
            "torch_threads": self.torch_threads,
            "preprocess": self.checkpoint.preprocess.to_dict(),
            "training": self.checkpoint.training
            if self.settings.expose_training
            else without_local_details(self.checkpoint.training),
        }
