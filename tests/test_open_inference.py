"""The Open Inference Protocol (KServe v2): Triton's own HTTP client, unmodified, against real uvicorn."""

import base64
import json
import re
import shutil
import struct
import subprocess
import time

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

from app.open_inference import (
    HEADER_LENGTH,
    InferRequest,
    OutputPlan,
    ProtocolError,
    parse_infer_request,
    plan_outputs,
)
from model import DEFAULT_CHECKPOINT
from model.checkpoint import load_checkpoint
from model.images import pixels_to_image
from model.preprocess import preprocess_image
from tests.support.images import image_bytes
from tests.support.models import save_small_checkpoint
from tests.support.server import running_server

MODEL = DEFAULT_CHECKPOINT.stem
IMAGES = 8


@pytest.fixture(scope="module")
def client(server):
    client = triton.InferenceServerClient(url=server.base_url.removeprefix("http://"))
    yield client
    client.close()


@pytest.fixture(scope="module")
def pngs(fashion_test):
    return [image_bytes(fashion_test.images[index, 0].numpy()) for index in range(IMAGES)]


def predict_probabilities(base_url: str, pngs: list[bytes]) -> np.ndarray:
    """What /predict says for the same files, as a (N, classes) array."""
    files = [("file", (f"{index}.png", data, "image/png")) for index, data in enumerate(pngs)]
    response = httpx.post(f"{base_url}/predict", files=files, params={"top_k": 10}, timeout=30)
    assert response.status_code == 200
    rows = np.zeros((len(pngs), 10), dtype=np.float32)
    for row, result in zip(rows, response.json()["results"], strict=True):
        for prediction in result["predictions"]:
            row[prediction["index"]] = prediction["probability"]
    return rows


def predict_requests(base_url: str) -> int:
    return httpx.get(f"{base_url}/model", timeout=10).json()["batching"]["stats"]["predict"]["requests"]


