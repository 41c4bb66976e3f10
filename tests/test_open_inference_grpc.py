"""The Open Inference Protocol over gRPC: Triton's own gRPC client, unmodified, against real uvicorn, answering
as the REST routes do."""

import asyncio
import base64
import json
import queue
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import AsyncIterator

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from google.protobuf.descriptor_pool import DescriptorPool
from google.protobuf.json_format import ParseDict
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

from model import DEFAULT_CHECKPOINT
from model.checkpoint import load_checkpoint
from model.images import pixels_to_image
from model.preprocess import preprocess_image
from tests.support.images import image_bytes
from tests.support.server import free_port, listening_workers, running_server, start_server, wait_in_flight

MODEL = DEFAULT_CHECKPOINT.stem
IMAGES = 4


@pytest.fixture(scope="module")
def grpc_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def server_env(grpc_port) -> dict[str, str]:
    return {"VIT_DEVICE": "cpu", "VIT_GRPC_PORT": str(grpc_port), "VIT_MAX_UPLOAD_BYTES": str(256 * 1024)}


@pytest.fixture(scope="module")
def client(server, grpc_port):
    client = triton.InferenceServerClient(url=f"127.0.0.1:{grpc_port}")
    yield client
    client.close()


@pytest.fixture(scope="module")
def stub(server, grpc_port):
    """The service's own stub, for the messages that tritonclient never sends (typed contents)."""
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def pngs(fashion_test):
    return [image_bytes(fashion_test.images[index, 0].numpy()) for index in range(IMAGES)]


def images_input(pngs: list[bytes]) -> triton.InferInput:
    image = triton.InferInput("image", [len(pngs)], "BYTES")
    return image.set_data_from_numpy(np.array(pngs, dtype=object))


