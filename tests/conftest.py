from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.config import env_file_settings
from model import DEFAULT_CHECKPOINT
from model.data import ImageDataset, load_dataset
from tests.support.commands import ROOT
from tests.support.models import save_small_checkpoint
from tests.support.server import APP, Server, running_server


def pytest_sessionstart(session: pytest.Session) -> None:
    """The tests start vit-serve and Compose in the checkout, and both read a .env there: a key put in it for
    `docker compose up` would guard every server the tests start, which would fail by the dozen, unexplained."""
    if settings := env_file_settings(ROOT / ".env"):
        pytest.exit(
            f"{ROOT / '.env'} sets {', '.join(sorted(settings))}, which vit-serve and Compose read where the tests "
            "start them; move it aside while they run",
            returncode=pytest.ExitCode.USAGE_ERROR,
        )


@pytest.fixture(scope="session")
def fashion_test() -> ImageDataset:
    """The real Fashion-MNIST test set; CI installs Debian's dataset-fashion-mnist, so this must not skip."""
    return load_dataset("fashion-mnist", "test")


@pytest.fixture(scope="session")
def shipped_checkpoint() -> Path:
    assert DEFAULT_CHECKPOINT.is_file(), f"the shipped checkpoint {DEFAULT_CHECKPOINT} is missing"
    return DEFAULT_CHECKPOINT


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised two-block model: fast to load, enough to exercise every path."""
    return save_small_checkpoint(tmp_path_factory.mktemp("checkpoint") / "small.safetensors")


@pytest.fixture
def shared_tmp_path() -> Iterator[Path]:
    """A temporary folder that any user may enter, for what a test does as another (as_unprivileged_user):
    pytest's own are private to the user running the tests. Removed afterwards, what it holds with it, folders
    left without permissions included."""
    with tempfile.TemporaryDirectory() as folder:
        Path(folder).chmod(0o755)
        yield Path(folder)


@pytest.fixture(scope="module")
def server_env() -> dict[str, str]:
    """The environment of the module's `server`; a test module overrides this fixture to change it."""
    return {"VIT_DEVICE": "cpu"}


@pytest.fixture(scope="module")
def server_app() -> str | None:
    """What the module's `server` runs: the app factory under uvicorn, or None for the vit-serve command."""
    return APP


@pytest.fixture(scope="module")
def server(server_env: dict[str, str], server_app: str | None) -> Iterator[Server]:
    """The real server on a loopback port, shared by a module's tests and stopped after them."""
    with running_server(server_env, server_app) as server:
        yield server
