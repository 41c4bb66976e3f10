"""Turning uploaded files into model inputs, with every check that maps bad input to an HTTP status."""

from __future__ import annotations

import asyncio
import errno
import logging
import tempfile
from collections.abc import Awaitable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from anyio import CapacityLimiter, to_thread
from fastapi import HTTPException, Request, Response, UploadFile
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.preprocess import (
    ImageTooLargeError,
    PreprocessConfig,
    UnsupportedFormatError,
    finish_decoding,
    image_to_uint8,
    open_image,
)

logger = logging.getLogger("app.uploads")
ALLOWED_FORMATS = {"PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "TIFF"}  # MPO: JPEG from many cameras
# Browsers and curl label unknown files application/octet-stream, so only a declared non-image type is refused.
GENERIC_CONTENT_TYPES = {"", "application/octet-stream"}


@dataclass
class DecodedUpload:
    filename: str
    image: Image.Image  # as uploaded, EXIF orientation applied
    pixels: torch.Tensor  # (C, H, W) uint8: converted and resized for the model, not yet normalised


def check_content_type(upload: UploadFile) -> None:
    content_type = (upload.content_type or "").split(";")[0].strip().lower()
    if content_type not in GENERIC_CONTENT_TYPES and not content_type.startswith("image/"):
        raise HTTPException(415, f"{upload.filename}: unsupported content type {content_type!r}; send an image")


@contextmanager
def image_errors(filename: str) -> Iterator[None]:
    """Map what reading an image can raise to an HTTP status, naming the file."""
    try:
        yield
    except ImageTooLargeError as error:
        raise HTTPException(413, f"{filename}: {error}") from error
    except UnsupportedFormatError as error:
        raise HTTPException(415, f"{filename}: {error}") from error
    except UnidentifiedImageError as error:
        raise HTTPException(400, f"{filename}: not an image in a format we can read") from error
    except (OSError, SyntaxError, ValueError) as error:  # what Pillow raises for damaged data
        raise HTTPException(400, f"{filename}: corrupt image ({error})") from error


async def answer_http_error(request: Request, error: StarletteHTTPException) -> Response:
    """FastAPI's answer, except when an upload could not be stored.

    Its body parser answers any failure 400 "There was an error parsing the body". Multipart parts of
    over 1 MB spool to the temporary directory; when that is full, the fault is the server's: 507, logged.
    """
    cause = error.__cause__
    if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
        logger.error("an upload could not be stored in %s: %s", tempfile.gettempdir(), cause)
        return JSONResponse(
            {"detail": "the server has no space left to receive the upload; try again later"},
            507,
            headers={"Retry-After": "30"},
        )
    return await http_exception_handler(request, error)


def _finish(image: Image.Image, filename: str, preprocess: PreprocessConfig) -> DecodedUpload:
    with image_errors(filename):
        image = finish_decoding(image)
        return DecodedUpload(filename, image, image_to_uint8(image, preprocess))


@dataclass(frozen=True)
class UploadDecoder:
    """Checks and decodes encoded images for one model: its preprocessing, the settings' limits, a bound on threads."""

    preprocess: PreprocessConfig
    max_pixels: int
    max_aspect_ratio: float
    inline_pixels: int  # images up to this many pixels decode on the event loop
    limiter: CapacityLimiter  # bounds the threads decoding larger images at once

    async def decode(self, data: bytes, filename: str) -> DecodedUpload:
        """Check and decode one encoded image, wherever it came from (an upload, a v2 BYTES element).

        The header is read on the event loop (format and size checks). Small images are decoded right
        there, since a thread hop costs more than decoding them; larger ones go to worker threads.
        """
        if not data:
            raise HTTPException(400, f"{filename}: the file is empty")
        with image_errors(filename):
            image = open_image(data, self.max_pixels, ALLOWED_FORMATS)
        width, height = image.size
        # Squashed to a square, an extremely long strip would keep nothing.
        if max(width, height) > self.max_aspect_ratio * min(width, height):
            raise HTTPException(
                400,
                f"{filename}: a {width}x{height} image is beyond the aspect-ratio limit of {self.max_aspect_ratio}:1",
            )
        if width * height <= self.inline_pixels:
            return _finish(image, filename, self.preprocess)
        return await to_thread.run_sync(_finish, image, filename, self.preprocess, limiter=self.limiter)

    async def decode_all(self, files: list[tuple[bytes, str]]) -> list[DecodedUpload]:
        """`(data, filename)` pairs decoded at once, as far as the limiter allows."""
        return await _in_order(self.decode(data, filename) for data, filename in files)

    async def decode_uploads(self, uploads: list[UploadFile]) -> list[DecodedUpload]:
        """Multipart file parts decoded at once: each part's declared type is checked, then its bytes decoded."""
        return await _in_order(self._decode_upload(upload) for upload in uploads)

    async def _decode_upload(self, upload: UploadFile) -> DecodedUpload:
        check_content_type(upload)
        return await self.decode(await upload.read(), upload.filename or "upload")


async def _in_order(decodings: Iterable[Awaitable[DecodedUpload]]) -> list[DecodedUpload]:
    """Await them all concurrently; if any failed, raise the first error in order, as one-by-one decoding would."""
    outcomes = await asyncio.gather(*decodings, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    return outcomes