def test_health_and_metadata_through_the_triton_client(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")
    assert not client.is_model_ready("resnet50")
    server = client.get_server_metadata()
    assert {"binary_tensor_data", "classification"} <= set(server["extensions"])
    metadata = client.get_model_metadata(MODEL)
    assert metadata["name"] == MODEL and metadata["versions"] == ["1"]
    assert {(tensor["name"], tensor["datatype"]) for tensor in metadata["inputs"]} == {
        ("image", "BYTES"),
        ("pixels", "FP32"),
    }
    assert metadata["inputs"][1]["shape"] == [-1, 1, 28, 28]
    assert metadata["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]


def test_encoded_images_as_binary_bytes_match_predict_and_share_its_batcher(server, client, pngs, fashion_test):
    before = predict_requests(server.base_url)
    image = triton.InferInput("image", [IMAGES], "BYTES")
    image.set_data_from_numpy(np.array(pngs, dtype=object))  # binary tensor data, the client's default
    result = client.infer(MODEL, [image], request_id="batch-7")
    probabilities = result.as_numpy("probabilities")
    assert probabilities.dtype == np.float32 and probabilities.shape == (IMAGES, 10)
    assert result.get_response()["id"] == "batch-7"
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert np.allclose(probabilities, predict_probabilities(server.base_url, pngs), atol=1e-6)
    assert (probabilities.argmax(axis=1) == fashion_test.labels[:IMAGES].numpy()).mean() >= 0.75
    assert predict_requests(server.base_url) - before == 2 * IMAGES  # v2's images and /predict's, one batcher


def test_preprocessed_fp32_tensor_as_json_gives_the_same_probabilities(client, pngs, fashion_test):
    preprocess = load_checkpoint(DEFAULT_CHECKPOINT).preprocess
    tensor = np.stack(
        [preprocess_image(pixels_to_image(pixels), preprocess).numpy() for pixels in fashion_test.images[:IMAGES]]
    )
    pixels = triton.InferInput("pixels", list(tensor.shape), "FP32")
    pixels.set_data_from_numpy(tensor, binary_data=False)
    as_json = client.infer(MODEL, [pixels], outputs=[triton.InferRequestedOutput("probabilities", binary_data=False)])
    image = triton.InferInput("image", [IMAGES], "BYTES")
    image.set_data_from_numpy(np.array(pngs, dtype=object))
    from_images = client.infer(MODEL, [image]).as_numpy("probabilities")
    assert "data" in as_json.get_output("probabilities")  # answered in JSON, as asked
    assert np.allclose(as_json.as_numpy("probabilities"), from_images, atol=1e-5)


def test_classification_extension_gives_the_top_k_as_labels(client, pngs):
    image = triton.InferInput("image", [IMAGES], "BYTES")
    image.set_data_from_numpy(np.array(pngs, dtype=object))
    plain = client.infer(MODEL, [image]).as_numpy("probabilities")
    classes = load_checkpoint(DEFAULT_CHECKPOINT).classes
    for binary in (True, False):
        top = client.infer(
            MODEL, [image], outputs=[triton.InferRequestedOutput("probabilities", binary_data=binary, class_count=3)]
        )
        labels = top.as_numpy("probabilities")
        assert labels.shape == (IMAGES, 3)
        for row, entries in zip(plain, labels, strict=True):
            parsed = [(entry.decode() if binary else entry).split(":") for entry in entries]  # JSON gives str
            assert [int(index) for _, index, _ in parsed] == np.argsort(-row)[:3].tolist()
            assert [label for _, _, label in parsed] == [classes[int(index)] for _, index, _ in parsed]
            assert float(parsed[0][0]) == pytest.approx(row.max(), abs=1e-6)


def test_the_model_configuration_gives_triton_clients_the_metadatas_tensors_with_their_batch_dimension(client):
    config = client.get_model_config(MODEL)  # was: [404] Triton's model configuration extension is not served here
    assert config == client.get_model_config(MODEL, "1")
    assert (config["name"], config["platform"], config["max_batch_size"]) == (MODEL, "pytorch", 0)
    assert config["input"] == [  # either may be left out of a request, which sends one of them
        {"name": "image", "data_type": "TYPE_STRING", "dims": [-1], "optional": True},
        {"name": "pixels", "data_type": "TYPE_FP32", "dims": [-1, 1, 28, 28], "optional": True},
    ]
    assert config["output"] == [{"name": "probabilities", "data_type": "TYPE_FP32", "dims": [-1, 10]}]
    metadata = client.get_model_metadata(MODEL)  # max_batch_size 0: the shapes are whole, the metadata's
    assert [t["dims"] for t in config["input"] + config["output"]] == [
        t["shape"] for t in metadata["inputs"] + metadata["outputs"]
    ]
    assert "model_configuration" in client.get_server_metadata()["extensions"]
    for call in (lambda: client.get_model_config("resnet50"), lambda: client.get_model_config(MODEL, "2")):
        with pytest.raises(InferenceServerException, match=r"^\[404\] "):
            call()


def test_perf_analyzer_loads_the_served_model_with_the_configuration_it_reads(server, pngs, tmp_path):
    analyzer = shutil.which("perf_analyzer")
    if analyzer is None:
        pytest.skip("perf_analyzer is not installed here (pip install perf-analyzer: Linux with glibc 2.38 or later)")
    tensor = serialize_byte_tensor(np.array(pngs[:1], dtype=object)).item()  # its b64 is binary tensor data
    data = tmp_path / "image.json"
    data.write_text(json.dumps({"data": [{"image": {"b64": base64.b64encode(tensor).decode(), "shape": [1]}}]}))
    before = predict_requests(server.base_url)
    command = [analyzer, "-m", MODEL, "-u", server.base_url.removeprefix("http://"), "--input-data", str(data)]
    command += ["--shape", "image:1", "--shape", "pixels:1,1,28,28"]  # every input needs a shape, even one not sent
    command += ["--measurement-mode", "count_windows", "--measurement-request-count", "20"]
    command += ["--stability-percentage", "1000"]  # a measurement, not a stable one, on a busy machine
    run = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0 and "Throughput:" in run.stdout, run.stdout + run.stderr
    assert predict_requests(server.base_url) - before >= 20  # answered, through the batcher of /predict
    server_side = re.search(r"Server: \n\s+Inference count: (\d+)\n.*\n\s+Successful request count: (\d+)", run.stdout)
    assert server_side is not None, run.stdout  # from the statistics it read before and after its measurement
    assert int(server_side[1]) >= int(server_side[2]) >= 20
    assert re.search(r"Avg request latency: \d+ usec \(overhead \d+ usec \+ queue \d+ usec", run.stdout)


def statistics_of(client, *version: str) -> dict:
    (statistics,) = client.get_inference_statistics(MODEL, *version)["model_stats"]
    return statistics


def test_statistics_count_infer_requests_and_their_images_as_perf_analyzer_reads_them(server, client, pngs):
    """Triton's statistics extension, through tritonclient: each figure moves by what was sent, and the three
    compute counts stay equal, which perf_analyzer requires (it stops where they differ)."""
    assert "statistics" in client.get_server_metadata()["extensions"]
    before, sent_at = statistics_of(client), time.time()
    images = triton.InferInput("image", [3], "BYTES")
    images.set_data_from_numpy(np.array(pngs[:3], dtype=object))
    client.infer(MODEL, [images])
    broken = triton.InferInput("image", [1], "BYTES")
    broken.set_data_from_numpy(np.array([b"not an image"], dtype=object))
    with pytest.raises(InferenceServerException):
        client.infer(MODEL, [broken])
    predict_probabilities(server.base_url, pngs[:2])  # /predict shares the batcher, not the infer route
    after = statistics_of(client)
    assert after == statistics_of(client, "1") == client.get_inference_statistics()["model_stats"][0]
    assert after["name"] == MODEL and after["version"] == "1" and after["batch_stats"] == []

    def moved(key: str) -> int:
        return after["inference_stats"][key]["count"] - before["inference_stats"][key]["count"]

    assert after["inference_count"] - before["inference_count"] == 5  # images: three, and /predict's two
    assert 2 <= after["execution_count"] - before["execution_count"] <= 5
    assert (moved("success"), moved("fail"), moved("queue"), moved("compute_infer")) == (1, 1, 5, 5)
    assert moved("compute_input") == moved("compute_infer") == moved("compute_output")
    assert after["inference_stats"]["success"]["ns"] > before["inference_stats"]["success"]["ns"]
    assert after["inference_stats"]["compute_infer"]["ns"] > before["inference_stats"]["compute_infer"]["ns"]
    assert after["inference_stats"]["compute_input"]["ns"] == 0  # within compute_infer, not timed apart
    assert after["inference_stats"]["cache_hit"] == {"count": 0, "ns": 0}  # no response cache
    assert sent_at * 1000 - 1000 <= after["last_inference"] <= time.time() * 1000
    for call in (lambda: client.get_inference_statistics("resnet50"), lambda: statistics_of(client, "2")):
        with pytest.raises(InferenceServerException, match=r"^\[404\] "):
            call()


def test_errors_reach_the_client_with_status_and_message(client, pngs):
    image = triton.InferInput("image", [2], "BYTES")
    image.set_data_from_numpy(np.array([pngs[0], b"not an image"], dtype=object))
    with pytest.raises(InferenceServerException, match="image\\[1\\]: not an image") as error:
        client.infer(MODEL, [image])
    assert error.value.status() == "400"
    with pytest.raises(InferenceServerException, match="unknown model 'resnet50'") as error:
        client.infer("resnet50", [image])
    assert error.value.status() == "404"
    wrong = triton.InferInput("pixels", [1, 3, 32, 32], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 3, 32, 32), dtype=np.float32))
    with pytest.raises(
        InferenceServerException, match=r"must be FP32 of shape \[N, 1, 28, 28\], not FP32 \[1, 3, 32, 32\]$"
    ):
        client.infer(MODEL, [wrong])
    pairs = triton.InferInput("image", [1, 2], "BYTES")
    pairs.set_data_from_numpy(np.array([pngs[:2]], dtype=object))
    with pytest.raises(InferenceServerException, match=r"one encoded image each, not BYTES \[1, 2\]$"):
        client.infer(MODEL, [pairs])
    good = triton.InferInput("image", [1], "BYTES")
    good.set_data_from_numpy(np.array(pngs[:1], dtype=object))
    with pytest.raises(
        InferenceServerException, match=r"classification must be an integer from 0 \(the probabilities\) to 10"
    ):
        client.infer(MODEL, [good], outputs=[triton.InferRequestedOutput("probabilities", class_count=11)])


