"""Turning uploaded files into model inputs, with every check that maps bad input to an HTTP status."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from fastapi import HTTPException, UploadFile
from PIL import Image, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool

from model.preprocess import ImageTooLargeError, PreprocessConfig, UnsupportedFormatError, decode_image, preprocess_image

ALLOWED_FORMATS = {"PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "TIFF"}  # MPO: JPEG from many cameras
# Browsers and curl label unknown files application/octet-stream, so only a declared non-image type is refused.
GENERIC_CONTENT_TYPES = {"", "application/octet-stream"}


class BodyTooLargeError(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than the limit of {limit} bytes")


@dataclass
class DecodedUpload:
    filename: str
    image: Image.Image
    tensor: torch.Tensor  # (C, H, W), normalised for the model


def _check_content_type(upload: UploadFile) -> None:
    content_type = (upload.content_type or "").split(";")[0].strip().lower()
    if content_type not in GENERIC_CONTENT_TYPES and not content_type.startswith("image/"):
        raise HTTPException(415, f"{upload.filename}: unsupported content type {content_type!r}; send an image")


def _decode(data: bytes, filename: str, max_pixels: int, preprocess: PreprocessConfig) -> DecodedUpload:
    """Runs on a worker thread: decoding and preprocessing never block the event loop."""
    try:
        image = decode_image(data, max_pixels, ALLOWED_FORMATS)
    except ImageTooLargeError as error:
        raise HTTPException(413, f"{filename}: {error}") from error
    except UnsupportedFormatError as error:
        raise HTTPException(415, f"{filename}: {error}") from error
    except UnidentifiedImageError as error:
        raise HTTPException(400, f"{filename}: not an image in a format we can read") from error
    except (OSError, SyntaxError, ValueError) as error:  # what Pillow raises for damaged data
        raise HTTPException(400, f"{filename}: corrupt image ({error})") from error
    return DecodedUpload(filename, image, preprocess_image(image, preprocess))


async def decode_upload(upload: UploadFile, max_pixels: int, preprocess: PreprocessConfig) -> DecodedUpload:
    filename = upload.filename or "upload"
    _check_content_type(upload)
    data = await upload.read()
    if not data:
        raise HTTPException(400, f"{filename}: the file is empty")
    return await run_in_threadpool(_decode, data, filename, max_pixels, preprocess)