def rest_infer(base_url: str, pngs: list[bytes], **output_parameters: object) -> dict:
    """The REST route's answer to the same images, as plain JSON with base64 elements."""
    body = {
        "inputs": [
            {
                "name": "image",
                "shape": [len(pngs)],
                "datatype": "BYTES",
                "data": [base64.b64encode(png).decode() for png in pngs],
            }
        ],
        "outputs": [{"name": "probabilities", "parameters": output_parameters}],
    }
    response = httpx.post(f"{base_url}/v2/models/{MODEL}/infer", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["outputs"][0]


def test_health_metadata_and_configuration_over_grpc_are_the_rest_routes(server, client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")
    assert not client.is_model_ready("resnet50") and not client.is_model_ready(MODEL, "2")
    for path, answer in (
        ("", client.get_server_metadata()),
        (f"/models/{MODEL}", client.get_model_metadata(MODEL)),
        (f"/models/{MODEL}/config", client.get_model_config(MODEL).config),
    ):
        rest = httpx.get(f"{server.base_url}/v2{path}", timeout=10).json()
        assert answer == ParseDict(rest, type(answer)())  # the REST JSON, every field, in the proto's names
    config = client.get_model_config(MODEL).config
    assert [tensor.data_type for tensor in config.input] == [
        triton.model_config_pb2.TYPE_STRING,
        triton.model_config_pb2.TYPE_FP32,
    ]


def test_encoded_images_over_grpc_get_the_rest_routes_probabilities_and_labels(server, client, pngs, fashion_test):
    result = client.infer(MODEL, [images_input(pngs)], request_id="grpc-3")
    probabilities = result.as_numpy("probabilities")
    assert probabilities.dtype == np.float32 and probabilities.shape == (IMAGES, 10)
    assert result.get_response().id == "grpc-3" and result.get_response().model_version == "1"
    rest = np.array(rest_infer(server.base_url, pngs)["data"], dtype=np.float32).reshape(IMAGES, 10)
    assert np.allclose(probabilities, rest, atol=1e-6)
    assert (probabilities.argmax(axis=1) == fashion_test.labels[:IMAGES].numpy()).mean() >= 0.75
    top = triton.InferRequestedOutput("probabilities", class_count=3)  # Triton's classification extension
    labels = client.infer(MODEL, [images_input(pngs)], outputs=[top]).as_numpy("probabilities")
    assert labels.shape == (IMAGES, 3)
    assert [element.decode() for element in labels.reshape(-1)] == rest_infer(server.base_url, pngs, classification=3)[
        "data"
    ]


def test_preprocessed_pixels_as_raw_bytes_or_as_typed_contents_give_the_same_probabilities(
    client, stub, pngs, fashion_test
):
    preprocess = load_checkpoint(DEFAULT_CHECKPOINT).preprocess
    pixels = np.stack(
        [preprocess_image(pixels_to_image(image), preprocess).numpy() for image in fashion_test.images[:2]]
    )
    raw = triton.InferInput("pixels", list(pixels.shape), "FP32").set_data_from_numpy(pixels)  # raw_input_contents
    from_raw = client.infer(MODEL, [raw]).as_numpy("probabilities")
    assert np.allclose(from_raw, client.infer(MODEL, [images_input(pngs[:2])]).as_numpy("probabilities"), atol=1e-5)
    typed = service_pb2.ModelInferRequest(model_name=MODEL)
    tensor = typed.inputs.add(name="pixels", datatype="FP32", shape=list(pixels.shape))
    tensor.contents.fp32_contents.extend(pixels.reshape(-1).tolist())
    answer = stub.ModelInfer(typed, timeout=30)
    assert [(output.name, output.datatype, list(output.shape)) for output in answer.outputs] == [
        ("probabilities", "FP32", [2, 10])
    ]
    assert np.allclose(np.frombuffer(answer.raw_output_contents[0], dtype="<f4").reshape(2, 10), from_raw, atol=1e-6)
    encoded = service_pb2.ModelInferRequest(model_name=MODEL)
    encoded.inputs.add(name="image", datatype="BYTES", shape=[2]).contents.bytes_contents.extend(pngs[:2])
    answer = stub.ModelInfer(encoded, timeout=30)
    assert np.allclose(np.frombuffer(answer.raw_output_contents[0], dtype="<f4").reshape(2, 10), from_raw, atol=1e-5)


def test_a_stream_answers_each_request_by_its_id_and_a_fault_without_ending_the_stream(client, pngs):
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for index, png in enumerate([*pngs, b"not an image", pngs[0]]):
            client.async_stream_infer(MODEL, [images_input([png])], request_id=f"s{index}")
        received = [answers.get(timeout=30) for _ in range(IMAGES + 2)]
    finally:
        client.stop_stream()
    faults = [error for result, error in received if error is not None]
    assert [error.message() for error in faults] == ["image[0]: not an image in a format we can read"]
    by_id = {result.get_response().id: result.as_numpy("probabilities") for result, error in received if error is None}
    assert sorted(by_id) == sorted(f"s{index}" for index in (*range(IMAGES), IMAGES + 1))
    expected = client.infer(MODEL, [images_input(pngs)]).as_numpy("probabilities")
    for index in range(IMAGES):
        assert np.allclose(by_id[f"s{index}"], expected[index : index + 1], atol=1e-6)
    assert np.allclose(by_id[f"s{IMAGES + 1}"], by_id["s0"], atol=1e-6)  # the same image, in another batch


def test_a_stream_holds_at_most_the_queues_size_unanswered_and_reads_on_as_they_are_answered(pngs):
    """Past VIT_QUEUE_SIZE requests unanswered, the next is read once one is answered: the client is held back by
    HTTP/2's flow control, where the stream's requests were all read at once, and those past the queue refused."""
    port = free_port()
    env = {"VIT_DEVICE": "cpu", "VIT_GRPC_PORT": str(port), "VIT_QUEUE_SIZE": "4", "VIT_MAX_BATCH_SIZE": "4"}
    env["VIT_MAX_WAIT_MS"] = "200"  # batches that wait, so that the queue fills
    tensor = serialize_byte_tensor(np.array(pngs[:1], dtype=object)).item()
    requests = [
        service_pb2.ModelInferRequest(
            model_name=MODEL,
            id=f"r{index}",
            inputs=[{"name": "image", "datatype": "BYTES", "shape": [1]}],
            raw_input_contents=[tensor],
        )
        for index in range(24)
    ]
    with running_server(env), grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        answers = list(service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter(requests), timeout=60))
    assert [answer.error_message for answer in answers] == [""] * 24
    assert sorted(answer.infer_response.id for answer in answers) == sorted(f"r{index}" for index in range(24))


def test_tritonclients_asyncio_client_infers_and_streams_as_its_threaded_one_does(grpc_port, client, pngs):
    async def asked() -> tuple[np.ndarray, dict[str, np.ndarray]]:
        async_client = triton_aio.InferenceServerClient(url=f"127.0.0.1:{grpc_port}")
        try:
            together = await async_client.infer(MODEL, [images_input(pngs)])

            async def requests() -> AsyncIterator[dict]:
                for index, png in enumerate(pngs):
                    yield {"model_name": MODEL, "inputs": [images_input([png])], "request_id": f"a{index}"}

            streamed = {}
            async for result, error in async_client.stream_infer(requests()):
                assert error is None, error
                streamed[result.get_response().id] = result.as_numpy("probabilities")
            return together.as_numpy("probabilities"), streamed
        finally:
            await async_client.close()

    together, streamed = asyncio.run(asked())
    expected = client.infer(MODEL, [images_input(pngs)]).as_numpy("probabilities")
    assert np.allclose(together, expected, atol=1e-6)
    assert sorted(streamed) == [f"a{index}" for index in range(IMAGES)]
    for index in range(IMAGES):
        assert np.allclose(streamed[f"a{index}"], expected[index : index + 1], atol=1e-6)


def test_each_call_answers_with_its_request_id_the_clients_when_usable_as_http_does(stub):
    def answered_id(*metadata: tuple[str, str], call=stub.ServerReady) -> str:
        _, answer = call.with_call(service_pb2.ServerReadyRequest(), metadata=metadata, timeout=10)
        return dict(answer.initial_metadata())["x-request-id"]

    assert answered_id(("x-request-id", "batch-42/a")) == "batch-42/a"
    for unusable in ((), (("x-request-id", "two words"),), (("x-request-id", "x" * 129),)):
        assert re.fullmatch(r"[0-9a-f]{32}", answered_id(*unusable))  # a new UUID
    with pytest.raises(grpc.RpcError) as error:  # a fault's answer carries it too
        stub.ModelMetadata(service_pb2.ModelMetadataRequest(name="resnet50"), metadata=[("x-request-id", "lost-7")])
    assert dict(error.value.initial_metadata())["x-request-id"] == "lost-7"


SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def test_grpc_health_checking_says_serving_for_the_server_and_the_inference_service_and_knows_no_other(
    server, grpc_port
):
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "inference.GRPCInferenceService"):  # Kubernetes' grpc probe asks for "" unless told
            assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status == SERVING
            watch = health.Watch(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert next(watch).status == SERVING
            watch.cancel()
        with pytest.raises(grpc.RpcError) as error:
            health.Check(health_pb2.HealthCheckRequest(service="inference.Other"), timeout=10)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        assert error.value.details() == (
            "no service 'inference.Other' here: ask for '' (the server) or 'inference.GRPCInferenceService'"
        )
        watch = health.Watch(health_pb2.HealthCheckRequest(service="inference.Other"), timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN  # as the protocol asks of Watch
        watch.cancel()


def test_sigterm_turns_grpc_health_not_serving_at_once_and_the_call_in_flight_is_still_answered(pngs):
    port = free_port()
    env = {"VIT_DEVICE": "cpu", "VIT_GRPC_PORT": str(port), "VIT_MAX_WAIT_MS": "2000", "VIT_SHUTDOWN_GRACE_S": "10"}
    server = start_server(env)  # a batch waits 2 s for company: the call is in flight when SIGTERM comes
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    client = triton.InferenceServerClient(url=f"127.0.0.1:{port}")
    try:
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=30)
        assert next(watch).status == SERVING
        answers: queue.Queue = queue.Queue()
        client.async_infer(MODEL, [images_input(pngs[:1])], callback=lambda result, error: answers.put((result, error)))
        wait_in_flight(server, 1)
        server.process.send_signal(signal.SIGTERM)
        assert next(watch).status == NOT_SERVING  # the drain has begun
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == NOT_SERVING
        assert not client.is_server_ready()
        result, error = answers.get(timeout=15)
        assert error is None and result.as_numpy("probabilities").shape == (1, 10)
    finally:
        client.close()
        channel.close()
        returncode, output = server.stop(timeout_s=15)
    assert returncode in (0, -signal.SIGTERM), output


def test_server_reflection_lets_a_client_without_the_proto_files_list_the_services_and_call_one(server, grpc_port):
    """As grpcurl does: the messages are built from the server's own descriptions, in a pool of their own."""
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        described = ProtoReflectionDescriptorDatabase(channel)
        assert sorted(described.get_services()) == [
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
            "inference.GRPCInferenceService",
        ]
        service = DescriptorPool(described).FindServiceByName("inference.GRPCInferenceService")
        assert {"ModelInfer", "ModelStreamInfer", "ModelMetadata"} <= {method.name for method in service.methods}
        method = service.FindMethodByName("ModelMetadata")
        request, response = GetMessageClass(method.input_type), GetMessageClass(method.output_type)
        call = channel.unary_unary(
            f"/{service.full_name}/{method.name}",
            request_serializer=request.SerializeToString,
            response_deserializer=response.FromString,
        )
        metadata = call(request(name=MODEL), timeout=10)
    assert metadata.name == MODEL and [tensor.name for tensor in metadata.inputs] == ["image", "pixels"]


def grpc_fault(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value.code(), error.value.details()


def test_faults_reach_the_grpc_client_with_the_code_of_their_status_and_the_rest_routes_sentence(client, stub, pngs):
    def infer(*inputs: triton.InferInput, model: str = MODEL, **options) -> np.ndarray:
        return client.infer(model, list(inputs), **options).as_numpy("probabilities")

    code = grpc.StatusCode
    cases = [
        (lambda: infer(images_input([pngs[0], b"not an image"])), code.INVALID_ARGUMENT, r"^image\[1\]: not an image"),
        (lambda: infer(images_input(pngs[:1]), model="resnet50"), code.NOT_FOUND, r"^unknown model 'resnet50'"),
        (lambda: infer(images_input(pngs[:1]), model_version="2"), code.NOT_FOUND, r"has no version '2'"),
        (lambda: infer(images_input(pngs[:1] * 17)), code.RESOURCE_EXHAUSTED, r"^17 images sent; at most 16"),
        (
            lambda: infer(
                triton.InferInput("pixels", [1, 3, 32, 32], "FP32").set_data_from_numpy(
                    np.zeros((1, 3, 32, 32), np.float32)
                )
            ),
            code.INVALID_ARGUMENT,
            r"must be FP32 of shape \[N, 1, 28, 28\], not FP32 \[1, 3, 32, 32\]$",
        ),
        (
            lambda: infer(
                images_input(pngs[:1]), outputs=[triton.InferRequestedOutput("probabilities", class_count=11)]
            ),
            code.INVALID_ARGUMENT,
            r"classification must be an integer from 0 \(the probabilities\) to 10",
        ),
        (
            lambda: infer(triton.InferInput("image", [1], "INT64").set_data_from_numpy(np.zeros(1, np.int64))),
            code.INVALID_ARGUMENT,
            r"datatype INT64 is not served \(FP32 or BYTES\)",
        ),
        (
            lambda: infer(images_input([b"x" * 300 * 1024])),  # over VIT_MAX_UPLOAD_BYTES, refused by gRPC itself
            code.RESOURCE_EXHAUSTED,
            r"Received message larger than max",
        ),
        (lambda: client.get_model_metadata("resnet50"), code.NOT_FOUND, r"^unknown model 'resnet50'"),
        (lambda: client.get_inference_statistics("resnet50"), code.NOT_FOUND, r"^unknown model 'resnet50'"),
        (
            lambda: client.get_model_repository_index(),
            code.UNIMPLEMENTED,
            r"^Triton's model repository extension is not served",
        ),
        (lambda: client.get_system_shared_memory_status(), code.UNIMPLEMENTED, r"^Triton's shared-memory extension"),
        (lambda: client.get_log_settings(), code.UNIMPLEMENTED, r"^Triton's logging extension"),
    ]
    for call, expected_code, message in cases:
        with pytest.raises(InferenceServerException) as error:
            call()
        assert error.value.status() == str(expected_code) and re.search(message, error.value.message()), error.value
    both = service_pb2.ModelInferRequest(model_name=MODEL, raw_input_contents=[pngs[0]])
    both.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(pngs[0])
    assert grpc_fault(lambda: stub.ModelInfer(both, timeout=30)) == (
        code.INVALID_ARGUMENT,
        "input 'image' has both contents and raw_input_contents; send one",
    )
    unmatched = service_pb2.ModelInferRequest(model_name=MODEL, raw_input_contents=[pngs[0], pngs[1]])
    unmatched.inputs.add(name="image", datatype="BYTES", shape=[1])
    assert grpc_fault(lambda: stub.ModelInfer(unmatched, timeout=30))[0] == code.INVALID_ARGUMENT
    assert infer(images_input(pngs[:1])).shape == (1, 10)  # and the server answers the next one


def test_statistics_over_grpc_are_the_rest_routes_and_count_grpc_infers(server, client, pngs):
    def rest() -> dict:
        (statistics,) = httpx.get(f"{server.base_url}/v2/models/{MODEL}/stats", timeout=10).json()["model_stats"]
        return statistics

    before = rest()
    client.infer(MODEL, [images_input(pngs[:3])])
    with pytest.raises(InferenceServerException):
        client.infer(MODEL, [images_input([b"not an image"])])
    (after,) = client.get_inference_statistics(MODEL).model_stats
    assert after == ParseDict(rest(), service_pb2.ModelStatistics())  # the REST JSON, every field
    assert client.get_inference_statistics().model_stats == [after]  # every model's: the one
    assert after.inference_count - before["inference_count"] == 3  # images
    assert after.inference_stats.success.count - before["inference_stats"]["success"]["count"] == 1
    assert after.inference_stats.fail.count - before["inference_stats"]["fail"]["count"] == 1


def test_the_api_key_is_asked_of_grpc_infer_alone_as_of_the_rest_routes(pngs):
    port = free_port()
    env = {"VIT_DEVICE": "cpu", "VIT_GRPC_PORT": str(port), "VIT_API_KEY": "grpc-secret-1"}
    with running_server(env):
        client = triton.InferenceServerClient(url=f"127.0.0.1:{port}")
        try:
            assert client.is_server_ready() and client.get_model_metadata(MODEL).name == MODEL  # open, as in REST
            for headers, reason in (({}, "no API key"), ({"authorization": "Bearer wrong"}, "a wrong API key")):
                with pytest.raises(InferenceServerException) as error:
                    client.infer(MODEL, [images_input(pngs[:1])], headers=headers)
                assert error.value.status() == str(grpc.StatusCode.UNAUTHENTICATED)
                assert error.value.message().startswith(
                    f"{reason}: this server needs the header 'Authorization: Bearer"
                )
            answer = client.infer(MODEL, [images_input(pngs[:1])], headers={"authorization": "Bearer grpc-secret-1"})
            assert answer.as_numpy("probabilities").shape == (1, 10)
        finally:
            client.close()


def grpc_calls(exposition: str) -> dict[tuple[str, str], float]:
    """vit_grpc_requests_total by (method, code), from a scrape of /metrics."""
    return {
        (sample.labels["method"], sample.labels["code"]): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if sample.name == "vit_grpc_requests_total"
    }


@pytest.mark.parametrize(
    "layout", [{}, {"VIT_MODEL_PROCESS": "true"}], ids=["workers", "front ends of a model process"]
)
def test_every_vit_serve_worker_answers_grpc_on_the_one_port_and_all_their_calls_are_counted_and_logged(layout, pngs):
    """In each of vit-serve's layouts: the model process's is the default on CUDA."""
    port = free_port()
    env = {"VIT_DEVICE": "cpu", "VIT_WORKERS": "2", "VIT_GRPC_PORT": str(port), "VIT_ACCESS_LOG": "true"} | layout
    server = start_server(env, app=None)
    try:
        workers = listening_workers(server, port, 2)  # each bound it, with SO_REUSEPORT
        assert len(workers) == 2, workers
        clients = [triton.InferenceServerClient(url=f"127.0.0.1:{port}") for _ in range(6)]  # a connection each
        try:
            for client in clients:
                assert client.infer(MODEL, [images_input(pngs[:2])]).as_numpy("probabilities").shape == (2, 10)
            with pytest.raises(InferenceServerException):
                clients[0].infer("resnet50", [images_input(pngs[:1])], headers={"x-request-id": "unknown-model-1"})
            [statistics] = clients[1].get_inference_statistics(MODEL).model_stats  # summed over the processes
        finally:
            for client in clients:
                client.close()
        scraped = httpx.get(f"{server.base_url}/metrics", timeout=10).text  # whichever worker answers: the sum
        assert grpc_calls(scraped) == {
            ("ModelInfer", "OK"): 6.0,
            ("ModelInfer", "NOT_FOUND"): 1.0,
            ("ModelStatistics", "OK"): 1.0,
        }
        assert statistics.inference_count == 12 and statistics.inference_stats.success.count == 6
        assert 'vit_grpc_request_duration_seconds_count{method="ModelInfer"} 7.0' in scraped
    finally:
        returncode, output = server.stop()
    assert returncode == 0, output
    assert output.count(f"serving the Open Inference Protocol over gRPC on 127.0.0.1:{port}") == 2, output  # VIT_HOST
    assert len(re.findall(r"127\.0\.0\.1:\d+ - gRPC ModelInfer OK \d+\.\d ms", output)) == 6, output  # VIT_ACCESS_LOG
    assert len(re.findall(r" - gRPC ModelInfer NOT_FOUND \d+\.\d ms unknown-model-1\n", output)) == 1, output


def test_a_grpc_calls_access_line_names_the_client_behind_a_trusted_proxy_as_an_http_requests_does():
    port = free_port()
    env = {"VIT_DEVICE": "cpu", "VIT_WORKERS": "1", "VIT_GRPC_PORT": str(port), "VIT_ACCESS_LOG": "true"}
    forwarded = [("x-forwarded-for", "203.0.113.7")]  # from 127.0.0.1: uvicorn trusts it unless FORWARDED_ALLOW_IPS
    server = start_server(env, app=None)
    try:
        assert httpx.get(f"{server.base_url}/model", headers=dict(forwarded), timeout=10).status_code == 200
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ServerReady(service_pb2.ServerReadyRequest(), metadata=forwarded, timeout=10).ready
            assert stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=10).ready  # no proxy: the peer
    finally:
        returncode, output = server.stop()
    assert returncode == 0, output
    [http_client] = re.findall(r"INFO: +(\S+) - \"GET /model HTTP/1\.1\" 200", output)
    grpc_clients = re.findall(r"INFO: +(\S+) - gRPC ServerReady OK", output)
    assert http_client.startswith("203.0.113.7:"), output
    assert grpc_clients[0] == http_client and re.fullmatch(r"127\.0\.0\.1:\d+", grpc_clients[1]), output


def test_a_grpc_port_that_cannot_be_served_stops_the_start_with_one_line(tmp_path):
    without_grpc = tmp_path / "without_grpc"
    (without_grpc / "grpc").mkdir(parents=True)
    (without_grpc / "grpc" / "__init__.py").write_text("raise ImportError('no grpc here', name='grpc')\n")
    with socket.socket() as taken:  # held by another program, without SO_REUSEPORT
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        for env, line in (
            (
                {"VIT_GRPC_PORT": "8001", "PYTHONPATH": f"{without_grpc}:."},
                r"VIT_GRPC_PORT needs gRPC's packages \(grpc is missing\): pip install 'vit-serving\[grpc\]'",
            ),
            (
                {"VIT_GRPC_PORT": str(taken.getsockname()[1]), "VIT_HOST": "127.0.0.1"},
                r"VIT_GRPC_PORT: cannot listen on 127\.0\.0\.1:\d+: \[Errno 98\] Address already in use$",
            ),
        ):
            with pytest.raises(RuntimeError, match=r"the server exited with 3:") as error:
                start_server({"VIT_DEVICE": "cpu"} | env)
            assert re.search(rf"^ERROR: +cannot start: {line}", str(error.value), re.MULTILINE), error.value
            assert "serving vit-tiny-fashion-mnist from" not in str(error.value)  # before the model loads


def test_an_empty_grpc_port_serves_http_alone_as_a_container_turns_off_the_images_8001():
    with running_server(
        {"VIT_DEVICE": "cpu", "VIT_WORKERS": "1", "VIT_GRPC_PORT": ""}, app=None
    ) as server:  # vit-serve
        assert httpx.get(f"{server.base_url}/health/ready", timeout=10).status_code == 200
        returncode, output = server.stop()
    assert returncode == 0, output
    assert "over gRPC" not in output and "serving vit-tiny-fashion-mnist from" in output


SERVER_SIDE = r"Server: \n\s+Inference count: (\d+)\n.*\n\s+Successful request count: (\d+)"  # read from statistics


def test_perf_analyzer_measures_the_served_model_over_grpc(server, grpc_port, pngs, tmp_path):
    analyzer = shutil.which("perf_analyzer")
    if analyzer is None:
        pytest.skip("perf_analyzer is not installed here (pip install perf-analyzer: Linux with glibc 2.38 or later)")
    tensor = serialize_byte_tensor(np.array(pngs[:1], dtype=object)).item()
    data = tmp_path / "image.json"
    data.write_text(json.dumps({"data": [{"image": {"b64": base64.b64encode(tensor).decode(), "shape": [1]}}]}))
    command = [analyzer, "-m", MODEL, "-i", "grpc", "-u", f"127.0.0.1:{grpc_port}", "--input-data", str(data)]
    command += ["--shape", "image:1", "--shape", "pixels:1,1,28,28"]
    command += ["--measurement-mode", "count_windows", "--measurement-request-count", "20"]
    command += ["--stability-percentage", "1000"]
    for streaming in ([], ["--streaming"]):  # ModelInfer, then ModelStreamInfer
        run = subprocess.run(command + streaming, capture_output=True, text=True, timeout=120, check=False)
        assert run.returncode == 0 and "Throughput:" in run.stdout, run.stdout + run.stderr
        server_side = re.search(SERVER_SIDE, run.stdout)
        assert server_side is not None, run.stdout
        assert int(server_side[1]) >= int(server_side[2]) >= 20