def test_answers_made_before_any_route_runs_reach_the_triton_client_as_its_errors(server, client, pngs):
    """The router's 404 and 405, and the 413 of a body over VIT_MAX_UPLOAD_BYTES, in the protocol's shape: the
    client reads the key "error", and of FastAPI's "detail" said only "an exception occurred in the client"."""
    served = (
        "this server answers the Open Inference Protocol's health, model metadata (GET /v2/models/NAME) and infer "
        "routes, and Triton's model configuration and statistics"
    )
    for call, extension in [  # Triton's extensions, not served, by name: each was "[404] Not Found"
        (client.get_model_repository_index, "model repository"),
        (client.get_system_shared_memory_status, "shared-memory"),
        (client.get_log_settings, "logging"),
    ]:
        with pytest.raises(InferenceServerException) as error:
            call()
        assert str(error.value) == f"[404] Triton's {extension} extension is not served here; {served}"
    unknown = httpx.get(f"{server.base_url}/v2/models/{MODEL}/labels", timeout=10)
    assert unknown.status_code == 404 and unknown.json() == {"error": "Not Found"}
    image = triton.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([pngs[0] + bytes(10 * 1024 * 1024)], dtype=object))
    with pytest.raises(InferenceServerException) as error:
        client.infer(MODEL, [image])
    assert str(error.value) == "[413] request body is larger than the limit of 10485760 bytes"
    wrong_method = httpx.get(f"{server.base_url}/v2/models/{MODEL}/infer", timeout=10)
    assert wrong_method.status_code == 405 and wrong_method.json() == {"error": "Method Not Allowed"}
    elsewhere = httpx.get(f"{server.base_url}/v2model", timeout=10)  # a path that only begins with the prefix's letters
    assert elsewhere.status_code == 404 and elsewhere.json() == {"detail": "Not Found"}


