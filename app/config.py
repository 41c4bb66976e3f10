"""Service settings, read from the environment with the prefix VIT_ (for example VIT_DEVICE=cuda), to which
vit-serve adds those of a .env file in its working directory."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal, get_args

from dotenv import dotenv_values
from pydantic import AliasChoices, Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from model import DEFAULT_CHECKPOINT
from model.cpu import beyond_runnable_cpus
from model.device_names import DEVICE_NAMES, is_device_name
from model.paths import path_problem
from model.toolchain import missing_for_compile

# prometheus-client's multiprocess mode: where the processes of one vit-serve write their metrics. It is
# read when prometheus_client is imported, so vit-serve sets it before any process imports it.
METRICS_DIRECTORY_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
Precision = Literal["fp32", "bf16", "fp16"]  # also what /model reports (app/schemas.py)
Quantization = Literal["none", "int8"]


class Settings(BaseSettings):
    # populate_by_name: Settings(workers=2) works as well as VIT_WORKERS.
    model_config = SettingsConfigDict(env_prefix="VIT_", populate_by_name=True)

    checkpoint: Path = Field(DEFAULT_CHECKPOINT, description="the .safetensors checkpoint to serve")
    checkpoint_sha256: str | None = Field(None, description="if set, start-up refuses a checkpoint with another digest")
    device: str = Field("auto", description="auto (cuda when available, else cpu), cpu, cuda, cuda:N")
    max_batch_size: int = Field(32, ge=1, description="most images run in one forward pass")
    max_wait_ms: float = Field(
        0.0, ge=0, description="extra wait for more requests once a batch has one; 0 runs at once when idle"
    )
    queue_size: int = Field(256, ge=1, description="images waiting per endpoint before new ones get 503")
    shutdown_grace_s: float = Field(10.0, gt=0, description="on SIGTERM, the longest the drain and exit may take")
    request_timeout_s: float = Field(10.0, gt=0, description="a request not answered by then gets 504")
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1, description="largest request body")
    receive_timeout_s: float = Field(
        60.0,
        gt=0,
        description="a request's body must arrive within this of its headers, and (vit-serve) its headers within "
        "this of its first byte; past either, 408 and the connection is closed",
    )
    max_image_pixels: int = Field(25_000_000, ge=1, description="largest width x height, checked before decoding")
    max_aspect_ratio: float = Field(100.0, ge=1, description="longest side over shortest side, checked before decoding")
    max_files: int = Field(16, ge=1, description="most file parts in one /predict request")
    workers: int = Field(
        0,
        ge=0,
        validation_alias=AliasChoices("VIT_WORKERS", "WEB_CONCURRENCY"),
        description="server processes, each with its own model and batcher (uvicorn's WEB_CONCURRENCY works too); "
        "0: vit-serve starts one per CPU of the quota (at most 4) on the CPU, and with a model process one front "
        "end per CPU but one (at most 16)",
    )
    torch_threads: int = Field(0, ge=0, description="torch's CPU threads per process; 0: the CPU quota / workers")
    inline_decode_bytes: int = Field(
        8192, ge=0, description="files up to this size that declare at most VIT_INLINE_DECODE_PIXELS decode in place"
    )
    inline_decode_pixels: int = Field(
        16384, ge=0, description="images up to this many pixels (in small files) decode on the event loop"
    )
    decode_workers: int = Field(
        0, ge=0, description="decoder processes per server process; 0: its share of the CPU quota, at least 1"
    )
    decode_timeout_s: float = Field(  # at most an hour: the kernel's CPU limit is a whole number, and inf failed
        2.0,
        gt=0,
        le=3600,
        description="CPU time one image may take to decode, rounded up to whole seconds; beyond it, 413",
    )
    max_render_pixels: int = Field(
        1_048_576, ge=1, description="/attention?size=original draws on the upload shrunk to at most this many pixels"
    )
    precision: Precision = Field("fp32", description="autocast dtype: bf16 or fp16 on CUDA, bf16 on the CPU")
    quantize: Quantization = Field("none", description="int8: dynamic quantization of the linear layers (CPU)")
    inline_lone_batches: bool | None = Field(
        None,
        description="a batch of one input that finds the inference thread idle runs on the event loop instead: two "
        "thread hand-overs fewer per request at low load; unset: on when serving on the CPU with one torch thread",
    )
    compile: bool = Field(False, description="torch.compile the model at start-up (slower start, faster steps)")
    cuda_graphs: bool | None = Field(
        None,
        description="replay /predict's batch (normalisation, forward pass, softmax) from graphs captured at "
        "start-up for batch sizes 1, 2, 4, ... up to VIT_MAX_BATCH_SIZE, so that a small batch pays one launch "
        "instead of one per kernel; CUDA only; unset: on when serving on CUDA",
    )
    model_process: bool | None = Field(
        None,
        description="vit-serve only: run the model in a process of its own, fed by VIT_WORKERS front-end processes "
        "that parse HTTP and decode images, so that batches form across all of them; "
        "unset: on when serving on CUDA",
    )
    model_socket: str | None = Field(
        None, description="set by vit-serve for its front ends: the model process's socket"
    )
    model_connect_timeout_s: float = Field(
        300.0, gt=0, description="how long a front end waits for the model process to load and warm up"
    )
    expose_training: bool = Field(
        False, description="/model shows the training command line and the training machine's paths too"
    )
    host: str = Field("0.0.0.0", description="vit-serve only: address to bind")
    port: int = Field(8000, ge=1, le=65535, description="vit-serve only: port to bind")
    grpc_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="if set, the Open Inference Protocol over gRPC on this port too, at VIT_HOST (pip install "
        "'vit-serving[grpc]'); empty: none, where the image sets 8001",
    )
    root_path: str = Field(
        "",
        description="vit-serve only: the path prefix under which a proxy serves this server and which it strips "
        "(/vit: the proxy's /vit/predict is this server's /predict), as uvicorn's --root-path",
    )
    access_log: bool = Field(
        True, description="vit-serve: uvicorn's log line per request; and the gRPC service's per call, wherever it runs"
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="vit-serve only: uvicorn's text lines, or one JSON object per line"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        [], description="origins (comma-separated, or *) whose pages may call the API from a browser; empty: no CORS"
    )
    api_key: SecretStr | None = Field(
        None, description="if set, /predict, /attention and v2 infer need the header Authorization: Bearer <key>"
    )
    opentelemetry: bool = Field(
        False,
        description="FastAPI's own OpenTelemetry spans, metrics and logs, for a process with a configured provider "
        "(opentelemetry-instrument, say); off, no request pays FastAPI's look for one",
    )
    keep_alive_s: int = Field(
        75,
        ge=1,
        description="vit-serve only: how long an idle connection, new or between requests, stays open (why 75: "
        "app/cli.py)",
    )

    @field_validator("api_key")
    @classmethod
    def _sendable_key(cls, value: SecretStr | None) -> SecretStr | None:
        """An empty key let every request in: one without the header gave the empty credentials it matched.
        A key with spaces around it cannot be sent: HTTP drops them from a header's value."""
        key = value.get_secret_value() if value is not None else None
        if key is not None and (not key or key != key.strip()):
            raise ValueError("empty, or with spaces around it, so that no client can send it; unset it for no key")
        return value

    @field_validator("checkpoint", mode="before")
    @classmethod
    def _a_file(cls, value: object) -> object:
        """An empty VIT_CHECKPOINT was the current folder (Path('')), and start-up said `.: a folder`; a URL
        became a path (https:/host/m.safetensors) that start-up said did not exist."""
        if value == "":
            raise ValueError("empty; name a .safetensors file, or unset it to serve the shipped model")
        if isinstance(value, str) and (problem := path_problem(value)):
            raise ValueError(problem)
        return value

    @field_validator("checkpoint_sha256")
    @classmethod
    def _a_digest(cls, value: str | None) -> str | None:
        """A typo, or a digest cut short, refused at start as what it is, not as a checkpoint that differs."""
        if value is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", value):
            raise ValueError("not a sha256: 64 hexadecimal digits, as sha256sum prints them")
        return value

    @field_validator("torch_threads", "decode_workers")
    @classmethod
    def _within_the_cpus(cls, value: int) -> int:
        if problem := beyond_runnable_cpus(value):
            raise ValueError(problem)
        return value

    @field_validator("root_path")
    @classmethod
    def _path_prefix(cls, value: str) -> str:
        if value and not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+", value):
            raise ValueError("a path such as /vit: segments of letters, digits and . _ ~ -, no slash at the end")
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        """Refused here, at start, instead of in each worker's start-up."""
        if not is_device_name(value):
            raise ValueError(f"not a device: {DEVICE_NAMES}")
        return value

    @field_validator("port", "grpc_port", mode="before")
    @classmethod
    def _not_a_service_link(cls, value: object, info: ValidationInfo) -> object:
        """Kubernetes gives each pod VIT_PORT=tcp://10.96.0.12:8000 where a Service named vit is in its
        namespace (VIT_GRPC_PORT for one named vit-grpc); it was refused as 'not a valid integer', which did not
        say where it came from."""
        if isinstance(value, str) and re.fullmatch(r"(tcp|udp|sctp)://.+:\d+", value):
            variable = environment_name(info.field_name)
            service = variable.removesuffix("_PORT").lower().replace("_", "-")
            raise ValueError(
                f"what Kubernetes sets for a Service named {service}; set {variable} in the container's env, or "
                "enableServiceLinks: false in the pod's spec"
            )
        if info.field_name == "grpc_port" and value == "":
            return None  # how the image's 8001 is turned off: an environment can empty a variable, not unset it
        return value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value


