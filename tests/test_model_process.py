"""VIT_MODEL_PROCESS: front ends that parse and decode, feeding one model process over a Unix socket.

First the model process with front ends played by this test (RemoteBackend clients), then vit-serve
as users run it, on the CPU.
"""

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.batcher import ShuttingDownError
from app.cli import MODEL_SOCKET, ModelProcess
from app.model_protocol import frame, read_messages
from app.remote_backend import RemoteBackend
from app.served import ExplainItem, MapRequest
from model.images import PreprocessConfig, decode_image, image_to_array
from model.metadata import read_metadata
from tests.support.images import image_bytes
from tests.support.server import (
    listening_on_unix_socket,
    listening_workers,
    process_tree,
    running_server,
    survivors,
    torch_loaded,
)

BOOT = (Path(__file__).parents[1] / "examples" / "ankle-boot.png").read_bytes()


@pytest.fixture(scope="module")
def boot_pixels(shipped_checkpoint) -> np.ndarray:
    preprocess = PreprocessConfig.from_dict(read_metadata(shipped_checkpoint)["preprocess"])
    return image_to_array(decode_image(BOOT), preprocess)  # as a front end decodes an upload


@pytest.fixture
def model_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModelProcess]:
    """A model process that waits 300 ms for company in each batch; `failed` says whether it exited unasked."""
    monkeypatch.setenv("VIT_DEVICE", "cpu")
    monkeypatch.setenv("VIT_MAX_WAIT_MS", "300")
    process = ModelProcess(on_unexpected_exit=lambda: None)
    yield process
    process.stop(timeout_s=10)


def connect(process: ModelProcess) -> RemoteBackend:
    return RemoteBackend.connect(process.socket_path, timeout_s=60)


def test_messages_carry_arrays_of_any_dtype_and_shape_and_arrive_whole_and_writable():
    pixels = np.arange(6, dtype=np.uint8).reshape(1, 2, 3)
    others = [
        np.arange(12.0, dtype=np.float32).reshape(3, 4).T,  # not contiguous
        np.frombuffer(b"read-only", dtype=np.uint8),  # as a v2 request's parsed bytes may be
        np.array(0.25),
        np.empty((0, 5), dtype=np.int64),
    ]

    async def round_trip():
        reader = asyncio.StreamReader()
        reader.feed_data(frame([("submit", 7, "predict", pixels, 1.5), ("cancel", 6)]) + frame([("stats", 8, *others)]))
        reader.feed_eof()
        return await read_messages(reader), await read_messages(reader)

    first, [(stats, stats_id, *received)] = asyncio.run(round_trip())
    (kind, request_id, endpoint, item, timeout_s), cancel = first
    assert (kind, request_id, endpoint, timeout_s) == ("submit", 7, "predict", 1.5)
    assert item.dtype == np.uint8 and item.tolist() == [[[0, 1, 2], [3, 4, 5]]]
    item[0, 0, 0] = 9  # an array of its own, writable: torch.as_tensor shares it without a warning
    assert cancel == ("cancel", 6) and (stats, stats_id) == ("stats", 8)
    for sent, arrived in zip(others, received, strict=True):
        assert type(arrived) is np.ndarray and arrived.flags.writeable
        assert arrived.dtype == sent.dtype and arrived.shape == sent.shape and np.array_equal(arrived, sent)


def test_requests_of_two_front_ends_share_one_batch(model_process, boot_pixels):
    async def scenario():
        first, second = await connect(model_process), await connect(model_process)
        probabilities = await asyncio.gather(*(front.submit("predict", boot_pixels, 10) for front in (first, second)))
        explanation = await first.submit("attention", ExplainItem(boot_pixels, MapRequest(method="gradient")), 10)
        stats, metrics = await second.stats(), await second.metrics()
        await first.stop()
        await second.stop()
        return first.model, probabilities, explanation, stats, metrics

    model, probabilities, explanation, stats, metrics = asyncio.run(scenario())
    assert model.name == "vit-tiny-fashion-mnist" and model.description["device"] == "cpu"
    assert probabilities[0] == probabilities[1] and max(range(10), key=probabilities[0].__getitem__) == 9
    assert explanation.target == 9 and explanation.values.shape == (7, 7)
    assert stats["predict"]["batch_size_counts"] == {"2": 1}  # one forward pass for both front ends
    assert b'vit_batch_size_count{batcher="predict"} 1.0' in metrics


def test_a_request_its_front_end_gives_up_is_dropped_before_it_runs(model_process, boot_pixels):
    async def scenario():
        front = await connect(model_process)
        request = asyncio.ensure_future(front.submit("predict", boot_pixels, 10))
        await asyncio.sleep(0.05)  # sent, and waiting in the model process for company
        request.cancel()
        await asyncio.sleep(0.6)  # past the batch window
        stats = await front.stats()
        await front.stop()
        return stats

    stats = asyncio.run(scenario())
    assert stats["predict"]["dropped"] == 1 and stats["predict"]["requests"] == 0