def test_plain_json_with_base64_images_and_bad_bodies_over_http(server, pngs):
    url = f"{server.base_url}/v2/models/{MODEL}/infer"
    request = {
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(pngs[0]).decode()]}]
    }
    answer = httpx.post(url, json=request, timeout=30)
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    output = answer.json()["outputs"][0]
    assert output["shape"] == [1, 10] and len(output["data"]) == 10
    for body, message in [
        (b"{", "not a valid inference request"),
        (json.dumps({"inputs": []}).encode(), "exactly one input"),
        (
            json.dumps(
                {"inputs": [{"name": "pixels", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0]}]}
            ).encode(),
            "needs 784 elements",
        ),
        (
            json.dumps(
                {"inputs": [{"name": "pixels", "shape": [1, 1, 28, 28], "datatype": "INT64", "data": [0] * 784}]}
            ).encode(),
            "INT64 is not served",
        ),
        *(
            (
                json.dumps(
                    {"inputs": [{"name": "pixels", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [value] * 784}]}
                ).encode(),
                "must be numbers, not strings, true, false or null",
            )
            for value in ("0.5", True, None)
        ),
        *(  # Python's reasons: "argument should be a bytes-like object or ASCII string, not 'int'"
            (
                json.dumps(
                    {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [value]}]}
                ).encode(),
                message,
            )
            for value, message in [
                (123, "its elements must be base64 strings, not numbers"),
                ("iVBORw0K!", "an element is not base64 (Only base64 data is allowed): 'iVBORw0K!'"),
                (  # what a browser's FileReader.readAsDataURL gives
                    "data:image/png;base64," + base64.b64encode(pngs[0]).decode(),
                    "an element is a data: URL; send only the base64 after its 'base64,'",
                ),
            ]
        ),
    ]:
        response = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=30)
        assert response.status_code == 400 and message in response.json()["error"], (message, response.text)
    not_ready = httpx.get(f"{server.base_url}/v2/models/{MODEL}/versions/2/ready", timeout=10)
    assert not_ready.status_code == 404 and "no version '2'" in not_ready.json()["error"]


