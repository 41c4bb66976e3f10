"""Start-up failures, overload and graceful drain, through real uvicorn on loopback."""

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model.metadata import file_sha256
from tests.support.images import image_bytes, jpeg_with_repeated_scans
from tests.support.raw_http import multipart_request
from tests.support.server import (
    children,
    command_line,
    cpu_seconds,
    free_port,
    listening_workers,
    process_tree,
    running_server,
    torch_loaded,
    uvicorn_command,
    vit_serve_command,
    wait_in_flight,
)


def start_and_fail(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        uvicorn_command(), check=False, env=os.environ | env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    "checkpoint, expected",
    [("/nonexistent/model.safetensors", "no such checkpoint file"), ("README.md", "not a readable .safetensors file")],
)
def test_a_missing_or_corrupt_checkpoint_stops_start_up_with_one_clear_message(checkpoint, expected):
    result = start_and_fail({"VIT_CHECKPOINT": checkpoint})
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert output.count(expected) == 1, output
    assert "Traceback" not in output


@pytest.mark.parametrize(
    "env, expected",
    [
        (
            {"VIT_PORT": "eighty", "VIT_API_KEY": " s3cret "},
            [
                "cannot start: VIT_PORT='eighty': Input should be a valid integer, unable to parse string as an "
                + "integer",
                "cannot start: VIT_API_KEY=(hidden): Value error, empty, or with spaces around it, so that no client "
                + "can send it; unset it for no key",
            ],
        ),
        (
            {"VIT_DEVICE": "cpu", "VIT_PRECISION": "fp16"},
            ["cannot start: VIT_PRECISION=fp16 runs on CUDA only; on the CPU, bf16 is the mixed precision"],
        ),
    ],
    ids=["invalid", "ruled out by the device"],
)
def test_settings_that_plain_uvicorn_cannot_serve_with_stop_it_in_one_line_each(env, expected):
    # vit-serve checks them before any process starts; under uvicorn, the app's start-up says the same
    result = start_and_fail(env)
    assert result.returncode == 3  # uvicorn's start-up failure
    output = result.stdout + result.stderr
    assert "Traceback" not in output and "s3cret" not in output, output
    assert [line.removeprefix("ERROR:    ") for line in output.splitlines() if "cannot start" in line] == expected


def test_vit_serve_names_the_users_checkpoint_file_when_its_metadata_is_unusable(tmp_path, small_checkpoint):
    with safe_open(str(small_checkpoint), framework="pt") as handle:
        metadata = handle.metadata() | {"classes": '"abcdefghij"'}
    edited = tmp_path / "edited.safetensors"
    save_file(load_file(str(small_checkpoint)), str(edited), metadata=metadata)
    command, command_env = vit_serve_command(free_port())
    env = os.environ | command_env | {"VIT_CHECKPOINT": str(edited), "VIT_DEVICE": "cpu", "TMPDIR": str(tmp_path)}
    result = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert output.count(f"cannot start: {edited}: classes must be a list of names") == 1, output
    assert "Traceback" not in output and sorted(tmp_path.iterdir()) == [edited], "a worker started or left files"


def test_a_checkpoint_with_the_wrong_sha256_is_refused(shipped_checkpoint):
    result = start_and_fail({"VIT_CHECKPOINT_SHA256": "0" * 64})
    assert result.returncode != 0
    assert "sha256 differs from VIT_CHECKPOINT_SHA256" in result.stdout + result.stderr


def test_the_right_sha256_is_accepted(shipped_checkpoint):
    with running_server({"VIT_CHECKPOINT_SHA256": file_sha256(shipped_checkpoint)}) as server:
        assert httpx.get(f"{server.base_url}/health/ready").status_code == 200


