"""docker compose up, run for real: the image built from the Dockerfile, served as users run it.

Skipped only where no Docker engine can be started. The images are built once per session; the base
image and the layers below the project stay cached in the engine for the next run.
"""

import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from app.config import Settings
from model import DEFAULT_CHECKPOINT
from model.metadata import CHECKPOINT_NAME
from model.predict import classify
from tests.support import docker
from tests.support.models import save_small_checkpoint
from tests.support.server import free_port

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = [ROOT / "examples" / name for name in ("ankle-boot.png", "trouser.png", "pullover.png")]
STOP_GRACE_S = 15  # docker-compose.yml's stop_grace_period
API_KEY = "key-from-the-shell"


@pytest.fixture(scope="session")
def builder() -> tuple[list[str], dict[str, str]]:
    """A BuildKit build command, its environment, a running engine and the base image; else a skip that says
    which is missing."""
    reason = docker.start_engine()
    if reason:
        pytest.skip(reason)
    build = docker.build_command()
    if build is None:
        pytest.skip("no docker CLI here builds with BuildKit (neither buildx nor a 20.10 client)")
    reason = docker.ensure_base_image()
    if reason:
        pytest.skip(reason)
    return build


@pytest.fixture(scope="session")
def torch_args(builder) -> Iterator[dict[str, str]]:
    """The build arguments that say where torch comes from, the same for every build of the session."""
    with docker.torch_build_args() as args:
        if args is None:
            pytest.skip("PyTorch's CPU index is out of reach, and pip's find-links hold no CPU torch wheel")
        yield args


@pytest.fixture(scope="session")
def images(builder, torch_args) -> dict[str, float]:
    """Build the service's image and the proxy's, as a user's `docker compose build` would; seconds each."""
    command, env = builder
    seconds = {"vit-serving:cpu": docker.build_image(command, env, "vit-serving:cpu", ROOT, torch_args)[0]}
    deploy = ROOT / "deploy"
    seconds["vit-serving-proxy"] = docker.build_image(
        command, env, "vit-serving-proxy", deploy, {}, dockerfile="proxy.Dockerfile"
    )[0]
    print(f"built in {seconds} s; {docker.run('docker', 'image', 'ls', 'vit-serving')}")
    return seconds


@pytest.fixture
def edited_copy(images, tmp_path) -> Iterator[Path]:
    """The image's build context, copied with a line added to the app that no build has seen before (the
    engine's cache holds earlier runs' builds); its image is removed after."""
    context = tmp_path / "context"
    context.mkdir()
    for name in ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, context / name)
    for package in ("model", "app"):
        shutil.copytree(ROOT / package, context / package, ignore=shutil.ignore_patterns("__pycache__"))
    with open(context / "app" / "__init__.py", "a") as source:
        source.write(f"# a change to the code: {uuid.uuid4().hex}\n")
    yield context
    docker.succeeds("docker", "image", "rm", "vit-serving:edited")


SERVE = ["docker-compose.yml", "docker-compose.override.yml"]  # what `docker compose up` reads
SCALE = ["docker-compose.yml", "docker-compose.scale.yml"]
GPU = ["docker-compose.yml", "docker-compose.gpu.yml"]
WEIGHTS = [*SERVE, "docker-compose.weights.yml"]  # your own checkpoint


@pytest.fixture
def compose(images, tmp_path) -> Iterator[docker.Compose]:
    """A Compose project of its own on a free port, always brought down."""
    command = docker.compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor docker-compose is installed")
    project = docker.Compose(command, ROOT, f"vittest{free_port()}", free_port(), free_port())
    yield project
    for files in (SERVE, SCALE):
        project.run(files, "down", "--remove-orphans", "--timeout", "5")


