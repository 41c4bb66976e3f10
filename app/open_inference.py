"""The Open Inference Protocol (KServe v2, REST): parsing infer requests and encoding their answers.

Tensors travel as JSON, or, with the binary tensor data extension, as raw little-endian bytes after
a JSON header whose length the `Inference-Header-Content-Length` header gives. A BYTES element is
a 4-byte little-endian length followed by its bytes. Nothing here knows the served model or HTTP routing.
Triton's model configuration and statistics extensions are shaped here too.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.errors import quoted
from app.metrics import Samples
from model.ranking import ranked_classes

HEADER_LENGTH = "Inference-Header-Content-Length"
IMAGE_INPUT = "image"  # BYTES [N]: encoded images (PNG, JPEG, ...)
PIXELS_INPUT = "pixels"  # FP32 [N, C, H, W]: already preprocessed
OUTPUT = "probabilities"  # FP32 [N, classes]
VERSION = "1"
EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration", "statistics"]


class ProtocolError(Exception):
    """A request the protocol cannot accept; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# Names, datatypes and shapes are quoted in errors: bounded, so that an error never sends back megabytes.
Name = Annotated[str, Field(max_length=256)]


class RequestInput(BaseModel):
    name: Name
    shape: list[int] = Field(max_length=8)
    datatype: str = Field(max_length=16)
    parameters: dict[str, Any] = {}
    data: list | None = None


class RequestOutput(BaseModel):
    name: Name
    parameters: dict[str, Any] = {}


class InferRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] = {}
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] = Field({}, description="binary_data_size, when the data follow the JSON as bytes")
    data: list | None = Field(None, description="the values, row-major, unless they follow as bytes")


class InferResponse(BaseModel):
    """An inference response's JSON (app.open_inference.encode_response writes it)."""

    # The protocol's field names; pydantic before 2.10 reserved model_ and warned at every import.
    model_config = ConfigDict(protected_namespaces=())

    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[ResponseOutput]


@dataclass
class InputTensor:
    name: str
    datatype: str
    values: np.ndarray  # float32 of the declared shape, or an object array of bytes for BYTES


@dataclass
class OutputTensor:
    name: str
    datatype: str
    values: np.ndarray
    binary: bool


def _is_int(value: Any) -> bool:
    """A JSON integer: Python's bool is an int, but JSON's true is not a number."""
    return isinstance(value, int) and not isinstance(value, bool)


def tensor_metadata(name: str, datatype: str, shape: list[int]) -> dict:
    return {"name": name, "datatype": datatype, "shape": shape}


# Triton's names for the protocol's datatypes in a model configuration (its model_config.proto, in JSON).
CONFIG_DATA_TYPES = {"BYTES": "TYPE_STRING", "FP32": "TYPE_FP32"}


def tensor_config(metadata: dict) -> dict:
    """A tensor of the model metadata, as Triton's model configuration describes it."""
    return {"name": metadata["name"], "data_type": CONFIG_DATA_TYPES[metadata["datatype"]], "dims": metadata["shape"]}


def model_statistics(name: str, samples: Samples) -> dict:
    """The served model's statistics, as Triton's statistics extension gives them (perf_analyzer reads them for
    the server's share of the latency it measures), from the service's own metrics: GET /metrics's numbers, over
    all its processes.

    success and fail count infer requests, from the route's start to its answer. The rest count images, those of
    /predict too, since they share its batcher: queue, each image's wait in it; compute_infer, the time its batch
    took, in which the batch's inputs are stacked and moved to the device, and its probabilities moved back, so
    compute_input and compute_output, which Triton times apart, are within it and read 0. No response cache:
    cache_hit and cache_miss stay at zero. batch_stats is empty: compute times are kept per batcher, not per size.
    """

    def duration(metric: str, **labels: str) -> dict:
        count, seconds = samples.value(f"{metric}_count", **labels), samples.value(f"{metric}_sum", **labels)
        return {"count": int(count), "ns": round(seconds * 1e9)}

    predict = {"batcher": "predict"}
    compute_infer = duration("vit_image_compute_seconds", **predict)
    within_compute_infer = {"count": compute_infer["count"], "ns": 0}  # perf_analyzer wants the three counts equal
    return {
        "name": name,
        "version": VERSION,
        "last_inference": round(samples.value("vit_last_inference_timestamp_seconds") * 1000),  # ms since the epoch
        "inference_count": int(samples.value("vit_batch_size_sum", **predict)),  # images
        "execution_count": int(samples.value("vit_batch_size_count", **predict)),  # batches
        "inference_stats": {
            "success": duration("vit_infer_seconds", outcome="success"),
            "fail": duration("vit_infer_seconds", outcome="fail"),
            "queue": duration("vit_queue_seconds", **predict),
            "compute_input": within_compute_infer,
            "compute_infer": compute_infer,
            "compute_output": within_compute_infer,
            "cache_hit": {"count": 0, "ns": 0},
            "cache_miss": {"count": 0, "ns": 0},
        },
        "batch_stats": [],
    }