def test_overload_answers_503_with_retry_after_and_recovers(fashion_test):
    image = image_bytes(fashion_test.images[0, 0].numpy())

    async def burst(base_url: str):
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:
            send = lambda: client.post("/predict", files={"file": ("x.png", image, "image/png")})
            responses = await asyncio.gather(*(send() for _ in range(200)))
            after = await send()
            return responses, after

    with running_server({"VIT_QUEUE_SIZE": "8", "VIT_MAX_BATCH_SIZE": "4", "VIT_DEVICE": "cpu"}) as server:
        responses, after = asyncio.run(burst(server.base_url))
    statuses = [response.status_code for response in responses]
    overloaded = [response for response in responses if response.status_code == 503]
    assert overloaded, "a queue of 8 never filled under 200 concurrent requests"
    assert all(response.headers.get("retry-after") for response in overloaded)
    assert set(statuses) <= {200, 503}
    assert statuses.count(200) >= 8
    assert after.status_code == 200


@pytest.mark.parametrize("model_process", [False, True], ids=["in the worker", "in a model process"])
def test_a_request_not_answered_within_the_timeout_gets_504_at_its_deadline(fashion_test, model_process):
    """Each batch waits 2 s for company, far past the 0.3 s that a request may take."""
    image = image_bytes(fashion_test.images[0, 0].numpy())
    env = {"VIT_REQUEST_TIMEOUT_S": "0.3", "VIT_MAX_WAIT_MS": "2000", "VIT_DEVICE": "cpu", "VIT_WORKERS": "1"}
    env["VIT_MODEL_PROCESS"] = str(model_process).lower()
    with running_server(env, app=None) as server:
        started = time.monotonic()
        late = httpx.post(f"{server.base_url}/predict", files={"file": ("x.png", image, "image/png")}, timeout=30)
        waited = time.monotonic() - started
        ready = httpx.get(f"{server.base_url}/health/ready", timeout=10)
    assert late.status_code == 504 and late.json()["detail"] == "no result within 0.3 s"
    assert 0.3 <= waited < 1.5
    assert ready.status_code == 200


def test_sigterm_drains_accepted_requests_and_exits_cleanly(fashion_test):
    image = image_bytes(fashion_test.images[0, 0].numpy())
    results: list[int] = []
    # Batches wait 2 s for company, so the burst is still in flight when SIGTERM arrives.
    with running_server(
        {"VIT_MAX_WAIT_MS": "2000", "VIT_MAX_BATCH_SIZE": "64", "VIT_SHUTDOWN_GRACE_S": "10"}
    ) as server:

        def post() -> None:
            response = httpx.post(
                f"{server.base_url}/predict", files={"file": ("x.png", image, "image/png")}, timeout=30
            )
            results.append(response.status_code)

        threads = [threading.Thread(target=post) for _ in range(16)]
        for thread in threads:
            thread.start()
        wait_in_flight(server, 16)  # all accepted
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        readiness = httpx.get(f"{server.base_url}/health/ready", timeout=5)
        late = httpx.post(f"{server.base_url}/predict", files={"file": ("x.png", image, "image/png")}, timeout=5)
        for thread in threads:
            thread.join(timeout=15)
        returncode, output = server.stop(timeout_s=15)
    assert readiness.status_code == 503
    assert late.status_code == 503 and late.headers.get("retry-after")
    assert results == [200] * 16  # every accepted request finished
    assert returncode in (0, -signal.SIGTERM), output
    assert time.monotonic() - started < 10
    assert "Application shutdown complete" in output


def test_work_of_a_client_that_disconnected_is_dropped_before_it_runs(fashion_test):
    head, body = multipart_request(image_bytes(fashion_test.images[0, 0].numpy()))
    with running_server({"VIT_MAX_WAIT_MS": "500", "VIT_MAX_BATCH_SIZE": "64"}) as server:
        address = urlparse(server.base_url)
        with socket.create_connection((address.hostname, address.port)) as sock:
            sock.sendall(head + body)
            time.sleep(0.1)  # accepted and waiting for company in the batcher
        time.sleep(1.0)  # the batch window has passed
        stats = httpx.get(f"{server.base_url}/model").json()["batching"]["stats"]["predict"]
    assert stats["dropped"] == 1 and stats["requests"] == 0