def test_compose_up_serves_the_models_answers_as_a_non_root_user_and_stops_cleanly(compose, tmp_path):
    compose.run(SERVE, "up", "-d", "--no-build", env={"VIT_API_KEY": API_KEY})  # VIT_API_KEY=... docker compose up
    [container] = compose.containers(SERVE, "api")
    docker.wait_healthy([container])
    base_url = f"http://127.0.0.1:{compose.port}"

    files = [("file", (path.name, path.read_bytes(), "image/png")) for path in EXAMPLES]
    assert httpx.post(f"{base_url}/predict", files=files, timeout=30).status_code == 401  # the shell's key guards it
    key = {"Authorization": f"Bearer {API_KEY}"}
    served = httpx.post(f"{base_url}/predict", files=files, params={"top_k": 3}, headers=key, timeout=30).json()
    expected, _ = classify(EXAMPLES, DEFAULT_CHECKPOINT, 3, "cpu")  # the model in this process
    for got, want in zip(served["results"], expected["results"], strict=True):
        assert [p["index"] for p in got["predictions"]] == [p["index"] for p in want["predictions"]]
        got_probabilities = [p["probability"] for p in got["predictions"]]
        assert got_probabilities == pytest.approx([p["probability"] for p in want["predictions"]], abs=1e-4)
    over_grpc = triton.InferenceServerClient(f"127.0.0.1:{compose.grpc_port}")  # the image's gRPC, published
    image = triton.InferInput("image", [1], "BYTES").set_data_from_numpy(np.array([EXAMPLES[0].read_bytes()], object))
    labels = over_grpc.infer(
        served["model"],
        [image],
        outputs=[triton.InferRequestedOutput("probabilities", class_count=1)],
        headers={"authorization": f"Bearer {API_KEY}"},
    )
    assert labels.as_numpy("probabilities")[0, 0].decode().endswith(":9:Ankle boot")
    over_grpc.close()
    with grpc.insecure_channel(f"127.0.0.1:{compose.grpc_port}") as channel:  # what a Kubernetes grpc probe asks
        probe = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert probe.status == health_pb2.HealthCheckResponse.SERVING
    boot = {"file": ("boot.png", EXAMPLES[0].read_bytes())}
    heatmap = httpx.post(f"{base_url}/attention", files=boot, headers=key, timeout=30)
    (tmp_path / "heatmap.png").write_bytes(heatmap.content)
    assert heatmap.status_code == 200 and Image.open(tmp_path / "heatmap.png").size == (28, 28)

    assert "\nUid:\t10001\t" in docker.run("docker", "exec", container, "cat", "/proc/1/status")  # not root
    for image in ("vit-serving:cpu", "vit-serving-proxy"):  # Kubernetes' runAsNonRoot verifies a user by number
        user = docker.run("docker", "image", "inspect", "-f", "{{.Config.User}}", image).strip()
        assert re.fullmatch(r"[1-9][0-9]*:[0-9]+", user), f"{image} runs as {user!r}"
    docker.run("docker", "cp", str(EXAMPLES[0]), f"{container}:/tmp/boot.png")
    predicted = docker.run("docker", "exec", container, "vit-predict", "/tmp/boot.png", "--top-k", "1")
    assert "Ankle boot" in predicted  # no --checkpoint: the weights installed with the package
    secret_left = docker.succeeds("docker", "exec", container, "test", "-e", "/run/secrets/ca")
    assert not secret_left  # the build's CA stayed out of the image
    compiled = subprocess.run(  # the image has no compiler, so torch.compile cannot run in it: said in one line
        ["docker", "exec", "-e", "VIT_COMPILE=true", container, "vit-serve"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert compiled.returncode == 1 and compiled.stderr.startswith("vit-serve: VIT_COMPILE needs a C++ compiler (g++;")

    started = time.monotonic()
    compose.run(SERVE, "stop")
    stopped_after = time.monotonic() - started
    exit_code = docker.run("docker", "inspect", "-f", "{{.State.ExitCode}}", container).strip()
    logs = docker.run("docker", "logs", container)
    assert exit_code == "0", logs[-2000:]  # drained and exited, not killed (137)
    assert stopped_after < STOP_GRACE_S and "Application shutdown complete" in logs


def test_the_weights_override_serves_a_checkpoint_from_a_folder_of_this_machine_and_not_a_folder_that_is_not_there(
    compose, tmp_path
):
    colours = tmp_path / "colours"  # as vit-train leaves its --out-dir: a folder all may enter, a file all may read
    colours.mkdir()
    save_small_checkpoint(colours / CHECKPOINT_NAME, classes=["red", "green", "blue"], favours=1)
    with pytest.raises(RuntimeError, match="the folder on this machine that holds the checkpoint"):
        compose.run(WEIGHTS, "up", "-d", "--no-build", env={"VIT_WEIGHTS_DIR": ""})
    missing = tmp_path / "colors"
    with pytest.raises(RuntimeError, match=f"bind source path does not exist: {missing}"):
        compose.run(WEIGHTS, "up", "-d", "--no-build", env={"VIT_WEIGHTS_DIR": str(missing)})
    assert not missing.exists()  # not made, empty and root's, for the server to find no checkpoint in

    compose.run(WEIGHTS, "up", "-d", "--no-build", env={"VIT_WEIGHTS_DIR": str(colours)})
    [container] = compose.containers(SERVE, "api")
    docker.wait_healthy([container])
    files = [("file", (path.name, path.read_bytes(), "image/png")) for path in EXAMPLES]
    served = httpx.post(f"http://127.0.0.1:{compose.port}/predict", files=files, timeout=30).json()
    assert [result["predictions"][0]["label"] for result in served["results"]] == ["green"] * len(EXAMPLES)


def test_the_image_serves_as_a_restricted_kubernetes_pod_runs_it_with_a_uid_of_no_name(images):
    # Kubernetes' restricted Pod Security Standard: a read-only root file system (an emptyDir at /tmp), no
    # capabilities, no privilege escalation; and OpenShift's random uid, in group 0, without a name or a home
    port = free_port()
    restricted = ["--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]
    run = ["docker", "run", "-d", *restricted, "--user", "123456:0", "-p", f"127.0.0.1:{port}:8000"]
    container = docker.run(*run, "vit-serving:cpu").strip()
    try:
        docker.wait_healthy([container])
        boot = {"file": ("boot.png", EXAMPLES[0].read_bytes())}
        answer = httpx.post(f"http://127.0.0.1:{port}/predict", files=boot, timeout=30)
        logs = docker.run("docker", "logs", container)
    finally:
        docker.succeeds("docker", "rm", "-f", container)
    assert answer.status_code == 200 and answer.json()["results"][0]["predictions"][0]["label"] == "Ankle boot"
    # Matplotlib's two lines of complaint about a home it could not write to came from every process
    assert [line for line in logs.splitlines() if not line.startswith("INFO:")] == []


def test_a_rebuild_after_a_code_change_reuses_the_layers_of_debian_torch_and_the_dependencies(
    builder, torch_args, edited_copy
):
    _, log = docker.build_image(*builder, "vit-serving:edited", edited_copy, torch_args)
    cached = docker.cached_steps(log)
    for step in ("apt-get install", "pip install --no-deps --index-url", "pip install -r /tmp/requirements.txt"):
        assert any(step in instruction for instruction in cached), (step, cached)
    assert not any("pip install --no-deps ." in instruction for instruction in cached)  # the change is built
    change = (edited_copy / "app" / "__init__.py").read_text().splitlines(keepends=True)[-1]
    installed = "/opt/venv/lib/python3.11/site-packages/app/__init__.py"
    assert docker.run("docker", "run", "--rm", "vit-serving:edited", "tail", "-1", installed) == change


def test_the_gpu_override_is_a_valid_compose_file(compose):
    config = compose.run(GPU, "config")
    assert "vit-serving:cuda" in config and "nvidia" in config and "TORCH_VARIANT: cuda" in config
    assert "TORCH_INDEX_URL: https://download.pytorch.org/whl/cu130" in config
    older_driver = compose.run(GPU, "config", env={"TORCH_INDEX_URL": "https://download.pytorch.org/whl/cu128"})
    assert "TORCH_INDEX_URL: https://download.pytorch.org/whl/cu128" in older_driver


def test_the_scale_override_spreads_requests_over_two_replicas_behind_the_proxy(compose):
    # VIT_API_KEY is set in no shell here: passed as empty, it would stop start-up; it stays unset, and no key is asked
    limit = 2 * Settings().max_upload_bytes  # from the shell, for the replicas and the proxy alike
    shell = {"VIT_MAX_UPLOAD_BYTES": str(limit), "VIT_REQUEST_TIMEOUT_S": "25.5"}
    compose.run(SCALE, "up", "-d", "--no-build", "--scale", "api=2", env=shell)
    replicas = compose.containers(SCALE, "api")
    assert len(replicas) == 2
    docker.wait_healthy(replicas)
    boot = {"file": ("boot.png", EXAMPLES[0].read_bytes(), "image/png")}
    with httpx.Client(base_url=f"http://127.0.0.1:{compose.port}", timeout=30) as client:
        statuses = [client.post("/predict", files=boot).status_code for _ in range(20)]
        counts = [_predictions_served(replica) for replica in replicas]
        # Past the default limit, within the raised one: the proxy's 10 MiB refused it, in an HTML page.
        within = client.post("/predict", files={"file": ("big.png", bytes(limit * 3 // 4), "image/png")})
        beyond = client.post(
            "/predict", files={"file": ("big.png", bytes(limit + 1), "image/png")}, headers={"X-Request-ID": "trace-7"}
        )
        named = client.post("/predict", files=boot, headers={"X-Request-ID": "trace-8"})
    over_grpc = triton.InferenceServerClient(f"127.0.0.1:{compose.grpc_port}")  # one client, one connection
    image = triton.InferInput("image", [1], "BYTES").set_data_from_numpy(np.array([EXAMPLES[0].read_bytes()], object))
    try:
        answers = [
            over_grpc.infer(DEFAULT_CHECKPOINT.stem, [image]).as_numpy("probabilities").argmax() for _ in range(19)
        ]
        answers.append(
            over_grpc.infer(DEFAULT_CHECKPOINT.stem, [image], headers={"x-request-id": "grpc-trace-9"})
            .as_numpy("probabilities")
            .argmax()
        )
    finally:
        over_grpc.close()
    assert answers == [9] * 20  # Ankle boot
    assert statuses == [200] * 20
    assert sum(counts) == 20 and min(counts) > 0, counts
    [proxy] = compose.containers(SCALE, "proxy")
    proxy_address = docker.run(
        "docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", proxy
    )
    logged = [line for replica in replicas for line in docker.run("docker", "logs", replica).splitlines()]
    grpc_calls = [
        sum(" - gRPC ModelInfer OK " in line for line in docker.run("docker", "logs", replica).splitlines())
        for replica in replicas
    ]
    assert sum(grpc_calls) == 20 and min(grpc_calls) > 0, grpc_calls  # the proxy spread one connection's calls
    assert sum(line.endswith(" ms grpc-trace-9") for line in logged) == 1  # the client's id, passed on
    clients = {line.split()[1].rpartition(":")[0] for line in logged if '"POST /predict HTTP/1.1" 200' in line}
    assert clients and proxy_address.strip() not in clients, clients  # X-Forwarded-For's client, not the proxy
    grpc_clients = {line.split()[1].rpartition(":")[0] for line in logged if " - gRPC ModelInfer OK " in line}
    assert grpc_clients == clients, grpc_clients  # a gRPC call's client too
    assert within.status_code == 400 and "x-request-id" in within.headers, within.text  # a replica's: not an image
    assert beyond.status_code == 413 and beyond.json() == {
        "detail": f"request body is larger than the limit of {limit} bytes"  # the proxy's, in the replicas' words
    }
    assert beyond.headers["x-request-id"] == "trace-7"  # the proxy's own answer carries the request's id too
    assert named.headers.get_list("x-request-id") == ["trace-8"]  # a replica's answer, once
    # It waits past the replicas' 504 (at 25.5 s): its own 30 s came first, and sent the request to another replica.
    waits = docker.run("docker", "exec", proxy, "grep", "proxy_read_timeout", "/tmp/nginx.conf")
    assert "proxy_read_timeout 45500ms;" in waits

    docker.run("docker", "stop", "--time", "1", *replicas)
    # Their addresses stay in the proxy's DNS cache for a while: each connection to one waited 60 s, and the answer
    # was an HTML page.
    unreached = httpx.post(f"http://127.0.0.1:{compose.port}/predict", files=boot, timeout=20)
    assert len(unreached.headers["x-request-id"]) == 32  # one the proxy made: the client sent none
    assert (unreached.status_code, unreached.json()) in [
        (502, {"detail": "no replica of the service could be reached"}),  # once Docker's DNS has none
        (504, {"detail": "no replica of the service answered in time"}),  # a cached address: 2 s to connect
    ]


@pytest.mark.parametrize(
    "variable, value, said",
    [
        ("VIT_MAX_UPLOAD_BYTES", "10MB", "not a whole number of bytes"),
        ("VIT_REQUEST_TIMEOUT_S", "10s", "not a number of seconds"),
    ],
)
def test_the_proxy_refuses_a_setting_it_cannot_write_into_nginxs_configuration(images, variable, value, said):
    started = subprocess.run(
        ["docker", "run", "--rm", "-e", f"{variable}={value}", "vit-serving-proxy"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert (started.returncode, started.stderr) == (1, f"proxy: {variable}='{value}': {said}\n")


def _predictions_served(container: str) -> float:
    """vit_requests_total for /predict, read inside the replica (replicas publish no port)."""
    read = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8000/metrics').read().decode())"
    metrics = docker.run("docker", "exec", container, "python", "-c", read)
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("vit_requests_total{") and 'route="/predict"' in line
    )