def parse_infer_request(body: bytes, header_length: str | None) -> tuple[InferRequest, list[InputTensor]]:
    """The request's JSON part and its inputs as numpy arrays, from a JSON or a binary-extension body."""
    json_part, binary_part = _split_body(body, header_length)
    try:
        request = InferRequest.model_validate_json(json_part)
    except ValidationError as error:
        raise ProtocolError(400, f"not a valid inference request: {first_error(error)}") from None
    inputs, offset = [], 0
    for tensor in request.inputs:
        size = tensor.parameters.get("binary_data_size")
        if size is None:
            inputs.append(InputTensor(tensor.name, tensor.datatype, _json_values(tensor)))
            continue
        if not _is_int(size) or size < 0:
            raise ProtocolError(
                400, f"input {tensor.name!r}: binary_data_size must be a byte count, got {quoted(size)}"
            )
        if tensor.data is not None:  # which of the two would the model see?
            raise ProtocolError(400, f"input {tensor.name!r} has both data and binary_data_size; send one")
        if offset + size > len(binary_part):
            raise ProtocolError(400, f"input {tensor.name!r}: binary_data_size {size} runs past the end of the body")
        inputs.append(
            InputTensor(tensor.name, tensor.datatype, binary_values(tensor, binary_part[offset : offset + size]))
        )
        offset += size
    if offset != len(binary_part):
        raise ProtocolError(400, f"{len(binary_part) - offset} bytes after the JSON header belong to no input")
    return request, inputs


def _split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    # isdigit() alone takes "²" and other Unicode digits, and int() refuses strings of over 4,300 digits.
    digits = header_length.isascii() and header_length.isdigit() and len(header_length) <= len(str(len(body)))
    if not digits or int(header_length) > len(body):
        shown = header_length if len(header_length) <= 20 else f"{header_length[:20]}... ({len(header_length)} chars)"
        raise ProtocolError(400, f"{HEADER_LENGTH} {shown!r} is not a length within the {len(body)}-byte body")
    return body[: int(header_length)], body[int(header_length) :]


def first_error(error: ValidationError) -> str:
    first = error.errors()[0]
    return f"{'.'.join(map(str, first['loc'])) or 'body'}: {first['msg']}"


def _element_count(tensor: RequestInput) -> int:
    if any(dimension < 0 for dimension in tensor.shape):
        raise ProtocolError(400, f"input {tensor.name!r}: negative dimension in shape {tensor.shape}")
    return math.prod(tensor.shape)  # Python's integers: numpy's int64 product wraps around to 0


def _json_values(tensor: RequestInput) -> np.ndarray:
    if tensor.data is None:
        raise ProtocolError(400, f"input {tensor.name!r} has neither data nor binary_data_size")
    try:
        if tensor.datatype == "FP32":
            values = np.asarray(tensor.data)  # flat or nested, row-major
            if values.dtype.kind not in "fiu":  # numpy would read "1.5" and true as numbers, and null as NaN
                raise ValueError("its elements must be numbers, not strings, true, false or null")
            values = values.astype(np.float32).reshape(-1)
        elif tensor.datatype == "BYTES":
            # JSON cannot hold raw bytes: the elements are base64, as KServe's clients send images.
            values = np.array([_base64_element(element) for element in _flatten(tensor.data)], dtype=object)
        else:
            raise ProtocolError(400, f"input {tensor.name!r}: datatype {tensor.datatype} is not served (FP32 or BYTES)")
    except (ValueError, TypeError) as error:
        raise ProtocolError(
            400, f"input {tensor.name!r}: data does not match datatype {tensor.datatype}: {error}"
        ) from None
    return shaped(tensor, values)


def _base64_element(element: object) -> bytes:
    """One BYTES element of a JSON body, decoded; Python's own reasons named the wrong thing ("argument should be a
    bytes-like object or ASCII string, not 'int'"), and a browser's data URL, which readAsDataURL gives, was only
    "Only base64 data is allowed"."""
    if not isinstance(element, str):
        raise TypeError("its elements must be base64 strings, not numbers, true, false, null or objects")
    if element.startswith("data:") and "base64," in element:
        raise ValueError("an element is a data: URL; send only the base64 after its 'base64,'")
    try:
        return base64.b64decode(element, validate=True)
    except binascii.Error as error:
        raise ValueError(f"an element is not base64 ({error}): {quoted(element)}") from None


