"""Service settings, read from the environment with the prefix VIT_ (for example VIT_DEVICE=cuda)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "weights" / "vit-tiny-fashion-mnist.safetensors"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VIT_")

    checkpoint: Path = Field(DEFAULT_CHECKPOINT, description="the .safetensors checkpoint to serve")
    device: str = Field("auto", description="auto (cuda when available, else cpu), cpu, cuda, cuda:N")
    max_batch_size: int = Field(32, ge=1, description="most images run in one forward pass")
    max_wait_ms: float = Field(2.0, ge=0, description="how long a batch waits for more requests once it has one")
    queue_size: int = Field(256, ge=1, description="images waiting per endpoint before new ones get 503")
    request_timeout_s: float = Field(10.0, gt=0, description="a request not answered by then gets 504")
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1, description="largest request body")
    max_image_pixels: int = Field(25_000_000, ge=1, description="largest width x height, checked before decoding")
    max_files: int = Field(16, ge=1, description="most file parts in one /predict request")
    host: str = Field("0.0.0.0", description="vit-serve only: address to bind")
    port: int = Field(8000, description="vit-serve only: port to bind")


@lru_cache
def get_settings() -> Settings:
    return Settings()