def conflicts(settings: Settings, on_cuda: bool) -> list[str]:
    """What the device, or another setting, rules out, each with the reason. The engine refuses to start
    on any; vit-serve checks them first, so that one line says why before any process starts."""
    problems = []
    if not on_cuda:
        if settings.precision == "fp16":  # emulated on most CPUs, and far slower than fp32 (README, CPU options)
            problems.append("VIT_PRECISION=fp16 runs on CUDA only; on the CPU, bf16 is the mixed precision")
        if settings.cuda_graphs:
            problems.append("VIT_CUDA_GRAPHS runs on CUDA only")
    if settings.compile and (missing := missing_for_compile(on_cuda)):
        problems.append(f"VIT_COMPILE needs {missing}")
    if settings.quantize == "int8":
        if on_cuda:
            problems.append("VIT_QUANTIZE=int8 runs on the CPU only")
        if settings.precision != "fp32":
            problems.append("VIT_QUANTIZE=int8 runs with VIT_PRECISION=fp32 only: its int8 layers take fp32")
    return problems


class SettingsError(ValueError):
    """Settings that this machine or each other rule out (conflicts, or a device torch cannot use), found
    as a server process starts; the message names the variables."""


def environment_name(field: str) -> str | None:
    """The variable that sets a field of Settings (VIT_PORT for port), or None for no such field."""
    if (info := Settings.model_fields.get(field)) is None:
        return None
    alias = info.validation_alias
    return alias.choices[0] if isinstance(alias, AliasChoices) else Settings.model_config["env_prefix"] + field.upper()