def spawned_workers(server_pid: int) -> list[int]:
    """The uvicorn workers of a vit-serve: its children with a spawn command line (not multiprocessing's resource
    tracker), not theirs (decoder processes)."""
    return [pid for pid in children(server_pid) if "spawn_main" in command_line(pid)]


@pytest.mark.parametrize("change", ["replaced by another model", "truncated"])
def test_a_restarted_worker_serves_the_checkpoint_the_server_started_with(
    change, tmp_path, shipped_checkpoint, small_checkpoint
):
    checkpoint = tmp_path / "model.safetensors"
    shutil.copyfile(shipped_checkpoint, checkpoint)
    env = {"VIT_CHECKPOINT": str(checkpoint), "VIT_WORKERS": "2", "VIT_DEVICE": "cpu"}
    with running_server(env, app=None) as server:
        digest = httpx.get(f"{server.base_url}/model", timeout=10).json()["checkpoint_sha256"]
        if change == "truncated":
            checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
        else:
            shutil.copyfile(small_checkpoint, checkpoint)
        listening_workers(server, server.port, 2)
        time.sleep(2)  # the supervisor has seen both serve: one killed while starting up would stop it
        killed = spawned_workers(server.process.pid)[0]
        os.kill(killed, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:  # uvicorn starts a new worker, which loads the model and serves
            workers = spawned_workers(server.process.pid)
            if killed not in workers and len(workers) == 2 and all(torch_loaded(pid) for pid in workers):
                break
            assert time.monotonic() < deadline, f"no worker took the place of the killed one: {workers}"
            time.sleep(0.2)
        time.sleep(3)  # loaded and warmed up; a worker that failed its start would have been replaced by now
        assert spawned_workers(server.process.pid) == workers, "a worker keeps restarting"
        answers = [httpx.get(f"{server.base_url}/model", timeout=10) for _ in range(40)]  # a connection each
    assert {answer.status_code for answer in answers} == {200}
    assert {answer.json()["checkpoint_sha256"] for answer in answers} == {digest}


def connection_outcome(base_url: str) -> str:
    """What a new client meets: an answer, a refusal, or nothing (left hanging in the backlog)."""
    try:
        httpx.get(f"{base_url}/health/live", timeout=2)
        return "answered"
    except httpx.TimeoutException:
        return "hanging"
    except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
        return "refused"  # or reset: accepted into the backlog just before the last listener closed


def test_sigterm_exits_within_the_grace_period_whatever_the_clients_do(shipped_checkpoint):
    grace_s = 4
    env = {"VIT_WORKERS": "2", "VIT_DEVICE": "cpu", "VIT_SHUTDOWN_GRACE_S": str(grace_s)}
    with running_server(env, app=None) as server:
        address = urlparse(server.base_url)
        trickling = socket.create_connection((address.hostname, address.port))
        trickling.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 100000\r\n\r\n--b\r\n"
        )
        half_headers = socket.create_connection((address.hostname, address.port))
        half_headers.sendall(b"GET /model HTTP/1.1\r\nHost: x\r\nAcc")
        stop_trickling = threading.Event()

        def trickle() -> None:  # one byte every 0.2 s, for as long as the server reads
            while not stop_trickling.wait(0.2):
                try:
                    trickling.sendall(b"x")
                except OSError:
                    return

        threading.Thread(target=trickle, daemon=True).start()
        time.sleep(0.5)
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        outcomes = []
        while server.process.poll() is None and time.monotonic() - started < grace_s + 10:
            outcomes.append(connection_outcome(server.base_url))
        exited_after_s = time.monotonic() - started
        stop_trickling.set()
        returncode, output = server.stop(timeout_s=15)
        trickling.close()
        half_headers.close()
    assert exited_after_s < grace_s + 1.5, output
    assert returncode in (0, -signal.SIGTERM), output
    assert "hanging" not in outcomes, outcomes


