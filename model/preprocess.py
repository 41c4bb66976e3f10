"""The one path from an image to a model input, shared by evaluation and serving.

Its parameters travel in the checkpoint, so training and serving cannot disagree.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from model.images import PreprocessConfig, decode_image, image_to_array
from model.paths import access_problem

STANDARD_INPUT = Path("-")  # read_image_file reads the standard input for it


class UnreadableImageError(ValueError):
    """A file that is not an image Pillow can decode. The message names the file and says why."""


def image_to_uint8(image: Image.Image, config: PreprocessConfig) -> torch.Tensor:
    """Convert and resize a PIL image: (channels, size, size) uint8, as a tensor."""
    return torch.from_numpy(image_to_array(image, config))


def read_image_file(path: Path, config: PreprocessConfig) -> torch.Tensor:
    """An image file -> (C, H, W) uint8, decoded as the server decodes an upload: upright by its EXIF
    orientation, and a large JPEG drafted to twice the input size (model.images.decode_image).
    The path `-` is the standard input, as in most Unix tools (`curl -s URL | vit-predict -`)."""
    try:
        data = sys.stdin.buffer.read() if path == STANDARD_INPUT else path.read_bytes()
    except PermissionError as error:  # whose: in a container, not the user who mounted the photos
        raise UnreadableImageError(f"{path}: {access_problem(path) or error.strerror}") from None
    except OSError as error:
        raise UnreadableImageError(f"{path}: {error.strerror or error}") from None
    if not data:
        raise UnreadableImageError(f"{path}: the file is empty")
    try:
        return image_to_uint8(decode_image(data, min_side=config.decode_side), config)
    except UnidentifiedImageError:
        raise UnreadableImageError(f"{path}: not an image in a format Pillow can read") from None
    except OSError as error:  # truncated or damaged image data
        raise UnreadableImageError(f"{path}: {error.strerror or str(error).strip()}") from None
    except (SyntaxError, ValueError) as error:  # damaged data (libheif's reasons end in a newline), or a mode like LAB
        raise UnreadableImageError(f"{path}: {str(error).strip()}") from None


def normalize(pixels: torch.Tensor, config: PreprocessConfig) -> torch.Tensor:
    """uint8 (..., C, H, W) -> float, scaled to [0, 1] and standardised per channel."""
    mean, std = _channel_statistics(config.mean, config.std, pixels.device)
    return (pixels.float() / 255.0 - mean) / std


@functools.cache
def _channel_statistics(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, 1, 1) tensors, made once per device: copying them from the host at every call would make a
    training step on a GPU wait for all the work queued before it."""
    with torch.inference_mode(False):  # usable by training as well as inside inference_mode
        return torch.tensor(mean, device=device).view(-1, 1, 1), torch.tensor(std, device=device).view(-1, 1, 1)


def preprocess_image(image: Image.Image, config: PreprocessConfig) -> torch.Tensor:
    """A decoded PIL image -> the model's (C, H, W) float input."""
    return normalize(image_to_uint8(image, config), config)