ENV_FILE = Path(".env")  # in the working directory, as Compose reads the one beside its files
# Read by the Compose files, not by the server, and set in that same .env: the host's port that the container's
# is published on, and the host's folder of a checkpoint to serve and its file (docker-compose.weights.yml).
COMPOSE_VARIABLES = {"VIT_PUBLISHED_PORT", "VIT_PUBLISHED_GRPC_PORT", "VIT_WEIGHTS_DIR", "VIT_WEIGHTS_FILE"}


def env_file_settings(path: Path = ENV_FILE) -> dict[str, str]:
    """The VIT_ variables that a .env file sets and the environment does not, which vit-serve adds to its
    environment as it starts, as Compose does for a container: the shell's values win, and the file's other
    variables (COMPOSE_PROJECT_NAME, VIT_PUBLISHED_PORT) are left to Compose. A key put in .env for
    `docker compose up`, then `make serve`, served everyone without a word."""
    try:
        variables = dotenv_values(path) if path.is_file() else {}
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        raise SystemExit(f"vit-serve: cannot read {path.resolve()}: {reason}") from None
    return {
        name: value
        for name, value in variables.items()
        if name.startswith("VIT_") and name not in COMPOSE_VARIABLES and value is not None and name not in os.environ
    }


# What Kubernetes sets in every pod for each Service of its namespace: a Service named vit-api gives
# VIT_API_SERVICE_HOST, VIT_API_PORT_80_TCP_ADDR and so on. Not settings, and not typing mistakes either.
SERVICE_LINK = re.compile(
    r"VIT(_\w+)?_(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT(_\d+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)?)"
)


def unknown_variables(environment: Mapping[str, str]) -> dict[str, str]:
    """Each VIT_ variable that is no setting, with a line naming the setting it may have meant: pydantic-settings
    ignores them, so VIT_MAX_BATCHSIZE=64 served batches of 32, and VIT_APIKEY=... left every route open,
    without a word."""
    known = {name for field in Settings.model_fields if (name := environment_name(field))}
    lines = {}
    for name in sorted(environment):
        if not name.startswith("VIT_") or name in known | COMPOSE_VARIABLES or SERVICE_LINK.fullmatch(name):
            continue
        meant = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
        lines[name] = f"{name} is not a setting, and is ignored" + (f"; did you mean {meant[0]}?" if meant else "")
    return lines


SECRET_FIELDS = {  # settings whose value no error message shows (VIT_API_KEY)
    name for name, info in Settings.model_fields.items() if SecretStr in (info.annotation, *get_args(info.annotation))
}


def settings_problems(error: ValidationError) -> list[str]:
    """One line per setting that failed validation: the variable, the value it had, and what is wrong."""
    problems = []
    for problem in error.errors():
        field = str(problem["loc"][0]) if problem["loc"] else ""
        variable = environment_name(field) or field
        shown = "(hidden)" if field in SECRET_FIELDS else repr(problem["input"])
        problems.append(f"{variable}={shown}: {problem['msg']}")
    return problems


@lru_cache
def get_settings() -> Settings:
    return Settings()
