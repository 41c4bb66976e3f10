"""One upload decoded: the header checks, the pixels the model takes, and the picture a heatmap is drawn on.

It runs in a decoder process (app/decoder_pool.py), or on the event loop for a file small enough that
its cost is bounded by its size. Nothing here imports torch, so that decoder processes stay small.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from model.images import (
    READS_AVIF,
    READS_HEIF,
    PreprocessConfig,
    convert_mode,
    drafted,
    finish_decoding,
    image_to_array,
    open_image,
    reduced,
)

# MPO: JPEG from many cameras; AVIF where Pillow reads it, HEIF (HEIC too) where pi-heif does (model/images.py)
ALLOWED_FORMATS = (
    {"PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "TIFF"}
    | ({"AVIF"} if READS_AVIF else set())
    | ({"HEIF"} if READS_HEIF else set())
)


class AspectRatioError(ValueError):
    """Squashed to a square, an extremely long strip would keep nothing."""


@dataclass(frozen=True)
class DecodeJob:
    data: bytes
    preprocess: PreprocessConfig
    max_pixels: int
    max_aspect_ratio: float
    display_pixels: int = 0  # > 0: also keep the upright picture, shrunk to at most this many pixels


@dataclass
class Decoded:
    pixels: np.ndarray  # (C, H, W) uint8 at the model's input size, not yet normalised
    display: Image.Image | None  # the upright picture in RGB for size=original renders, within display_pixels
    size: tuple[int, int]  # the upright picture's size as uploaded


def opened(job: DecodeJob) -> Image.Image:
    """The header alone, checked: format, pixel count, aspect ratio. Nothing is decoded yet."""
    image = open_image(job.data, job.max_pixels, ALLOWED_FORMATS)
    width, height = image.size
    if max(width, height) > job.max_aspect_ratio * min(width, height):
        raise AspectRatioError(f"a {width}x{height} image is beyond the aspect-ratio limit of {job.max_aspect_ratio}:1")
    return image


def decode(job: DecodeJob, image: Image.Image | None = None) -> Decoded:
    """Decode `job`, from its header `opened` already if the caller has it."""
    image = opened(job) if image is None else image
    width, height = image.size
    # What the model and the picture to draw on need, no more: both box-average a larger image anyway.
    display_side = min(width, height) * min(1.0, math.sqrt(job.display_pixels / (width * height)))
    image = finish_decoding(drafted(image, max(job.preprocess.decode_side, math.ceil(display_side))))
    pixels = image_to_array(image, job.preprocess)
    display = convert_mode(shrunk(image, job.display_pixels), channels=3) if job.display_pixels else None
    turned = (image.width >= image.height) != (width >= height)  # by its EXIF orientation
    return Decoded(pixels, display, (height, width) if turned else (width, height))


def shrunk(image: Image.Image, max_pixels: int) -> Image.Image:
    """The picture at most max_pixels large, its aspect kept: box-averaged by a whole factor, then resized."""
    width, height = image.size
    if width * height <= max_pixels:
        return image
    scale = math.sqrt(max_pixels / (width * height))
    size = (max(1, math.floor(width * scale)), max(1, math.floor(height * scale)))
    return reduced(image, min(size)).resize(size, Image.Resampling.BILINEAR)