@pytest.mark.parametrize("model_process", [False, True], ids=["workers", "a model process"])
def test_vit_serve_whose_workers_cannot_start_exits_in_one_line_per_process_instead_of_restarting_them(
    tmp_path, small_checkpoint, model_process
):
    with safe_open(str(small_checkpoint), framework="pt") as handle:
        metadata = handle.metadata()  # sound, so vit-serve starts its workers; they fail as they load the weights
    tensors = load_file(str(small_checkpoint))
    del tensors["head.bias"]
    damaged = tmp_path / "model.safetensors"
    save_file(tensors, str(damaged), metadata=metadata)
    command, env = vit_serve_command(free_port())
    env |= {"VIT_CHECKPOINT": str(damaged), "VIT_WORKERS": "2", "VIT_DEVICE": "cpu"}
    env["VIT_MODEL_PROCESS"] = str(model_process).lower()
    result = subprocess.run(command, env=os.environ | env, capture_output=True, text=True, timeout=60, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "a worker failed to start" in output
    assert "Traceback" not in output, output  # each process used to log two screens of them
    mismatch = (
        "weights do not match the stored config: Error(s) in loading state_dict for VisionTransformer: "
        'Missing key(s) in state_dict: "head.bias".'
    )
    assert output.count(mismatch) == (1 if model_process else 2), output  # each process that loads the model
    front_ends_told = output.count("cannot start: the model process exited while loading the model")
    assert front_ends_told == (2 if model_process else 0), output


GRAY = np.full((28, 28), 128, dtype=np.uint8)


@pytest.mark.parametrize("killer", [signal.SIGKILL, signal.SIGSEGV])
def test_vit_serve_whose_worker_is_killed_while_starting_up_stops_and_says_so_instead_of_restarting_it(
    tmp_path, killer
):
    command, env = vit_serve_command(free_port())
    # Each worker waits at its start-up for a model process that never comes, as for one loading a large model.
    env |= {"VIT_WORKERS": "2", "VIT_DEVICE": "cpu", "VIT_MODEL_SOCKET": str(tmp_path / "model.sock")}
    env["VIT_SHUTDOWN_GRACE_S"] = "2"
    process = subprocess.Popen(
        command, env=os.environ | env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 30
        while len(workers := spawned_workers(process.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(workers[0], killer)  # as the kernel's out-of-memory killer does, or a crash in native code
        output, _ = process.communicate(timeout=30)  # uvicorn alone restarted the worker and served on
    finally:
        for pid in process_tree(process.pid):
            os.kill(pid, signal.SIGKILL)
    assert process.returncode == 1, output
    assert f"worker [{workers[0]}] was killed by {killer.name} while starting up" in output
    assert ("when memory runs out" in output) == (killer == signal.SIGKILL), output  # no memory hint for a crash
    assert "died" not in output, output  # uvicorn's line for a worker that it restarts
    assert "Traceback" not in output, output


def test_the_decode_of_a_client_that_left_stops_at_once():
    slow = jpeg_with_repeated_scans(1_100_000)  # about 9 CPU-s to decode, under a limit of 30 here
    with running_server({"VIT_DEVICE": "cpu", "VIT_DECODE_TIMEOUT_S": "30"}) as server:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.base_url}/predict", files={"file": ("scans.jpg", slow, "image/jpeg")}, timeout=1.5)
        time.sleep(1.0)  # the disconnect seen, the decoder killed, its replacement started
        members = process_tree(server.process.pid)
        before = sum(map(cpu_seconds, members))
        time.sleep(1.0)
        busy_s = sum(map(cpu_seconds, members)) - before
        after = httpx.post(f"{server.base_url}/predict", files={"file": ("ok.png", image_bytes(GRAY))}, timeout=30)
    assert busy_s < 0.3, f"{busy_s:.2f} CPU-s in 1 s: the decode went on"
    assert after.status_code == 200
