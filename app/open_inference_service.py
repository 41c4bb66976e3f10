"""The Open Inference Protocol over the served model: what its REST routes (app/routes/open_inference.py) and its
gRPC service (app/open_inference_grpc.py) both answer, without HTTP or gRPC. Faults are ProtocolErrors, with the
HTTP status that each transport turns into its own."""

from __future__ import annotations

import numpy as np

from app.errors import quoted
from app.metrics import HttpMetrics, Samples, scrape
from app.open_inference import (
    EXTENSIONS,
    IMAGE_INPUT,
    OUTPUT,
    PIXELS_INPUT,
    VERSION,
    InputTensor,
    ProtocolError,
    model_statistics,
    tensor_config,
    tensor_metadata,
)
from app.service import ModelService
from model.metadata import composed

PLATFORM = "pytorch"
SERVER_NAME = "vit-serving"


def server_metadata(version: str) -> dict:
    return {"name": SERVER_NAME, "version": version, "extensions": EXTENSIONS}


async def served_statistics(metrics: HttpMetrics, service: ModelService) -> dict:
    """Triton's statistics of every model served, the one model's, read from one scrape of the service's metrics
    (app.open_inference.model_statistics says what each counts)."""
    samples = Samples(await scrape(metrics, service))
    return {"model_stats": [model_statistics(service.model.name, samples)]}


def check_model(service: ModelService, model_name: str, version: str | None) -> None:
    """A 404 unless the request names the served model, in either Unicode form: its name is composed, and a
    client's may have been pasted from the file's name on a Mac. No version, or "" as gRPC's default, is any."""
    name = service.model.name
    if composed(model_name) != name:
        raise ProtocolError(404, f"unknown model {quoted(model_name)}; this server serves {name!r}")
    if version not in (None, "", VERSION):
        raise ProtocolError(404, f"model {name!r} has no version {quoted(version)}; it has {VERSION!r}")


def served_tensors(service: ModelService) -> tuple[list[dict], list[dict]]:
    """The inputs and the output of the model metadata; the -1 of each shape is the batch's."""
    image_shape = [-1, *service.model.preprocess.image_shape]
    inputs = [tensor_metadata(IMAGE_INPUT, "BYTES", [-1]), tensor_metadata(PIXELS_INPUT, "FP32", image_shape)]
    return inputs, [tensor_metadata(OUTPUT, "FP32", [-1, len(service.model.classes)])]


def model_metadata(service: ModelService) -> dict:
    inputs, outputs = served_tensors(service)
    name = service.model.name
    return {"name": name, "versions": [VERSION], "platform": PLATFORM, "inputs": inputs, "outputs": outputs}


def model_configuration(service: ModelService) -> dict:
    """Triton's model configuration of the served model, which perf_analyzer reads before it sends a request."""
    inputs, outputs = served_tensors(service)
    return {
        "name": service.model.name,
        "platform": PLATFORM,
        # 0: each shape holds its batch dimension (the -1), as the metadata's do, where Triton's max_batch_size
        # would put one more before them. Requests are batched together all the same, up to VIT_MAX_BATCH_SIZE.
        "max_batch_size": 0,
        "input": [tensor_config(tensor) | {"optional": True} for tensor in inputs],  # a request sends one of them
        "output": [tensor_config(tensor) for tensor in outputs],
    }


async def probabilities_for(service: ModelService, inputs: list[InputTensor]) -> np.ndarray:
    """(N, classes) probabilities for an infer request's inputs, each image through the /predict batcher."""
    rows = await service.predict(await model_inputs(service, inputs))
    probabilities = np.array(rows, dtype=np.float32)
    if not np.isfinite(probabilities).all():  # JSON has no NaN, and no class is likelier than another
        raise ProtocolError(
            400, f"input {inputs[0].name!r} gave non-finite probabilities: values far outside the normalised range"
        )
    return probabilities


async def model_inputs(service: ModelService, inputs: list[InputTensor]) -> list[np.ndarray]:
    """One (C, H, W) array per image: decoded uint8 pixels, or the caller's normalised floats."""
    if len(inputs) != 1 or inputs[0].name not in (IMAGE_INPUT, PIXELS_INPUT):
        raise ProtocolError(400, f"send exactly one input, {IMAGE_INPUT!r} (BYTES) or {PIXELS_INPUT!r} (FP32)")
    tensor = inputs[0]
    count = tensor.values.shape[0] if tensor.values.ndim else 0
    if count == 0:
        raise ProtocolError(400, f"input {tensor.name!r} holds no images")
    if count > service.settings.max_files:
        raise ProtocolError(413, f"{count} images sent; at most {service.settings.max_files} per request")
    if tensor.name == IMAGE_INPUT:
        return await _decode_images(service, tensor)
    return _pixel_rows(service, tensor)


async def _decode_images(service: ModelService, tensor: InputTensor) -> list[np.ndarray]:
    if tensor.datatype != "BYTES" or tensor.values.ndim not in (1, 2) or tensor.values.size != tensor.values.shape[0]:
        raise ProtocolError(
            400,
            f"input {IMAGE_INPUT!r} must be BYTES of shape [N] or [N, 1], one encoded image each, not {_sent(tensor)}",
        )
    files = [(data, f"{IMAGE_INPUT}[{index}]") for index, data in enumerate(tensor.values.reshape(-1))]
    return [decoded.pixels for decoded in await service.decoder.decode_all(files)]


def _sent(tensor: InputTensor) -> str:
    """What a client sent, as its refusal repeats it: FP32 [1, 3, 32, 32]."""
    return f"{tensor.datatype} {list(tensor.values.shape)}"


def _pixel_rows(service: ModelService, tensor: InputTensor) -> list[np.ndarray]:
    preprocess = service.model.preprocess
    expected = list(preprocess.image_shape)
    if tensor.datatype != "FP32" or tensor.values.ndim != 4 or list(tensor.values.shape[1:]) != expected:
        shape = ", ".join(map(str, expected))
        raise ProtocolError(400, f"input {PIXELS_INPUT!r} must be FP32 of shape [N, {shape}], not {_sent(tensor)}")
    if not np.isfinite(tensor.values).all():
        raise ProtocolError(400, f"input {PIXELS_INPUT!r} holds NaN or infinite values")
    return list(np.ascontiguousarray(tensor.values))  # (C, H, W) views of one array
