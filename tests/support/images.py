"""Image files built in memory: well-formed ones, and headers that claim more than they hold."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def image_bytes(image: Image.Image | np.ndarray, format: str = "PNG", **options) -> bytes:
    """The encoded file of an image (or of a uint8 array), as an upload would carry it."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int, pixel_data: bytes = b"") -> bytes:
    """A grayscale PNG whose IHDR claims width x height, followed by `pixel_data` (zlib) if any."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = png_chunk(b"IDAT", pixel_data) if pixel_data else b""
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + idat + png_chunk(b"IEND", b"")
