"""Image files built in memory: well-formed ones, and headers that claim more than they hold; and where the HEIC
files that nothing installed here can write are kept."""

from __future__ import annotations

import io
import itertools
import struct
import zlib

import numpy as np
from PIL import Image

from model.images import READS_HEIF
from tests.support.commands import ROOT


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


def png_with_empty_chunks(total_bytes: int) -> bytes:
    """A valid 28 x 28 PNG led by empty ancillary chunks up to total_bytes: cheap to send, slow to parse."""
    pixels = zlib.compress(b"\0" * (29 * 28))  # 28 rows, each a filter byte then 28 gray pixels
    good = png_header(28, 28, pixels)
    empty = png_chunk(b"zzZz", b"")  # ancillary, private, safe to copy: readers skip it
    padding = empty * max(0, (total_bytes - len(good)) // len(empty))
    return good[:33] + padding + good[33:]  # after the signature and IHDR


def jpeg_with_fill_bytes(total_bytes: int) -> bytes:
    """A valid 28 x 28 JPEG padded with 0xFF fill bytes before its markers (JPEG allows any number) to total_bytes."""
    good = image_bytes(Image.new("L", (28, 28), 128), "JPEG")
    return good[:2] + b"\xff" * max(0, total_bytes - len(good)) + good[2:]


def jpeg_with_repeated_scans(total_bytes: int) -> bytes:
    """A 4999 x 4999 progressive JPEG whose shortest scan repeats up to total_bytes: each repeat is decoded
    over every block again (about 1.4 CPU-s at 400 KB and 9 at 1.1 MB on a 2-core machine)."""
    ramp = np.linspace(0, 255, 4999, dtype=np.float32)
    picture = Image.fromarray(((ramp[None, :] + ramp[:, None]) / 2).astype(np.uint8)).convert("RGB")
    data = image_bytes(picture, "JPEG", progressive=True, quality=90)
    starts = [index for index in range(len(data) - 1) if data[index : index + 2] == b"\xff\xda"] + [len(data) - 2]
    shortest = min((data[a:b] for a, b in itertools.pairwise(starts)), key=len)
    repeats = max(1, (total_bytes - len(data)) // len(shortest))
    return data[:-2] + shortest * repeats + b"\xff\xd9"


# HEIC files made elsewhere (tests/images/README.md says how): nothing this project installs writes HEIC
HEIC_FILES = ROOT / "tests" / "images"
HEIC_EXAMPLE = ROOT / "examples" / "ankle-boot.heic"


def foreign_images() -> dict[str, tuple[str, bytes]]:
    """Files in formats that Pillow cannot read, by format name: a filename and the file's first bytes,
    as far as they tell the format (a HEIC photo's ftyp box where pi-heif is not installed, a JPEG XL
    codestream), or whole."""
    return {
        **(
            {}
            if READS_HEIF
            else {"HEIC": ("photo.heic", b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64))}
        ),
        "JPEG XL": ("photo.jxl", b"\xff\x0a\xfa\x7f\x01\x90\x08" + bytes(64)),
        "PDF": ("scan.pdf", image_bytes(Image.new("RGB", (28, 28)), "PDF")),
        "SVG": ("logo.svg", b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="28" height="28"/>'),
    }