def binary_values(tensor: RequestInput, raw: bytes) -> np.ndarray:
    if tensor.datatype == "FP32":
        if len(raw) % 4:
            raise ProtocolError(400, f"input {tensor.name!r}: {len(raw)} bytes is not a whole number of FP32 values")
        values = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    elif tensor.datatype == "BYTES":
        values = np.array(_deserialize_bytes(tensor.name, raw), dtype=object)
    else:
        raise ProtocolError(400, f"input {tensor.name!r}: datatype {tensor.datatype} is not served (FP32 or BYTES)")
    return shaped(tensor, values)


def shaped(tensor: RequestInput, values: np.ndarray) -> np.ndarray:
    expected = _element_count(tensor)
    if values.size != expected:
        raise ProtocolError(
            400, f"input {tensor.name!r}: shape {tensor.shape} needs {expected} elements, got {values.size}"
        )
    return values.reshape(tensor.shape)


def _flatten(data: list) -> list:
    return [leaf for item in data for leaf in (_flatten(item) if isinstance(item, list) else [item])]


# What a hand-made binary body got wrong, most often: a bare file where the protocol wants it length-prefixed.
BYTES_LAYOUT = " (each element is its length in 4 bytes, little-endian, then its bytes)"


def _deserialize_bytes(name: str, raw: bytes) -> list[bytes]:
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise ProtocolError(400, f"input {name!r}: a BYTES element's length is cut off{BYTES_LAYOUT}")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise ProtocolError(
                400, f"input {name!r}: a BYTES element of {length} bytes runs past its data{BYTES_LAYOUT}"
            )
        elements.append(raw[offset : offset + length])
        offset += length
    return elements


@dataclass(frozen=True)
class OutputPlan:
    binary: bool
    top_k: int  # 0: the probabilities; K: the classification extension's top K


def plan_outputs(request: InferRequest, num_classes: int) -> list[OutputPlan]:
    """Check the outputs asked for before any work is done on the inputs. No list, or an empty one as in
    Triton, asks for every output; naming one twice is refused, since its two entries could disagree."""
    default_binary = _flag(request.parameters, "binary_data_output", False)
    wanted = request.outputs or [RequestOutput(name=OUTPUT)]
    for output in wanted:
        if output.name != OUTPUT:
            raise ProtocolError(400, f"unknown output {output.name!r}; this model has {OUTPUT!r}")
    if len(wanted) > 1:
        raise ProtocolError(400, f"output {OUTPUT!r} is asked for {len(wanted)} times; ask for it once")
    parameters = wanted[0].parameters
    top_k = parameters.get("classification", 0)
    if not _is_int(top_k) or not 0 <= top_k <= num_classes:
        raise ProtocolError(
            400, f"classification must be an integer from 0 (the probabilities) to {num_classes}, got {quoted(top_k)}"
        )
    return [OutputPlan(_flag(parameters, "binary_data", default_binary), top_k)]


def _flag(parameters: dict[str, Any], name: str, default: bool) -> bool:
    """A JSON true or false: the string "false" is truthy in Python, and used to ask for binary data."""
    value = parameters.get(name, default)
    if not isinstance(value, bool):
        raise ProtocolError(400, f"{name} must be true or false, got {quoted(value)}")
    return value


def build_outputs(plans: list[OutputPlan], probabilities: np.ndarray, classes: list[str]) -> list[OutputTensor]:
    """Probabilities as FP32, or the top K as BYTES "probability:index:label" (Triton's classification extension)."""
    return [
        OutputTensor(OUTPUT, "BYTES", _classification(probabilities, classes, plan.top_k), plan.binary)
        if plan.top_k
        else OutputTensor(OUTPUT, "FP32", probabilities.astype(np.float32), plan.binary)
        for plan in plans
    ]


def _classification(probabilities: np.ndarray, classes: list[str], top_k: int) -> np.ndarray:
    ranked = ranked_classes(probabilities.tolist(), classes, top_k)
    rows = [[f"{p['probability']:f}:{p['index']}:{p['label']}".encode() for p in predictions] for predictions in ranked]
    return np.array(rows, dtype=object).reshape(len(rows), top_k)


def encode_response(
    model_name: str, request_id: str | None, outputs: list[OutputTensor]
) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers: plain JSON, or a JSON header followed by binary outputs."""
    described, blobs = [], []
    for output in outputs:
        entry = tensor_metadata(output.name, output.datatype, list(output.values.shape))
        if output.binary:
            blob = serialize_tensor(output)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = [_json_element(value) for value in output.values.reshape(-1)]
        described.append(entry)
    answer: dict[str, Any] = {"model_name": model_name, "model_version": VERSION, "outputs": described}
    if request_id is not None:
        answer["id"] = request_id
    header = json.dumps(answer).encode()
    if not blobs:
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(header))}


def serialize_tensor(output: OutputTensor) -> bytes:
    if output.datatype == "BYTES":
        return b"".join(struct.pack("<I", len(element)) + element for element in output.values.reshape(-1))
    return output.values.astype("<f4").tobytes()


def _json_element(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else float(value)