def test_inputs_that_once_answered_500_get_400_and_no_answer_holds_nan(server):
    url = f"{server.base_url}/v2/models/{MODEL}/infer"
    pixels = lambda shape, data: {"inputs": [{"name": "pixels", "shape": shape, "datatype": "FP32", "data": data}]}
    cases = [
        # numpy's int64 product of this shape wraps around to 0, which an empty data list matched
        (pixels([4294967296, 4294967296], []), {}, "needs 18446744073709551616 elements, got 0"),
        (pixels([1, 1, 28, 28], [3.4e38] * 784), {}, "gave non-finite probabilities"),
        ({}, {HEADER_LENGTH: "9" * 5000}, "(5000 chars)"),  # past int()'s 4,300 digits
        ({}, {HEADER_LENGTH: b"\xb2"}, "'\u00b2' is not a length"),  # latin-1 for "²", which isdigit() takes
    ]
    for body, headers, message in cases:
        response = httpx.post(url, content=json.dumps(body).encode(), headers=headers, timeout=30)
        assert response.status_code == 400, (message, response.text)
        assert message in response.json()["error"], (message, response.text)
        assert "NaN" not in response.text


def binary_request(header: dict, blob: bytes) -> tuple[bytes, str]:
    encoded = json.dumps(header).encode()
    return encoded + blob, str(len(encoded))


def test_binary_bodies_are_checked_against_their_declared_sizes():
    element = b"\x89PNG"
    blob = struct.pack("<I", len(element)) + element
    header = {
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": len(blob)}}]
    }
    request, inputs = parse_infer_request(*binary_request(header, blob))
    assert inputs[0].values.tolist() == [element] and request.outputs is None
    cases = [
        (binary_request(header, blob[:-1]), "runs past the end of the body"),
        (binary_request(header, blob + b"x"), "1 bytes after the JSON header belong to no input"),
        ((b"{}", "99"), f"{HEADER_LENGTH} '99' is not a length"),
        (
            binary_request(
                header | {"inputs": [header["inputs"][0] | {"parameters": {"binary_data_size": 6}}]}, blob[:6]
            ),
            "BYTES element of 4 bytes runs past its data \\(each element is its length in 4 bytes, little-endian",
        ),
        (  # the bytes were used, and the JSON values dropped without a word
            binary_request(header | {"inputs": [header["inputs"][0] | {"data": ["iVBORw=="]}]}, blob),
            "input 'image' has both data and binary_data_size; send one",
        ),
    ]
    for (body, length), message in cases:
        with pytest.raises(ProtocolError, match=message) as error:
            parse_infer_request(body, length)
        assert error.value.status == 400


