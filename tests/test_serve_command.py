"""vit-serve: how many worker processes it starts, how they split the CPU, and that they serve together."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch

import app.cli
import app.gpus
import app.inference
from app.cli import (
    AUTO_FRONT_END_LIMIT,
    AUTO_WORKER_LIMIT,
    auto_device_note,
    missing_gpu,
    runs_model_process,
    worker_count,
)
from app.config import Settings, conflicts
from app.inference import InferenceEngine
from model import DEFAULT_CHECKPOINT
from model.metadata import file_sha256
from model.toolchain import missing_for_compile
from tests.support.commands import ROOT
from tests.support.server import (
    TCP_ESTABLISHED,
    free_port,
    listening_workers,
    process_tree,
    running_server,
    start_server,
    survivors,
    tcp_sockets,
    torch_loaded,
    vit_serve_command,
)

BOOT_UPLOAD = {"file": ("boot.png", (ROOT / "examples" / "ankle-boot.png").read_bytes(), "image/png")}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("VIT_WORKERS", "WEB_CONCURRENCY", "VIT_DEVICE", "VIT_TORCH_THREADS", "VIT_MODEL_PROCESS"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_a_set_worker_count_is_used_as_it_is(clean_env):
    assert worker_count(Settings(workers=2)) == 2  # by the field's name, as well as from the environment
    clean_env.setenv("VIT_WORKERS", "3")
    assert worker_count(Settings()) == 3
    clean_env.delenv("VIT_WORKERS")
    clean_env.setenv("WEB_CONCURRENCY", "5")  # uvicorn's name works too
    assert worker_count(Settings()) == 5


def test_default_is_one_worker_per_cpu_on_the_cpu_up_to_a_limit(clean_env):
    clean_env.setenv("VIT_DEVICE", "cpu")
    for cpus, expected in ((1, 1), (2, 2), (AUTO_WORKER_LIMIT, AUTO_WORKER_LIMIT), (64, AUTO_WORKER_LIMIT)):
        clean_env.setattr(app.cli, "cpu_quota", lambda cpus=cpus: cpus)
        assert worker_count(Settings()) == expected
        assert not runs_model_process(Settings())


def test_cuda_gets_a_model_process_by_default_with_one_front_end_per_cpu_but_one(clean_env):
    clean_env.setenv("VIT_DEVICE", "cuda:0")
    assert runs_model_process(Settings())
    for cpus, expected in ((1, 1), (2, 1), (16, 15), (64, AUTO_FRONT_END_LIMIT)):
        clean_env.setattr(app.cli, "cpu_quota", lambda cpus=cpus: cpus)
        assert worker_count(Settings()) == expected
    clean_env.setenv("VIT_MODEL_PROCESS", "false")  # then one worker, so that one copy of the weights batches all
    assert not runs_model_process(Settings()) and worker_count(Settings()) == 1


def test_a_model_process_on_the_cpu_gets_one_front_end_per_cpu_but_one(clean_env):
    clean_env.setenv("VIT_DEVICE", "cpu")
    clean_env.setattr(app.cli, "cpu_quota", lambda: 16)
    assert worker_count(Settings(model_process=True)) == 15


@pytest.mark.parametrize(("gpu_visible", "expected"), [(True, 7), (False, AUTO_WORKER_LIMIT)])
def test_auto_device_picks_the_layout_by_whether_the_driver_sees_a_gpu(clean_env, gpu_visible, expected):
    clean_env.setattr(app.gpus, "nvidia_gpu_count", lambda: int(gpu_visible))
    clean_env.setattr(app.cli, "cpu_quota", lambda: 8)
    assert worker_count(Settings(device="auto")) == expected
    assert runs_model_process(Settings(device="auto")) == gpu_visible


def test_workers_split_the_cpu_quota_into_torch_threads(clean_env, small_checkpoint):
    clean_env.setattr(app.inference, "cpu_quota", lambda: 8)
    before = torch.get_num_threads()
    try:
        clean_env.setenv("VIT_WORKERS", "4")
        InferenceEngine(Settings(checkpoint=small_checkpoint, device="cpu"))
        assert torch.get_num_threads() == 2
        clean_env.delenv("VIT_WORKERS")  # plain uvicorn, one process: the whole quota
        InferenceEngine(Settings(checkpoint=small_checkpoint, device="cpu"))
        assert torch.get_num_threads() == 8
    finally:
        torch.set_num_threads(before)


def test_the_server_and_vit_predict_run_where_the_system_reports_no_cpu_affinity(tmp_path):
    # macOS and Windows have no os.sched_getaffinity; every command stopped there with an AttributeError, so a
    # Mac's `make serve` never served. Each process here, the workers and decoders that vit-serve spawns too,
    # loses it at start.
    (tmp_path / "sitecustomize.py").write_text("import os\n\ndel os.sched_getaffinity\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    stand_in = [sys.executable, "-c", "import os; os.sched_getaffinity"]
    assert subprocess.run(stand_in, env=os.environ | env, capture_output=True, check=False).returncode != 0
    with running_server(env, app=None) as server:
        answer = httpx.post(f"{server.base_url}/predict", files=BOOT_UPLOAD, params={"top_k": 1})
        assert answer.status_code == 200, answer.text
        assert answer.json()["results"][0]["predictions"][0]["label"] == "Ankle boot"
    example = ROOT / "examples" / "ankle-boot.png"
    predicted = subprocess.run(
        [sys.executable, "-m", "model.predict", str(example)],
        env=os.environ | env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert predicted.returncode == 0, predicted.stderr
    assert "Ankle boot" in predicted.stdout


def test_the_command_imports_neither_torch_nor_prometheus_client():
    # The supervisor of several workers never runs the model; torch would add seconds to every start. And
    # prometheus_client reads where its processes share their metrics when imported: vit-serve sets that first.
    check = "import sys, app.cli; sys.exit('torch' in sys.modules or 'prometheus_client' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", check], check=False).returncode == 0


def run_vit_serve(
    *arguments: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """vit-serve as a user types it, expected to stop by itself (it would serve on port 8000 otherwise); with
    `cwd`, run there, the checkout importable."""
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *arguments],
        cwd=cwd,
        env=os.environ | ({"PYTHONPATH": str(ROOT)} if cwd else {}) | (env or {}),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_help_lists_every_setting_with_its_variable_and_default_and_serves_nothing():
    result = run_vit_serve("--help")
    assert result.returncode == 0, result.stderr
    for field, info in Settings.model_fields.items():
        variable = "VIT_WORKERS" if field == "workers" else f"VIT_{field.upper()}"
        assert f"  {variable}=" in result.stdout, variable
        assert (info.description or "").split()[0] in result.stdout
    assert "  VIT_PORT=8000\n" in result.stdout


@pytest.mark.parametrize("arguments", [["--port", "9000"], ["--port=9000"]], ids=["separate", "joined"])
def test_an_argument_for_a_setting_stops_the_command_with_the_variable_to_set_instead(arguments):
    result = run_vit_serve(*arguments)
    assert result.returncode == 2, result.stderr  # argparse's usage error: nothing was started
    assert "not arguments: VIT_PORT=9000 vit-serve" in result.stderr
    unknown = run_vit_serve("--reload")
    assert unknown.returncode == 2 and "unrecognized arguments: --reload" in unknown.stderr


def test_invalid_settings_stop_the_command_with_a_line_for_each_and_no_traceback():
    result = run_vit_serve(env={"VIT_PORT": "eighty", "VIT_PRECISION": "fp8"})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert sorted(lines) == [
        "vit-serve: VIT_PORT='eighty': Input should be a valid integer, unable to parse string as an integer",
        "vit-serve: VIT_PRECISION='fp8': Input should be 'fp32', 'bf16' or 'fp16'",
    ]


def test_a_mistyped_setting_is_named_at_start_with_the_one_it_may_mean_and_kubernetes_links_are_not(
    small_checkpoint,
):
    # pydantic-settings ignores variables it does not know: VIT_APIKEY left every route open, without a word
    mistyped = {"VIT_APIKEY": "s3cret", "VIT_MAX_BATCHSIZE": "64", "VIT_CACHE": "x"}
    links = {"VIT_API_SERVICE_HOST": "10.96.0.9", "VIT_API_PORT_80_TCP_ADDR": "10.96.0.9"}  # a Service named vit-api
    with running_server(
        {"VIT_WORKERS": "1", "VIT_CHECKPOINT": str(small_checkpoint)} | mistyped | links, None
    ) as server:
        answer = httpx.post(f"{server.base_url}/predict", files=BOOT_UPLOAD, timeout=10)
        output = server.stop()[1]
    assert answer.status_code == 200  # ignored: the key was not set, as the first line says
    assert [line for line in output.splitlines() if "is not a setting" in line] == [
        "WARNING:  VIT_APIKEY is not a setting, and is ignored; did you mean VIT_API_KEY?",
        "WARNING:  VIT_CACHE is not a setting, and is ignored",
        "WARNING:  VIT_MAX_BATCHSIZE is not a setting, and is ignored; did you mean VIT_MAX_BATCH_SIZE?",
    ]


def test_a_mistyped_setting_is_named_once_by_vit_serve_of_two_workers_and_by_plain_uvicorn_too(small_checkpoint):
    env = {"VIT_CHECKPOINT": str(small_checkpoint), "VIT_MAX_BATCHSIZE": "64"}
    said = "VIT_MAX_BATCHSIZE is not a setting, and is ignored; did you mean VIT_MAX_BATCH_SIZE?"
    with running_server(env | {"VIT_WORKERS": "2"}, None) as server:
        output = server.stop()[1]
    assert [line for line in output.splitlines() if said in line] == [f"WARNING:  {said}"]  # not once per worker
    apart = "WARNING:  one of 2 processes (WEB_CONCURRENCY), each with its own metrics: /metrics and the v2 statistics"
    assert apart not in output  # vit-serve's workers write their metrics to one directory, and scrapes sum them
    with running_server(env) as server:  # uvicorn app.main:create_app --factory, as the README offers
        output = server.stop()[1]
    assert f"WARNING:  {said}" in output.splitlines()  # with its level, as uvicorn's own lines have theirs
    assert "INFO:     serving small from " in output  # the app's INFO lines too, not only uvicorn's
    assert apart not in output  # one process
    with running_server(env | {"WEB_CONCURRENCY": "2"}) as server:  # plain uvicorn's workers: scrapes undercounted
        output = server.stop()[1]
    assert apart in output and "set PROMETHEUS_MULTIPROC_DIR to an empty folder" in output


def test_vit_serve_takes_the_vit_settings_of_a_dotenv_file_in_its_folder_where_the_shell_sets_none(tmp_path):
    # Compose reads .env for the container; a key put there for it, then `make serve`, served everyone unasked
    (tmp_path / ".env").write_text(
        "# as Compose reads it\n"
        "VIT_API_KEY=from-the-file\n"
        "export VIT_MAX_FILES='1'\n"
        "VIT_WORKERS=1\n"
        "VIT_TOP_K=3\n"
        "VIT_PUBLISHED_PORT=8080\n"  # the Compose files' own
        "COMPOSE_PROJECT_NAME=vit\n"
    )
    shell = {"PYTHONPATH": str(ROOT), "VIT_MAX_FILES": "2"}
    server = start_server(shell, app=None, cwd=tmp_path)
    try:
        without_key = httpx.post(f"{server.base_url}/predict", files=BOOT_UPLOAD, timeout=10)
        key = {"Authorization": "Bearer from-the-file"}
        both = httpx.post(f"{server.base_url}/predict", files=[("file", BOOT_UPLOAD["file"])] * 2, headers=key)
        three = httpx.post(f"{server.base_url}/predict", files=[("file", BOOT_UPLOAD["file"])] * 3, headers=key)
    finally:
        output = server.stop()[1]
    assert without_key.status_code == 401
    assert both.status_code == 200 and three.status_code == 413  # the shell's VIT_MAX_FILES=2, not the file's 1
    assert f"INFO:     settings from {tmp_path / '.env'}: VIT_API_KEY, VIT_TOP_K, VIT_WORKERS" in output.splitlines()
    assert [line for line in output.splitlines() if "is not a setting" in line] == [
        "WARNING:  VIT_TOP_K is not a setting, and is ignored"
    ]
    assert "from-the-file" not in output and "COMPOSE_PROJECT_NAME" not in output


def test_a_dotenv_file_that_cannot_be_read_stops_vit_serve_in_one_line(tmp_path):
    (tmp_path / ".env").write_bytes(b"VIT_PORT=\xff\xfe\n")
    # were the file taken, one process on a free port: the timeout's kill would leave no workers serving on
    result = run_vit_serve(env={"VIT_WORKERS": "1", "VIT_PORT": str(free_port())}, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == f"vit-serve: cannot read {tmp_path / '.env'}: not UTF-8 text"


@pytest.mark.parametrize(
    ("variable", "value", "said"),
    [
        (
            "VIT_PORT",
            "tcp://10.96.0.12:8000",
            (
                "Value error, what Kubernetes sets for a Service named vit; set VIT_PORT in the container's env, or "
                "enableServiceLinks: false in the pod's spec"
            ),
        ),
        (
            "VIT_GRPC_PORT",
            "tcp://10.96.0.13:8001",
            (
                "Value error, what Kubernetes sets for a Service named vit-grpc; set VIT_GRPC_PORT in the container's "
                "env, or enableServiceLinks: false in the pod's spec"
            ),
        ),
        # a digest cut short, or as Docker writes one: it was "sha256 differs", which sent the user to the checkpoint
        (
            "VIT_CHECKPOINT_SHA256",
            "sha256:0123abc",
            "Value error, not a sha256: 64 hexadecimal digits, as sha256sum prints them",
        ),
        # a start-up traceback; 1e20 failed every upload
        ("VIT_DECODE_TIMEOUT_S", "inf", "Input should be less than or equal to 3600"),
        # the current folder, Path(''): "cannot start: .: a folder, not a checkpoint file"
        (
            "VIT_CHECKPOINT",
            "",
            "Value error, empty; name a .safetensors file, or unset it to serve the shipped model",
        ),
        # a path that Path() made of it, https:/host/...: "cannot start: https:/...: no such checkpoint file"
        (
            "VIT_CHECKPOINT",
            "https://example.com/m.safetensors",
            "Value error, a URL, not a path: download it first (curl -sLO https://example.com/m.safetensors)",
        ),
    ],
    ids=[
        "kubernetes port",
        "kubernetes grpc port",
        "no sha256",
        "decode time limit the kernel cannot hold",
        "empty checkpoint",
        "url",
    ],
)
def test_a_setting_that_cannot_work_stops_the_command_in_one_line_saying_why(variable, value, said):
    result = run_vit_serve(env={variable: value})
    assert result.returncode == 1
    assert result.stderr.strip() == f"vit-serve: {variable}={value!r}: {said}"


@pytest.mark.parametrize("key", ["", " s3cret "], ids=["empty", "spaces around it"])
def test_an_api_key_no_client_can_send_stops_the_command_without_showing_it(key):
    # An empty key used to let every request in: one without the header matched it.
    result = run_vit_serve(env={"VIT_API_KEY": key, "VIT_PORT": "70000"})
    assert result.returncode == 1
    assert sorted(result.stderr.strip().splitlines()) == [
        (
            "vit-serve: VIT_API_KEY=(hidden): Value error, empty, or with spaces around it, so that no client can "
            "send it; unset it for no key"
        ),
        "vit-serve: VIT_PORT='70000': Input should be less than or equal to 65535",
    ]


def test_more_torch_threads_or_decoder_processes_than_the_machine_has_cpus_stop_the_command_in_one_line():
    cpus = len(os.sched_getaffinity(0))  # 100000 threads crashed each worker; 100000 processes hung the start-up
    result = run_vit_serve(env={"VIT_TORCH_THREADS": "100000", "VIT_DECODE_WORKERS": str(cpus + 1)})
    assert result.returncode == 1
    reason = f"Value error, more than the {cpus} CPUs this process may run on, which is as many as can run at once"
    assert sorted(result.stderr.strip().splitlines()) == [
        f"vit-serve: VIT_DECODE_WORKERS='{cpus + 1}': {reason}",
        f"vit-serve: VIT_TORCH_THREADS='100000': {reason}",
    ]


def test_settings_that_the_device_rules_out_stop_the_command_before_any_process_starts():
    result = run_vit_serve(env={"VIT_DEVICE": "cpu", "VIT_PRECISION": "fp16", "VIT_QUANTIZE": "int8"})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [  # no worker's log, no traceback: nothing was started
        "vit-serve: VIT_PRECISION=fp16 runs on CUDA only; on the CPU, bf16 is the mixed precision",
        "vit-serve: VIT_QUANTIZE=int8 runs with VIT_PRECISION=fp32 only: its int8 layers take fp32",
    ]


def test_a_grpc_port_that_is_the_http_port_stops_the_command_in_one_line():
    # both bound it, with SO_REUSEPORT: HTTP, on IPv4's 0.0.0.0, took every connection to 127.0.0.1, and the log said
    # "serving the Open Inference Protocol over gRPC on 0.0.0.0:8000"
    result = run_vit_serve(env={"VIT_PORT": "8000", "VIT_GRPC_PORT": "8000"})
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "vit-serve: VIT_GRPC_PORT is VIT_PORT's port, 8000: HTTP and gRPC need one each (the image: 8000 and 8001)"
    )


def test_compile_where_the_machine_has_no_compiler_stops_the_command_in_one_line(monkeypatch, tmp_path):
    # Inductor's traceback came after the model had loaded: "No working C++ compiler found" (Debian's slim image)
    result = run_vit_serve(env={"VIT_COMPILE": "true", "CXX": "no-such-c++"})
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "vit-serve: VIT_COMPILE needs a C++ compiler (no-such-c++; CXX names another), with which torch.compile "
        "builds its kernels (Debian: apt-get install g++ python3-dev)"
    )
    monkeypatch.setenv("CC", "no-such-cc")  # on CUDA, Triton's C compiler builds the kernels' launchers
    assert missing_for_compile(on_cuda=True) == (
        "a C compiler (no-such-cc), with which torch.compile builds its kernels "
        "(Debian: apt-get install gcc python3-dev)"
    )
    monkeypatch.delenv("CC")
    monkeypatch.setattr(sysconfig, "get_path", lambda name: str(tmp_path))  # Python without python3-dev's headers
    for on_cuda in (False, True):
        assert missing_for_compile(on_cuda).startswith(f"Python's headers (no Python.h in {tmp_path}), with which")


def test_compile_where_its_kernels_could_not_run_is_refused_in_one_line(monkeypatch, tmp_path):
    # `docker run --read-only --tmpfs /tmp` mounts /tmp noexec: Inductor built its kernels there, then could not
    # load them, and start-up ended in a traceback once the model had loaded ("failed to map segment from shared
    # object"). Here the mount's flag is the one thing made up: no file system of this machine is mounted noexec.
    folder = tmp_path / "kernels"  # not made yet: Inductor makes it, on the file system of its nearest ancestor
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(folder))
    assert missing_for_compile(on_cuda=False) is None  # where the machine has a C++ compiler and Python.h
    statvfs = os.statvfs
    mounted_noexec = lambda path: SimpleNamespace(f_flag=statvfs(path).f_flag | os.ST_NOEXEC)
    monkeypatch.setattr(os, "statvfs", lambda path: mounted_noexec(path) if Path(path) == tmp_path else statvfs(path))
    for on_cuda in (False, True):
        assert missing_for_compile(on_cuda) == (
            f"a folder where the kernels it builds may run, and {folder} is on a file system mounted noexec: mount "
            "it with exec (docker run --tmpfs /tmp:exec), or name another folder in TORCHINDUCTOR_CACHE_DIR"
        )
    assert conflicts(Settings(compile=True), on_cuda=False)[0].startswith("VIT_COMPILE needs a folder where")


def test_cuda_asked_for_where_the_driver_reports_no_gpu_stops_the_command_in_one_line():
    result = run_vit_serve(env={"VIT_DEVICE": "cuda", "CUDA_VISIBLE_DEVICES": ""})  # no GPU, whatever the machine
    assert result.returncode == 1
    assert result.stderr.strip() == "vit-serve: VIT_DEVICE=cuda was asked for, but the NVIDIA driver reports no GPU"


def test_a_device_that_is_not_one_or_a_gpu_the_driver_does_not_report_stops_the_command_in_one_line(clean_env):
    result = run_vit_serve(env={"VIT_DEVICE": "meta"})  # a torch device, which used to fail in each worker
    assert result.returncode == 1
    assert result.stderr.strip() == "vit-serve: VIT_DEVICE='meta': Value error, not a device: auto, cpu, cuda or cuda:N"
    for count, device, reported in [(1, "cuda:1", "1 GPU, cuda:0"), (2, "cuda:2", "2 GPUs, cuda:0 to cuda:1")]:
        clean_env.setattr(app.gpus, "nvidia_gpu_count", lambda count=count: count)
        assert missing_gpu(device) == f"VIT_DEVICE={device} was asked for, but the NVIDIA driver reports {reported}"
    assert missing_gpu("cuda:1") is None and missing_gpu("cuda") is None and missing_gpu("cpu") is None


def test_a_gpu_that_the_installed_torch_cannot_use_is_named_and_auto_serves_from_the_cpu_as_torch_will(clean_env):
    # torch sees no GPU where it is a CPU build, or one for a newer CUDA than the driver runs. The driver's count
    # alone gave auto the GPU's layout, one model process with one torch thread, for a model on the CPU; and
    # VIT_DEVICE=cuda stopped in every worker with "torch sees no CUDA device", beside a GPU that nvidia-smi lists.
    clean_env.setattr(app.gpus, "nvidia_gpu_count", lambda: 1)
    clean_env.setattr(app.cli, "cpu_quota", lambda: 8)
    auto = Settings(device="auto")
    for build, driver, reason in [
        (("2.14.1+cpu", None), (13, 0), "torch 2.14.1+cpu is built without CUDA: install a CUDA build of torch"),
        (
            ("2.14.1+cu130", (13, 0)),
            (12, 4),
            (
                "torch 2.14.1+cu130 is built for CUDA 13.0, and this NVIDIA driver runs CUDA up to 12.4: update the "
                "driver, or install a torch built for CUDA 12"
            ),
        ),
    ]:
        clean_env.setattr(app.gpus, "torch_build", lambda build=build: build)
        clean_env.setattr(app.gpus, "nvidia_driver_cuda", lambda driver=driver: driver)
        assert missing_gpu("cuda") == f"VIT_DEVICE=cuda was asked for, but {reason}"
        assert not runs_model_process(auto) and worker_count(auto) == AUTO_WORKER_LIMIT  # the CPU's layout
        assert (
            auto_device_note(auto)
            == f"VIT_DEVICE=auto serves from the CPU: the NVIDIA driver reports a GPU, but {reason}"
        )
    clean_env.setattr(app.gpus, "torch_build", lambda: ("2.14.1+cu128", (12, 8)))  # within a major version, it runs
    assert missing_gpu("cuda") is None and runs_model_process(auto) and auto_device_note(auto) is None


def test_the_installed_torchs_build_is_read_without_importing_torch():
    cuda = None if torch.version.cuda is None else tuple(int(part) for part in torch.version.cuda.split(".")[:2])
    assert app.gpus.torch_build() == (torch.__version__, cuda)
    check = "import sys, app.gpus; assert app.gpus.torch_build(); sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", check], check=False).returncode == 0


def processes_with_torch(pid: int) -> list[int]:
    return [member for member in process_tree(pid) if torch_loaded(member)]


def test_two_workers_both_load_the_model_answer_alike_and_stop_together(shipped_checkpoint):
    with running_server({"VIT_WORKERS": "2", "VIT_DEVICE": "cpu"}, app=None) as server:
        deadline = time.monotonic() + 30  # ready means one worker is; the other may still be importing
        while len(workers := processes_with_torch(server.process.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(workers) == 2 and server.process.pid not in workers
        members = process_tree(server.process.pid)
        answers = set()
        for _ in range(20):  # a new connection each time, which the kernel may hand to either worker
            response = httpx.post(f"{server.base_url}/predict", files=BOOT_UPLOAD, timeout=10)
            assert response.status_code == 200
            answers.add(str(response.json()["results"][0]["predictions"]))
        assert len(answers) == 1
        returncode, output = server.stop()
    assert returncode == 0, output
    assert survivors(members) == {}, "a worker outlived the supervisor"
    digest = file_sha256(shipped_checkpoint)
    assert f"serving {shipped_checkpoint} (sha256 {digest}) from a copy taken at start" in output
    started = [line for line in output.splitlines() if "serving vit-tiny-fashion-mnist from" in line]
    assert len(started) == 2 and all(f"(sha256 {digest}) on cpu in fp32, 2 workers" in line for line in started)


@pytest.mark.parametrize(
    "layout",
    [{"VIT_WORKERS": "1"}, {"VIT_WORKERS": "1", "VIT_MODEL_PROCESS": "true"}, {"VIT_WORKERS": "2"}],
    ids=["one process", "one front end and a model process", "two workers"],
)
def test_sigterm_ends_every_layout_with_status_0_and_its_private_files_removed(layout, small_checkpoint, tmp_path):
    temporary = tmp_path / "tmp"  # TMPDIR: where the server keeps its copy of the checkpoint, sockets and metrics
    temporary.mkdir()
    env = layout | {"VIT_DEVICE": "cpu", "VIT_CHECKPOINT": str(small_checkpoint), "TMPDIR": str(temporary)}
    with running_server(env, app=None) as server:
        assert httpx.post(f"{server.base_url}/predict", files=BOOT_UPLOAD, timeout=10).status_code == 200
        assert any(temporary.iterdir())
        returncode, output = server.stop()
    assert returncode == 0, output
    assert sorted(path.name for path in temporary.iterdir()) == [], output


def test_the_private_files_of_a_killed_server_are_removed_by_the_next_and_those_of_a_running_one_kept(
    small_checkpoint, tmp_path
):
    temporary = tmp_path / "tmp"  # its copy of the checkpoint, the model process's socket, the metrics
    temporary.mkdir()
    env = {
        "VIT_WORKERS": "1",
        "VIT_MODEL_PROCESS": "true",
        "VIT_DEVICE": "cpu",
        "VIT_CHECKPOINT": str(small_checkpoint),
    }
    env["TMPDIR"] = str(temporary)
    with running_server(env, app=None) as killed:
        left = set(temporary.iterdir())
        for pid in process_tree(killed.process.pid):
            os.kill(pid, signal.SIGKILL)  # as the kernel's out-of-memory killer, or `docker kill`, would
        killed.stop()
    assert len(left) == 3 and set(temporary.iterdir()) == left  # they used to stay for good
    with running_server(env, app=None) as first:
        own = set(temporary.iterdir())
        assert len(own) == 3 and not own & left
        with running_server(env, app=None) as second:
            assert own < set(temporary.iterdir())  # a running server's are not the next one's to remove
            assert httpx.get(f"{first.base_url}/health/ready", timeout=10).status_code == 200
            assert httpx.post(f"{second.base_url}/predict", files=BOOT_UPLOAD, timeout=10).status_code == 200
            assert len(set(temporary.iterdir())) == 6


READ_ONLY_TEMPORARY = """
mount -t tmpfs -o ro tmpfs "$1" && cd "$1" && mount --bind . /var/tmp && mount --bind . /tmp && exec "$2" -m app.cli
"""


SMALL_TEMPORARY = """
mount -t tmpfs -o size=400k tmpfs "$1" && TMPDIR="$1" exec "$2" -m app.cli
"""


def vit_serve_in_a_mount_namespace(script: str, folder: Path) -> subprocess.CompletedProcess:
    """vit-serve after `script`, which mounts a tmpfs at `folder` where only this command sees it (unshare -m)."""
    folder.mkdir()
    probe = ["unshare", "-m", "mount", "-t", "tmpfs", "tmpfs", str(folder)]
    if shutil.which("unshare") is None or subprocess.run(probe, capture_output=True, check=False).returncode != 0:
        pytest.skip("no mount namespace here (unshare -m, and mounts in it) in which to mount a temporary directory")
    command = ["unshare", "-m", "sh", "-c", script, "sh", str(folder), sys.executable]
    env = os.environ | {"PYTHONPATH": str(ROOT), "VIT_DEVICE": "cpu", "VIT_PORT": "1"}
    env.pop("TMPDIR", None)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)


def test_a_machine_without_a_writable_temporary_directory_stops_the_command_in_one_line(tmp_path):
    # As in a container with a read-only root file system: /tmp, /var/tmp and the working directory read-only.
    result = vit_serve_in_a_mount_namespace(READ_ONLY_TEMPORARY, tmp_path / "read-only")
    assert result.returncode == 1, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("cannot start: no writable temporary directory (TMPDIR, /tmp, /var/tmp, the working")
    assert line.endswith("set TMPDIR to a writable folder, or mount one at /tmp (an emptyDir, say)")


def test_a_temporary_directory_without_room_for_the_checkpoints_copy_is_named_as_the_one_that_is_full(tmp_path):
    # It said "cannot start: .../vit-tiny-fashion-mnist.safetensors: No space left on device": the checkpoint's disk.
    result = vit_serve_in_a_mount_namespace(SMALL_TEMPORARY, small := tmp_path / "small")
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [
        (
            f"cannot start: no room in {small} for this server's copy of {DEFAULT_CHECKPOINT} (No space left on "
            "device); free some there, or set TMPDIR to a folder that has it"
        )
    ]


def test_an_idle_connection_outlives_a_clients_keep_alive(shipped_checkpoint):
    # Why the server must outlast the client: see VIT_KEEP_ALIVE_S in app/cli.py.
    with (
        running_server({"VIT_WORKERS": "1", "VIT_DEVICE": "cpu"}, app=None) as server,
        httpx.Client(base_url=server.base_url, limits=httpx.Limits(keepalive_expiry=60), timeout=10) as client,
    ):
        ports = []
        for pause_s in (0, 6):  # longer than the 5 s that httpx and uvicorn keep an idle connection by default
            time.sleep(pause_s)
            response = client.post("/predict", files=BOOT_UPLOAD)
            assert response.status_code == 200
            ports.append(response.extensions["network_stream"].get_extra_info("client_addr")[1])
    assert ports[0] == ports[1], "the server closed the idle connection"


def test_behind_a_proxy_that_strips_a_path_prefix_the_routes_the_page_and_the_docs_name_the_prefix(
    shipped_checkpoint,
):
    env = {"VIT_ROOT_PATH": "/vit", "VIT_WORKERS": "1", "VIT_DEVICE": "cpu"}
    with running_server(env, app=None) as server, httpx.Client(base_url=server.base_url, timeout=10) as client:
        # What a proxy's /vit/, /vit/model/ and /vit/predict reach, the prefix stripped.
        page = client.get("/")
        assert page.status_code == 200 and '<base href="/vit/">' in page.text  # the page's URLs are relative to it
        assert client.get("/model/").json()["name"] == "vit-tiny-fashion-mnist"
        assert client.post("/predict", files=BOOT_UPLOAD).json()["results"][0]["predictions"][0]["label"] == (
            "Ankle boot"
        )
        assert "url: '/vit/openapi.json'" in client.get("/docs").text
        assert client.get("/openapi.json").json()["servers"] == [{"url": "/vit"}]
        assert client.get("/nothing-here").json() == {"detail": "Not Found"}
        assert client.get("/v2/nothing-here").json() == {"error": "Not Found"}  # the Open Inference Protocol's shape
    assert run_vit_serve(env={"VIT_ROOT_PATH": "vit/"}).stderr.startswith("vit-serve: VIT_ROOT_PATH='vit/': ")


def test_each_worker_listens_on_a_socket_of_its_own_and_connections_spread_over_them(small_checkpoint):
    # Why each worker has a socket of its own: app/listeners.py.
    env = {"VIT_WORKERS": "2", "VIT_DEVICE": "cpu", "VIT_CHECKPOINT": str(small_checkpoint)}
    with running_server(env, app=None) as server:
        port = server.port
        listening = listening_workers(server, port, 2)
        assert len(listening) == 2 and server.process.pid not in listening
        assert all(len(inodes) == 1 for inodes in listening.values())
        assert len(set.union(*listening.values())) == 2, "the workers share one listening socket"
        connections = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(32)]
        try:
            for connection in connections:
                connection.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            assert all(connection.recv(4096).startswith(b"HTTP/1.1 200") for connection in connections)
            spread = [len(inodes) for inodes in tcp_sockets(list(listening), port, TCP_ESTABLISHED).values()]
        finally:
            for connection in connections:
                connection.close()
    # Hashed over two sockets, fewer than 4 of 32 on one happens about once in 400,000 runs.
    assert sum(spread) == 32 and min(spread) >= 4, spread


def test_a_second_vit_serve_on_a_port_in_use_exits_and_leaves_the_first_its_clients(small_checkpoint):
    env = {"VIT_WORKERS": "2", "VIT_DEVICE": "cpu", "VIT_CHECKPOINT": str(small_checkpoint)}
    with running_server(env, app=None) as server:
        port = server.port
        first = listening_workers(server, port, 2)
        command, command_env = vit_serve_command(port)
        seconds = [
            subprocess.run(
                command,
                env=os.environ | command_env | env | {"VIT_WORKERS": workers},
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            for workers in ("2", "1")
        ]
        assert listening_workers(server, port, 2) == first
        assert httpx.get(f"{server.base_url}/health/live", timeout=10).status_code == 200
    for second in seconds:
        output = second.stdout + second.stderr
        assert second.returncode == 3, output  # uvicorn's start-up failure status
        assert f"cannot listen on 127.0.0.1:{port}: [Errno 98] Address already in use" in output, output
        assert "Traceback" not in output
        # before any worker loads the model: one worker in this process bound the port only once it had, and
        # said so in uvicorn's own words
        assert "serving small from" not in output and "Started server process" not in output, output
