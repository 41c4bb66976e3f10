"""Turning uploaded files into model inputs, with every check that maps bad input to an HTTP status."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from fastapi import HTTPException, UploadFile
from PIL import Image, UnidentifiedImageError
from starlette.datastructures import Headers

from app.decoder_pool import DecoderCrashError, DecoderPool, DecodeTimeoutError
from app.decoding import AspectRatioError, Decoded, DecodeJob, decode, opened
from app.errors import SEND_AS_MULTIPART
from model.images import ImageTooLargeError, PreprocessConfig, UnsupportedFormatError

logger = logging.getLogger("app.uploads")
# Browsers and curl label unknown files application/octet-stream, so only a declared non-image type is refused.
GENERIC_CONTENT_TYPES = {"", "application/octet-stream"}


@dataclass
class DecodedUpload:
    filename: str
    pixels: np.ndarray  # (C, H, W) uint8: converted and resized for the model, not yet normalised
    size: tuple[int, int]  # the upright picture's (width, height) as uploaded
    display: Image.Image | None = None  # upright RGB, within VIT_MAX_RENDER_PIXELS, when the caller asked


def check_multipart(headers: Headers) -> None:
    """An upload route reads multipart/form-data: another body (the raw image that `curl --data-binary` sends,
    JSON) is refused, 415, from its Content-Type, before it is received. It was read, and then refused, 422,
    as having no part named 'file', which for a URL-encoded form listed its bytes as part names."""
    content_type = headers.get("content-type", "").split(";")[0].strip().lower()
    bodiless = headers.get("content-length", "0") == "0" and "transfer-encoding" not in headers
    if content_type == "multipart/form-data" or (not content_type and bodiless):  # nothing sent: 422, no 'file'
        return
    if content_type == "application/x-www-form-urlencoded":
        sent = "this request's body is application/x-www-form-urlencoded, "
        sent += "what curl's -d and --data-binary declare by default"
    else:
        sent = f"this request's body is {content_type}" if content_type else "this request's body has no Content-Type"
    raise HTTPException(415, f"{SEND_AS_MULTIPART} (curl -F file=@image.png); {sent}")


def check_content_type(upload: UploadFile) -> None:
    content_type = (upload.content_type or "").split(";")[0].strip().lower()
    if content_type not in GENERIC_CONTENT_TYPES and not content_type.startswith("image/"):
        raise HTTPException(415, f"{upload.filename}: unsupported content type {content_type!r}; send an image")


@contextmanager
def image_errors(filename: str) -> Iterator[None]:
    """Map what reading an image can raise to an HTTP status, naming the file."""
    try:
        yield
    except (ImageTooLargeError, DecodeTimeoutError) as error:
        raise HTTPException(413, f"{filename}: {error}") from error
    except UnsupportedFormatError as error:
        raise HTTPException(415, f"{filename}: {error}") from error
    except AspectRatioError as error:
        raise HTTPException(400, f"{filename}: {error}") from error
    except DecoderCrashError as error:
        raise HTTPException(400, f"{filename}: could not be decoded ({error})") from error
    except UnidentifiedImageError as error:
        raise HTTPException(400, f"{filename}: not an image in a format we can read") from error
    except (OSError, SyntaxError, ValueError) as error:  # damaged data (libheif ends its reasons in a newline)
        raise HTTPException(400, f"{filename}: corrupt image ({str(error).strip()})") from error


@dataclass(frozen=True)
class UploadDecoder:
    """Checks and decodes encoded images for one model: its preprocessing, the limits, its decoder processes."""

    preprocess: PreprocessConfig
    max_pixels: int
    max_aspect_ratio: float
    inline_bytes: int  # files up to this size, declaring up to inline_pixels, decode on the event loop
    inline_pixels: int
    display_pixels: int  # the largest picture kept for size=original renders
    pool: DecoderPool

    async def decode(self, data: bytes, filename: str, display: bool = False) -> DecodedUpload:
        """Check and decode one encoded image, wherever it came from (an upload, a v2 BYTES element).

        A small file declaring a small picture is decoded right here: its size bounds the work, and a
        process hop would cost more than decoding it. Everything else, its header included, goes to a
        decoder process, under a CPU-time limit, and is stopped if the caller gives up.
        """
        if not data:
            raise HTTPException(400, f"{filename}: the file is empty")
        job = DecodeJob(data, self.preprocess, self.max_pixels, self.max_aspect_ratio, self.display_pixels * display)
        with image_errors(filename):
            header = opened(job) if len(data) <= self.inline_bytes else None
            if header is not None and header.width * header.height <= self.inline_pixels:
                decoded: Decoded = decode(job, header)
            else:
                decoded = await self.pool.decode(job)
        return DecodedUpload(filename, decoded.pixels, decoded.size, decoded.display)

    async def decode_all(self, files: list[tuple[bytes, str]]) -> list[DecodedUpload]:
        """`(data, filename)` pairs decoded at once, as far as the decoder processes allow."""
        return await _in_order([self.decode(data, filename) for data, filename in files])

    async def decode_uploads(self, uploads: list[UploadFile], display: bool = False) -> list[DecodedUpload]:
        """Multipart file parts decoded at once: each part's declared type is checked, then its bytes decoded."""
        return await _in_order([self._decode_upload(upload, display) for upload in uploads])

    async def _decode_upload(self, upload: UploadFile, display: bool) -> DecodedUpload:
        check_content_type(upload)
        return await self.decode(await upload.read(), upload.filename or "upload", display)


async def _in_order(decodings: list[Awaitable[DecodedUpload]]) -> list[DecodedUpload]:
    """Await them all concurrently; if any failed, raise the first error in order, as one-by-one decoding would."""
    if len(decodings) == 1:  # the common case, without gather's task
        return [await decodings[0]]
    outcomes = await asyncio.gather(*decodings, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    return outcomes