def test_json_true_is_not_an_integer_and_classification_zero_asks_for_the_probabilities():
    blob = np.zeros(1, dtype="<f4").tobytes()
    header = {
        "inputs": [{"name": "pixels", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": True}}]
    }
    with pytest.raises(ProtocolError, match="binary_data_size must be a byte count, got True"):
        parse_infer_request(*binary_request(header, blob))
    asking = lambda value: InferRequest.model_validate(
        {"inputs": [], "outputs": [{"name": "probabilities", "parameters": {"classification": value}}]}
    )
    with pytest.raises(ProtocolError, match="got True"):
        plan_outputs(asking(True), 10)
    assert [plan.top_k for plan in plan_outputs(asking(0), 10)] == [0]


def test_outputs_are_asked_for_once_with_json_booleans_and_an_empty_list_asks_for_all_as_in_triton():
    asking = lambda outputs, **parameters: InferRequest.model_validate(
        {"inputs": [], "parameters": parameters, "outputs": outputs}
    )
    probabilities = {"name": "probabilities"}
    assert plan_outputs(asking([]), 10) == plan_outputs(asking(None), 10) == [OutputPlan(binary=False, top_k=0)]
    assert plan_outputs(asking(None, binary_data_output=True), 10) == [OutputPlan(binary=True, top_k=0)]
    for request, message in [
        (asking([probabilities | {"parameters": {"binary_data": "false"}}]), "binary_data must be true or false"),
        (asking(None, binary_data_output=1), "binary_data_output must be true or false, got 1"),
        (asking([probabilities, probabilities | {"parameters": {"classification": 3}}]), "asked for 2 times"),
        (asking([probabilities, {"name": "logits"}]), "unknown output 'logits'"),
    ]:
        with pytest.raises(ProtocolError, match=message) as error:
            plan_outputs(request, 10)
        assert error.value.status == 400


def test_no_error_sends_back_more_than_a_line_of_what_the_request_held():
    long = "x" * 1_000_000
    pixels = {"name": "pixels", "shape": [1], "datatype": "FP32", "data": [0.0]}
    cases = [
        ({"inputs": [pixels | {"name": long}]}, "inputs.0.name: String should have at most 256 characters"),
        ({"inputs": [pixels | {"datatype": long}]}, "inputs.0.datatype: String should have at most 16 characters"),
        ({"inputs": [pixels | {"shape": [1] * 100_000}]}, "inputs.0.shape: List should have at most 8 items"),
        ({"inputs": [pixels | {"parameters": {"binary_data_size": long}}]}, "must be a byte count, got 'xxx"),
    ]
    for body, message in cases:
        with pytest.raises(ProtocolError, match=re.escape(message)) as error:
            parse_infer_request(json.dumps(body).encode(), None)
        assert len(str(error.value)) < 300
    asking = InferRequest.model_validate({"inputs": [], "outputs": [{"name": "probabilities"}], "parameters": {}})
    for parameters in ({"classification": long}, {"binary_data": long}):
        asking.outputs[0].parameters = parameters
        with pytest.raises(ProtocolError, match=r"got 'x+\.\.\. \(1000002 characters\)$"):
            plan_outputs(asking, 10)


def test_an_unknown_model_name_or_version_of_any_length_gets_a_404_of_a_line(server):
    long = "x" * 10_000  # a path within the 16 KiB of request line and headers
    for path in (f"/v2/models/{long}/ready", f"/v2/models/{MODEL}/versions/{long}/ready"):
        answer = httpx.get(f"{server.base_url}{path}", timeout=10)
        assert answer.status_code == 404
        assert "(10002 characters)" in answer.json()["error"] and len(answer.content) < 300, answer.text[:300]


def test_a_model_named_with_an_accent_is_found_in_either_unicode_form_and_answers_in_the_typed_one(tmp_path, pngs):
    typed, pasted = "Caf\u00e9", "Cafe\u0301"  # "Café", as a keyboard types it and as a Mac names the file
    checkpoint = save_small_checkpoint(tmp_path / f"{pasted}.safetensors")
    with running_server({"VIT_CHECKPOINT": str(checkpoint), "VIT_WORKERS": "1"}) as server:
        client = triton.InferenceServerClient(url=server.base_url.removeprefix("http://"))
        try:
            ready = [client.is_model_ready(name) for name in (typed, pasted)]  # was: unknown model 'Café'
            named = [client.get_model_metadata(name)["name"] for name in (typed, pasted)]
            image = triton.InferInput("image", [1], "BYTES")
            image.set_data_from_numpy(np.array(pngs[:1], dtype=object))
            answered = client.infer(pasted, [image]).get_response()["model_name"]
        finally:
            client.close()
        predicted = httpx.post(f"{server.base_url}/predict", files={"file": ("0.png", pngs[0])}, timeout=30).json()
    assert ready == [True, True]
    assert named == [typed, typed] and answered == typed and predicted["model"] == typed
