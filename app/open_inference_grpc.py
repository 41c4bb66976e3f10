"""The Open Inference Protocol over gRPC (KServe v2's and Triton's `inference.GRPCInferenceService`), so that
tritonclient.grpc, perf_analyzer -i grpc and KServe's gRPC clients work unchanged. On VIT_GRPC_PORT, beside
the REST routes, in each serving process: every one binds the port (SO_REUSEPORT), and the kernel spreads the
connections among them, as it does HTTP's.

The messages and the service's stubs are Triton's, as its Python client ships them (`pip install
'vit-serving[grpc]'`). A request takes the REST routes' path (app/open_inference_service.py): the same checks,
the same batcher as /predict, the same API key (`authorization: Bearer <key>` metadata, on ModelInfer only),
the same statistics. Each fault's HTTP status becomes the gRPC code that says the same (GRPC_CODES). The same
port answers gRPC's health checking protocol (app/grpc_health.py) and its server reflection.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np
from fastapi import FastAPI, HTTPException
from fastapi.security import HTTPAuthorizationCredentials
from fastapi.security.utils import get_authorization_scheme_param
from google.protobuf import json_format
from pydantic import ValidationError
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from app.config import Settings, SettingsError
from app.deps import authorize, required_service, service_of
from app.logs import REQUEST_ID
from app.metrics import HttpMetrics
from app.middleware import ACCEPTED_REQUEST_ID
from app.open_inference import (
    VERSION,
    InferRequest,
    InputTensor,
    ProtocolError,
    RequestInput,
    binary_values,
    build_outputs,
    first_error,
    plan_outputs,
    serialize_tensor,
    shaped,
)
from app.open_inference_service import (
    check_model,
    model_configuration,
    model_metadata,
    probabilities_for,
    served_statistics,
    server_metadata,
)
from app.service import ModelService

try:
    import grpc
    from grpc_reflection.v1alpha import reflection
    from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

    from app import grpc_health
except ImportError as error:  # the optional dependency; app.main imports this module only with VIT_GRPC_PORT set
    raise SettingsError(
        f"VIT_GRPC_PORT needs gRPC's packages ({error.name} is missing): pip install 'vit-serving[grpc]'"
    ) from None

access_logger = logging.getLogger("app.grpc.access")
REQUEST_ID_KEY = "x-request-id"  # gRPC's metadata keys are lower case
UVICORN_TRUSTED_PROXIES = "127.0.0.1,::1"  # uvicorn's FORWARDED_ALLOW_IPS when unset
SERVICE_NAME = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name  # inference.GRPC...
Reply = TypeVar("Reply")

# The gRPC code for each HTTP status that the service's faults carry, as Triton and grpc-gateway pair them.
GRPC_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,  # gRPC's own code for a message over the size limit
    415: grpc.StatusCode.INVALID_ARGUMENT,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,  # a client may try again
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}

# Triton's RPCs beyond the protocol that are not served, and the extension each belongs to.
NOT_SERVED = {
    "RepositoryIndex": "model repository",
    "RepositoryModelLoad": "model repository",
    "RepositoryModelUnload": "model repository",
    "SystemSharedMemoryStatus": "shared-memory",
    "SystemSharedMemoryRegister": "shared-memory",
    "SystemSharedMemoryUnregister": "shared-memory",
    "CudaSharedMemoryStatus": "shared-memory",
    "CudaSharedMemoryRegister": "shared-memory",
    "CudaSharedMemoryUnregister": "shared-memory",
    "TraceSetting": "trace",
    "LogSettings": "logging",
}


def fault(error: ProtocolError | HTTPException) -> tuple[grpc.StatusCode, str]:
    """The gRPC code and the sentence of a fault that the service raised with an HTTP status."""
    if isinstance(error, ProtocolError):
        return GRPC_CODES.get(error.status, grpc.StatusCode.UNKNOWN), str(error)
    return GRPC_CODES.get(error.status_code, grpc.StatusCode.UNKNOWN), str(error.detail)


async def answered(context: grpc.aio.ServicerContext, work: Awaitable[Reply]) -> Reply:
    """`work`'s reply, or the call ended with the code and the sentence of its fault."""
    try:
        return await work
    except (ProtocolError, HTTPException) as error:
        await context.abort(*fault(error))
        raise  # abort raises; this is never reached


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """The RPCs, each answered from the app's state: the running service, its settings and its metrics."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def _service(self) -> ModelService:
        return required_service(self.app.state)

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return service_pb2.ServerReadyResponse(ready=service_of(self.app.state) is not None)

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Ready: the served model, named as check_model takes it, and running; anything else is not."""
        service = service_of(self.app.state)
        if service is None:
            return service_pb2.ModelReadyResponse(ready=False)
        try:
            check_model(service, request.name, request.version)
        except ProtocolError:
            return service_pb2.ModelReadyResponse(ready=False)
        return service_pb2.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return json_format.ParseDict(server_metadata(self.app.version), service_pb2.ServerMetadataResponse())

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await answered(context, self._described(request, model_metadata, service_pb2.ModelMetadataResponse()))

    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        config = self._described(request, model_configuration, model_config_pb2.ModelConfig())
        return service_pb2.ModelConfigResponse(config=await answered(context, config))

    async def _described(self, request: Any, describe: Callable[[ModelService], dict], message: Reply) -> Reply:
        service = self._service()
        check_model(service, request.name, request.version)
        return json_format.ParseDict(describe(service), message)  # the REST route's JSON: the fields' own names

    async def ModelStatistics(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await answered(context, self._statistics(request))

    async def _statistics(self, request: Any) -> Any:
        service = self._service()
        if request.name:  # none: every model's, as in Triton
            check_model(service, request.name, request.version)
        statistics = await served_statistics(self.app.state.metrics, service)
        return json_format.ParseDict(statistics, service_pb2.ModelStatisticsResponse())

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await answered(context, self._infer(request, context))

    async def _infer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        authorize(self.app.state.settings.api_key, bearer(context))
        service = self._service()
        check_model(service, request.model_name, request.model_version)
        with service.answering(), self.app.state.metrics.timing_infer():  # for Triton's statistics
            infer_request, inputs = parse_model_infer(request)
            plans = plan_outputs(infer_request, len(service.model.classes))
            probabilities = await probabilities_for(service, inputs)  # a client that cancels cancels it
            outputs = build_outputs(plans, probabilities, service.model.classes)
            return service_pb2.ModelInferResponse(
                model_name=service.model.name,
                model_version=VERSION,
                id=request.id,
                outputs=[
                    {"name": output.name, "datatype": output.datatype, "shape": output.values.shape}
                    for output in outputs
                ],
                raw_output_contents=[serialize_tensor(output) for output in outputs],  # as Triton answers
            )

    async def ModelStreamInfer(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
        """Triton's streaming inference: each request of the stream is answered once its probabilities are in, in
        the order they finish, which may not be the order sent (a client tells them apart by id), as Triton answers
        a model that is not decoupled. A request's fault is its answer's error_message, and the stream goes on.

        At most VIT_QUEUE_SIZE requests of a stream are unanswered: the next is read once one is answered, so that
        HTTP/2's flow control holds back a client that sends faster than it is answered, or than it reads its
        answers, as uvicorn holds back an HTTP connection. Read as they came, the requests past the batcher's queue
        were refused (overloaded), and those whose answers the client did not read piled up in memory."""
        writing = asyncio.Lock()  # one message at a time on the stream
        room = asyncio.Semaphore(self.app.state.settings.queue_size)

        async def answer(request: Any) -> None:
            try:
                response = service_pb2.ModelStreamInferResponse(infer_response=await self._infer(request, context))
            except (ProtocolError, HTTPException) as error:
                _, message = fault(error)
                response = service_pb2.ModelStreamInferResponse(
                    error_message=message, infer_response=service_pb2.ModelInferResponse(id=request.id)
                )
            try:
                async with writing:
                    await context.write(response)
            finally:
                room.release()

        async with asyncio.TaskGroup() as answers:  # a client that leaves cancels those still running
            while await room.acquire() and (request := await anext(requests, None)) is not None:
                answers.create_task(answer(request))


HANDLERS = {  # the kinds of method served: the inference service's two, and health's Watch (unary-stream)
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


class CallMetrics(grpc.aio.ServerInterceptor):
    """Each call, as HTTP's requests are (app/middleware.py): given a request id, the client's x-request-id or a
    new one, sent back in the answer's initial metadata and set for the lines logged meanwhile; counted by method
    and code and timed; and, unless VIT_ACCESS_LOG=false, a line in the log as uvicorn writes one per HTTP
    request: `127.0.0.1:52814 - gRPC ModelInfer OK 4.1 ms 9f1c...`."""

    def __init__(self, metrics: HttpMetrics, access_log: bool) -> None:
        self.metrics, self.access_log = metrics, access_log
        trusted = os.environ.get("FORWARDED_ALLOW_IPS", UVICORN_TRUSTED_PROXIES)  # as uvicorn reads it
        self.forwarded = ProxyHeadersMiddleware(no_app, trusted_hosts=trusted)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:  # a method of no service here: gRPC answers UNIMPLEMENTED
            return handler
        method = details.method.rsplit("/", 1)[-1]
        kind = next(kind for kind in HANDLERS if getattr(handler, kind) is not None)
        behaviour = getattr(handler, kind)
        if inspect.isasyncgenfunction(behaviour):  # answers yielded, as the reflection service's are
            behaviour = written(behaviour)

        async def counted(request: Any, context: grpc.aio.ServicerContext) -> Any:  # a request, or a stream of them
            request_id = call_id(context)
            client = await self.client_of(context) if self.access_log else ""
            token = REQUEST_ID.set(request_id)  # for every line logged while the call is answered
            try:
                await context.send_initial_metadata([(REQUEST_ID_KEY, request_id)])
                with self.counting(method, context, request_id, client):
                    return await behaviour(request, context)
            finally:
                REQUEST_ID.reset(token)

        return HANDLERS[kind](
            counted, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )

    async def client_of(self, context: grpc.aio.ServicerContext) -> str:
        """The call's client as uvicorn names an HTTP request's in its access line: the peer, or behind a proxy that
        FORWARDED_ALLOW_IPS trusts, the client that its X-Forwarded-For names (uvicorn's own middleware reads it)."""
        address = context.peer().partition(":")[2]  # ipv4:127.0.0.1:52814, ipv6:[::1]:52814
        host, _, port = address.rpartition(":")
        forwarded = [
            (key.encode(), value.encode("latin-1", "replace"))  # as raw as an HTTP header's bytes
            for key, value in context.invocation_metadata() or ()
            if key == "x-forwarded-for" and isinstance(value, str)
        ]
        client = (host.strip("[]"), int(port) if port.isdigit() else 0)
        scope = {"type": "http", "client": client, "headers": forwarded}
        await self.forwarded(scope, None, None)  # sets scope["client"], as for an HTTP request
        host, port = scope["client"]
        return f"{host}:{port}"

    @contextmanager
    def counting(self, method: str, context: grpc.aio.ServicerContext, request_id: str, client: str) -> Iterator[None]:
        started = time.perf_counter()
        code = grpc.StatusCode.UNKNOWN  # an exception that was not a fault: gRPC answers UNKNOWN
        try:
            yield
            code = context.code() or grpc.StatusCode.OK
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED  # the client left, or its deadline passed
            raise
        except BaseException:
            code = context.code() or code  # abort() raises, with the code it set
            raise
        finally:
            elapsed = time.perf_counter() - started
            self.metrics.grpc_requests.labels(method, code.name).inc()
            self.metrics.grpc_latency.labels(method).observe(elapsed)
            if self.access_log:
                access_logger.info("%s - gRPC %s %s %.1f ms %s", client, method, code.name, elapsed * 1000, request_id)


async def no_app(scope: dict, receive: Any, send: Any) -> None:
    """What ProxyHeadersMiddleware calls after it has read the scope's X-Forwarded-For: nothing more to do."""


def written(yielding: Callable[..., AsyncIterator[Any]]) -> Callable[..., Awaitable[None]]:
    """A method that yields its answers as one that writes them, which the interceptor awaits as any other."""

    async def behaviour(request: Any, context: grpc.aio.ServicerContext) -> None:
        async for answer in yielding(request, context):
            await context.write(answer)

    return behaviour


def call_id(context: grpc.aio.ServicerContext) -> str:
    """The call's x-request-id metadata, if it sent a usable one (as HTTP's X-Request-ID), else a new UUID."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and ACCEPTED_REQUEST_ID.fullmatch(value.encode()):
            return value
    return uuid.uuid4().hex


def not_served(extension: str) -> Callable[..., Awaitable[None]]:
    """An RPC of one of them: UNIMPLEMENTED that names the extension, where gRPC said only "Method not implemented!"."""

    async def rpc(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            f"Triton's {extension} extension is not served here; this server answers the Open Inference Protocol's "
            "health, metadata and ModelInfer, and Triton's ModelStreamInfer, ModelConfig and ModelStatistics",
        )

    return rpc


for _rpc, _extension in NOT_SERVED.items():
    setattr(InferenceServicer, _rpc, staticmethod(not_served(_extension)))


def bearer(context: grpc.aio.ServicerContext) -> HTTPAuthorizationCredentials | None:
    """The `authorization` metadata as HTTP's header would give it: `Bearer <key>`, else none."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            scheme, credentials = get_authorization_scheme_param(value)  # as FastAPI's HTTPBearer reads the header
            if scheme.lower() == "bearer":
                return HTTPAuthorizationCredentials(scheme=scheme, credentials=credentials)
    return None


def parse_model_infer(request: Any) -> tuple[InferRequest, list[InputTensor]]:
    """The request as the REST route's parsing gives it: its declared parts checked by the same model, and its
    inputs as numpy arrays, each from its raw_input_contents entry (tritonclient's way) or from its contents."""
    try:
        infer_request = InferRequest.model_validate(
            {
                "id": request.id or None,
                "parameters": parameters(request.parameters),
                "inputs": [
                    {
                        "name": tensor.name,
                        "shape": list(tensor.shape),
                        "datatype": tensor.datatype,
                        "parameters": parameters(tensor.parameters),
                    }
                    for tensor in request.inputs
                ],
                "outputs": [
                    {"name": output.name, "parameters": parameters(output.parameters)} for output in request.outputs
                ],
            }
        )
    except ValidationError as error:
        raise ProtocolError(400, f"not a valid inference request: {first_error(error)}") from None
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise ProtocolError(
            400, f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs; send one per input, or none"
        )
    inputs = []
    for index, (declared, tensor) in enumerate(zip(infer_request.inputs, request.inputs, strict=True)):
        if raw and tensor.HasField("contents"):  # which of the two would the model see?
            raise ProtocolError(400, f"input {declared.name!r} has both contents and raw_input_contents; send one")
        values = binary_values(declared, raw[index]) if raw else contents_values(declared, tensor.contents)
        inputs.append(InputTensor(declared.name, declared.datatype, values))
    return infer_request, inputs


def contents_values(declared: RequestInput, contents: Any) -> np.ndarray:
    """An input's typed contents: fp32_contents for FP32, bytes_contents for BYTES."""
    if declared.datatype == "FP32":
        return shaped(declared, np.array(contents.fp32_contents, dtype=np.float32))
    if declared.datatype == "BYTES":
        return shaped(declared, np.array(list(contents.bytes_contents), dtype=object))
    raise ProtocolError(400, f"input {declared.name!r}: datatype {declared.datatype} is not served (FP32 or BYTES)")


def parameters(given: Any) -> dict[str, Any]:
    """A map of InferParameter as the JSON body's parameters read: each the value its `parameter_choice` holds."""
    return {
        name: getattr(value, value.WhichOneof("parameter_choice") or "string_param") for name, value in given.items()
    }


def bind_grpc(app: FastAPI, settings: Settings) -> grpc.aio.Server:
    """The gRPC server, bound to VIT_HOST:VIT_GRPC_PORT and not yet started: a port that another program holds
    stops the start before the model loads. Messages as large as VIT_MAX_UPLOAD_BYTES."""
    server = grpc.aio.server(
        interceptors=[CallMetrics(app.state.metrics, settings.access_log)],
        options=[
            ("grpc.so_reuseport", 1),  # every serving process binds the port (gRPC's default on Linux, said here)
            ("grpc.max_receive_message_length", settings.max_upload_bytes),
        ],
    )
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(app), server)
    grpc_health.add_health(app, server, (SERVICE_NAME,))
    # Reflection: grpcurl and Postman list the services and call them without Triton's .proto files.
    reflection.enable_server_reflection((SERVICE_NAME, grpc_health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = grpc_address(settings)
    try:
        server.add_insecure_port(address)
    except RuntimeError:
        raise SettingsError(f"VIT_GRPC_PORT: cannot listen on {address}: {bind_error(settings)}") from None
    return server


def bind_error(settings: Settings) -> str:
    """Why gRPC could not bind, which its error does not say ("Failed to bind to address"): the same bind, tried
    with a socket of our own, as the HTTP port's refusal says it (`[Errno 98] Address already in use`)."""
    with socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            probe.bind((settings.host, settings.grpc_port))
        except OSError as error:
            return str(error)
    return "gRPC could not bind it"


def grpc_address(settings: Settings) -> str:
    """VIT_HOST:VIT_GRPC_PORT, an IPv6 host in brackets."""
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return f"{host}:{settings.grpc_port}"