def test_a_request_past_its_timeout_fails_at_its_deadline_and_the_next_one_is_answered(model_process, boot_pixels):
    async def scenario():
        front = await connect(model_process)
        started = time.monotonic()
        late = await asyncio.gather(front.submit("predict", boot_pixels, 0.1), return_exceptions=True)
        waited = time.monotonic() - started
        answered = await front.submit("predict", boot_pixels, 10)  # waits out the model process's 300 ms
        stats = await front.stats()
        await front.stop()
        return late[0], waited, answered, stats

    late, waited, answered, stats = asyncio.run(scenario())
    assert isinstance(late, TimeoutError) and 0.1 <= waited < 0.3  # not the batch window's 300 ms
    assert len(answered) == 10 and stats["predict"]["dropped"] == 1 and stats["predict"]["requests"] == 1


def test_when_the_model_process_dies_waiting_and_later_requests_fail_as_shutting_down(model_process, boot_pixels):
    async def scenario():
        front = await connect(model_process)
        waiting = asyncio.ensure_future(front.submit("predict", boot_pixels, 10))
        await asyncio.sleep(0.05)
        model_process.process.kill()
        outcomes = [await asyncio.gather(waiting, return_exceptions=True)]
        outcomes.append((await asyncio.gather(front.submit("predict", boot_pixels, 10), return_exceptions=True))[0])
        return front.alive, outcomes

    alive, outcomes = asyncio.run(scenario())
    assert not alive
    assert all(isinstance(outcome, ShuttingDownError) for outcome in [outcomes[0][0], outcomes[1]])
    deadline = time.monotonic() + 5
    while not model_process.failed and time.monotonic() < deadline:
        time.sleep(0.05)
    assert model_process.failed


def test_closing_the_lifeline_stops_the_model_process(model_process):
    async def hello():
        await (await connect(model_process)).stop()

    asyncio.run(hello())  # loaded and serving
    started = time.monotonic()
    model_process.stop(timeout_s=10)
    assert model_process.process.exitcode == 0 and time.monotonic() - started < 5
    assert not model_process.failed


VIT_SERVE_WITH_A_MODEL_PROCESS = {"VIT_MODEL_PROCESS": "true", "VIT_WORKERS": "2", "VIT_DEVICE": "cpu"}


def test_vit_serve_answers_through_its_model_process_from_front_ends_without_torch_and_stops_cleanly(fashion_test):
    with running_server(VIT_SERVE_WITH_A_MODEL_PROCESS, app=None) as server:
        members = process_tree(server.process.pid)
        [model_pid] = [pid for pid in members if listening_on_unix_socket(pid, MODEL_SOCKET)]
        front_ends = list(listening_workers(server, server.port, 2))
        assert len(front_ends) == 2 and model_pid not in front_ends
        # The front ends parse, decode and rank with numpy alone: torch is the model process's.
        assert torch_loaded(model_pid) and not any(torch_loaded(pid) for pid in front_ends)
        files = [("file", (f"{i}.png", image_bytes(fashion_test.images[i, 0].numpy()), "image/png")) for i in range(4)]
        predicted = httpx.post(f"{server.base_url}/predict", files=files, timeout=30)
        explained = httpx.post(
            f"{server.base_url}/attention", files={"file": ("boot.png", BOOT, "image/png")}, params={"format": "json"}
        )
        model = httpx.get(f"{server.base_url}/model", timeout=10).json()
        still_without_torch = not any(torch_loaded(pid) for pid in front_ends)
        returncode, output = server.stop()
    assert still_without_torch
    assert predicted.status_code == 200
    labels = fashion_test.labels[:4].tolist()
    assert [result["predictions"][0]["index"] for result in predicted.json()["results"]] == labels
    assert explained.status_code == 200 and explained.json()["target"]["index"] == 9
    assert model["device"] == "cpu" and model["batching"]["stats"]["predict"]["requests"] == 4
    assert returncode == 0, output
    assert "model process: serving vit-tiny-fashion-mnist on cpu" in output
    assert survivors(members) == {}, "a process outlived vit-serve"


def test_vit_serve_stops_with_status_1_when_its_model_process_dies():
    with running_server(VIT_SERVE_WITH_A_MODEL_PROCESS, app=None) as server:
        members = process_tree(server.process.pid)
        [model_pid] = [pid for pid in members if listening_on_unix_socket(pid, MODEL_SOCKET)]
        os.kill(model_pid, signal.SIGKILL)
        returncode = server.process.wait(timeout=15)
    assert returncode == 1
    assert survivors(members) == {}, "a front end outlived vit-serve"
