"""What can be checked of the Docker packaging without a Docker engine."""

import importlib
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
import yaml

from app.config import COMPOSE_VARIABLES, Settings
from app.healthcheck import ready_url
from app.main import create_app
from model.metadata import CHECKPOINT_NAME
from tests.support.server import free_port, running_server

ROOT = Path(__file__).resolve().parents[1]


def dockerfile_instruction(name: str) -> str:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    matches = re.findall(rf"^{name}\s+(.*)$", text, re.MULTILINE)
    assert matches, f"Dockerfile has no {name}"
    return matches[-1]


def dockerfile_arguments() -> dict[str, str]:
    """The build arguments and their defaults: TORCH_VERSION: 2.14.1."""
    return dict(re.findall(r"^ARG (\w+)=(\S*)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE))


def route_paths() -> set[str]:
    return set(create_app().openapi()["paths"])


def compose_services(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())["services"]


def test_compose_builds_the_dockerfile_and_publishes_port_8000_by_default():
    api = compose_services("docker-compose.yml")["api"]
    assert (ROOT / api["build"]["context"] / api["build"]["dockerfile"]).is_file()
    assert "ports" not in api  # published by the override that `docker compose up` reads, not by the scale setup
    assert compose_services("docker-compose.override.yml")["api"]["ports"] == [
        "${VIT_PUBLISHED_PORT:-8000}:8000",
        "${VIT_PUBLISHED_GRPC_PORT:-8001}:8001",  # the image's VIT_GRPC_PORT
    ]


def test_compose_passes_every_setting_from_the_shell_or_dot_env_but_where_the_container_listens():
    # VIT_API_KEY=... docker compose up (or a .env file) served without a key: only fixed values were passed.
    environment = compose_services("docker-compose.yml")["api"]["environment"]
    passed = dict(entry.partition("=")[::2] for entry in environment)  # VIT_X: from the shell; VIT_X=1: fixed
    settings = {f"VIT_{name.upper()}" for name in Settings.model_fields}
    internal = {
        "VIT_CHECKPOINT",
        "VIT_HOST",
        "VIT_PORT",
        "VIT_GRPC_PORT",
        "VIT_MODEL_SOCKET",
    }  # a path; the container's
    assert set(passed) == settings - internal
    assert {name: value for name, value in passed.items() if value} == {"VIT_SHUTDOWN_GRACE_S": "10"}
    grace = compose_services("docker-compose.yml")["api"]["stop_grace_period"]
    assert int(grace.removesuffix("s")) > float(passed["VIT_SHUTDOWN_GRACE_S"])


def test_gpu_override_reserves_a_gpu_and_builds_cuda_torch():
    override = compose_services("docker-compose.gpu.yml")["api"]
    devices = override["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert (
        override["build"]["args"]["TORCH_VARIANT"] == "cuda"
        and "/whl/cu" in override["build"]["args"]["TORCH_INDEX_URL"]
    )
    assert override["environment"]["VIT_DEVICE"] == "cuda"
    arguments = dockerfile_arguments()
    assert (arguments["TORCH_VARIANT"], arguments["TORCH_INDEX_URL"]) == ("cpu", "https://download.pytorch.org/whl/cpu")


def test_the_weights_override_serves_a_folder_of_the_host_read_only_and_needs_it_named():
    api = compose_services("docker-compose.weights.yml")["api"]
    [mount] = api["volumes"]
    assert (mount["type"], mount["target"], mount["read_only"]) == ("bind", "/srv/weights", True)
    assert mount["source"].startswith("${VIT_WEIGHTS_DIR:?")  # unset: Compose stops, and says what to set
    assert (
        api["environment"]["VIT_CHECKPOINT"] == f"/srv/weights/${{VIT_WEIGHTS_FILE:-{CHECKPOINT_NAME}}}"
    )  # vit-train's


def test_the_compose_files_own_variables_are_the_ones_that_vit_serve_leaves_to_compose():
    # Where one is not: VIT_WEIGHTS_DIR in .env, for Compose, is not a setting, said vit-serve, and make test stopped.
    used = {
        name for path in ROOT.glob("docker-compose*.yml") for name in re.findall(r"\$\{(VIT_\w+)", path.read_text())
    }
    settings = {f"VIT_{name.upper()}" for name in Settings.model_fields}
    assert used - settings == COMPOSE_VARIABLES


def test_the_images_torchvision_is_the_release_made_for_its_torch():
    # Each torch release has its own torchvision, since 2.0 with a minor version 15 higher (2.14 -> 0.29); another
    # one does not import beside it, and the image's build stops there.
    arguments = dockerfile_arguments()
    torch_major, torch_minor, _ = arguments["TORCH_VERSION"].split(".")
    torchvision_major, torchvision_minor, _ = arguments["TORCHVISION_VERSION"].split(".")
    assert (torch_major, torchvision_major) == ("2", "0")
    assert int(torchvision_minor) == int(torch_minor) + 15


def test_dockerfile_runs_vit_serve_and_healthcheck_hits_a_real_route():
    command = json.loads(dockerfile_instruction("CMD"))  # exec form is a JSON array
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert command == ["vit-serve"] and scripts["vit-serve"] == "app.cli:serve"
    defaults = Settings()
    grpc_port = re.search(r"^ENV VIT_GRPC_PORT=(\d+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)[1]
    assert (defaults.host, f"{defaults.port} {grpc_port}") == ("0.0.0.0", dockerfile_instruction("EXPOSE"))
    assert ready_url(defaults) == "http://127.0.0.1:8000/health/ready" and "/health/ready" in route_paths()
    assert dockerfile_instruction("USER") != "root"
    assert dockerfile_instruction("FROM") == "debian:bookworm-slim"


def test_the_healthcheck_asks_where_vit_serve_listens_and_fails_where_nothing_is_ready(small_checkpoint, tmp_path):
    healthcheck = json.loads(dockerfile_instruction("HEALTHCHECK").split(" CMD ", 1)[1])
    assert healthcheck[0] == "python"  # the image's, on its PATH
    check = lambda env: subprocess.run(
        [sys.executable, *healthcheck[1:]],
        env=os.environ | env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    env = {"VIT_DEVICE": "cpu", "VIT_WORKERS": "1", "VIT_CHECKPOINT": str(small_checkpoint)}
    with running_server(env, app=None) as server:
        for host in ("0.0.0.0", "127.0.0.1"):  # a wildcard is asked over loopback
            assert check({"VIT_HOST": host, "VIT_PORT": str(server.port)}).returncode == 0
        proxy = {name: "http://127.0.0.1:9" for name in ("http_proxy", "HTTP_PROXY")} | {"no_proxy": "", "NO_PROXY": ""}
        assert check(proxy | {"VIT_PORT": str(server.port)}).returncode == 0  # asked directly, not through a proxy
        other = check({"VIT_PORT": str(free_port())})
        assert other.returncode == 1 and other.stderr.startswith("not ready: ")
        (tmp_path / ".env").write_text(f"VIT_PORT={server.port}\n")  # where vit-serve would have read its port
        from_file = subprocess.run(
            [sys.executable, *healthcheck[1:]], cwd=tmp_path, env=os.environ | {"PYTHONPATH": str(ROOT)}, check=False
        )
        assert from_file.returncode == 0
    # IPv6's wildcard: the check asks 127.0.0.1, which one worker's socket (asyncio's, IPv6 alone) refused, so
    # the container was unhealthy; several workers' sockets took both families, as this one now does
    with running_server(env | {"VIT_HOST": "::"}, app=None) as server:
        assert check({"VIT_HOST": "::", "VIT_PORT": str(server.port)}).returncode == 0
        assert httpx.get(f"http://[::1]:{server.port}/health/ready", timeout=10).status_code == 200


def test_console_scripts_point_at_real_functions():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"vit-train", "vit-evaluate", "vit-predict", "vit-import", "vit-export", "vit-serve"}
    for target in scripts.values():
        module_name, attribute = target.split(":")
        assert callable(getattr(importlib.import_module(module_name), attribute))


def test_scale_override_puts_replicas_behind_the_proxy():
    services = compose_services("docker-compose.scale.yml")
    assert "ports" not in services["api"] and "8000" in services["api"]["expose"]
    assert services["api"]["environment"]["VIT_WORKERS"] == "1"  # the proxy spreads load; one process per replica
    assert services["proxy"]["ports"] == ["${VIT_PUBLISHED_PORT:-8000}:8000", "${VIT_PUBLISHED_GRPC_PORT:-8001}:8001"]
    assert services["proxy"]["depends_on"]["api"]["condition"] == "service_healthy"
    build = services["proxy"]["build"]
    proxy_dockerfile = (ROOT / build["context"] / build["dockerfile"]).read_text()
    assert "COPY nginx.conf.template /etc/nginx/nginx.conf.template" in proxy_dockerfile
    assert "USER 33:33" in proxy_dockerfile and 'CMD ["proxy-entrypoint"]' in proxy_dockerfile
    nginx = (ROOT / build["context"] / "nginx.conf.template").read_text()
    assert re.search(r"listen\s+8000;", nginx)
    assert "http://api:8000" in nginx and "proxy_pass $api;" in nginx
    # a draining replica is skipped, for the POSTs that every inference route takes as well
    assert "proxy_next_upstream error timeout http_503 non_idempotent;" in nginx
    # the replicas' body limit and request timeout, from the shell or .env, written in at start; their defaults
    assert "client_max_body_size @MAX_UPLOAD_BYTES@;" in nginx and "proxy_read_timeout @READ_TIMEOUT@;" in nginx
    assert services["proxy"]["environment"] == ["VIT_MAX_UPLOAD_BYTES", "VIT_REQUEST_TIMEOUT_S"]
    start = (ROOT / build["context"] / "proxy-entrypoint.sh").read_text()
    assert f'limit="${{VIT_MAX_UPLOAD_BYTES:-{Settings().max_upload_bytes}}}"' in start
    assert f'timeout="${{VIT_REQUEST_TIMEOUT_S:-{Settings().request_timeout_s:g}}}"' in start


def test_the_readmes_kubernetes_deployment_asks_for_what_the_docker_test_runs_the_image_with():
    readme = (ROOT / "README.md").read_text()
    deployment = yaml.safe_load(readme.split("A Deployment:\n\n```yaml\n")[1].split("```")[0])
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    security = container["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] and security["readOnlyRootFilesystem"]
    assert security["capabilities"] == {"drop": ["ALL"]} and security["allowPrivilegeEscalation"] is False
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]  # the --tmpfs /tmp of the test
    assert {"name": "tmp", "emptyDir": {}} in pod["volumes"]
    grpc_port = int(re.search(r"^ENV VIT_GRPC_PORT=(\d+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)[1])
    assert container["ports"] == [
        {"containerPort": Settings().port, "name": "http"},
        {"containerPort": grpc_port, "name": "grpc"},  # the image's
    ]
    assert container["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": Settings().port}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": Settings().port}
    assert pod["terminationGracePeriodSeconds"] > Settings().shutdown_grace_s  # the drain ends before the kill


def test_a_non_editable_install_carries_the_shipped_weights_and_predicts_with_them(tmp_path):
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, ROOT], check=True, timeout=300)
    subprocess.run([*pip, "install", "--no-deps", "--target", site, *wheels.glob("*.whl")], check=True, timeout=300)
    # From elsewhere than the source tree, so that only the installed copy can be imported.
    predict = [sys.executable, "-m", "model.predict", ROOT / "examples" / "ankle-boot.png", "--top-k", "1"]
    env = os.environ | {"PYTHONPATH": str(site)}
    result = subprocess.run(predict, check=False, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert "Ankle boot" in result.stdout
    assert (site / "model" / "weights" / "vit-tiny-fashion-mnist.safetensors").is_file()
    assert (site / "app" / "static" / "index.html").is_file()
