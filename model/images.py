"""Images as the service and the datasets read them, before any tensor: decoding, checks and conversion.

Nothing here imports torch, so that a process that only decodes uploads stays small and starts fast
(app/decoder_pool.py). model/preprocess.py turns the result into the model's input.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError, features

# AVIF, which browsers save and many sites serve, is read by Pillow 11.3 and later where it was built with
# libavif (its wheels are); without it, foreign_format names the format in the refusal. An older Pillow does
# not know the module's name, and check_module raises on it: the package did not import there.
READS_AVIF = "avif" in features.modules and bool(features.check_module("avif"))

# HEIC, in which phones save their photos (iPhones by default), and HEIF: read through pi-heif, libheif with its
# HEVC decoder (libde265) and no encoder, so no GPL code (pillow-heif's wheels hold x265). It is a dependency
# below Python 3.15 (pyproject.toml); without it (3.15, or a GPU machine given the web stack alone), HEIC is
# refused by name (foreign_format), as before. libheif turns the picture by its own rotation and mirroring, and
# pi-heif then sets the EXIF orientation to 1, so that exif_transpose does not turn it twice.
try:
    import pi_heif
except ImportError:
    HEIF_DECODER = None
else:
    pi_heif.register_heif_opener()
    HEIF_DECODER = f"pi-heif {pi_heif.__version__}, libheif {pi_heif.libheif_info()['libheif']}"
READS_HEIF = HEIF_DECODER is not None


@dataclass(frozen=True)
class PreprocessConfig:
    image_size: int
    channels: int  # 1 (grayscale) or 3 (RGB)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: str = "bilinear"  # the PIL filter that resizes any image to image_size x image_size
    # None: the whole picture squashed to the square, as our models train. A fraction: timm's evaluation
    # transform, which pretrained ViTs expect: the shorter side resized to image_size / crop_pct, aspect kept,
    # and the centre square kept (center_crop).
    crop_pct: float | None = None

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, not {self.channels}")
        if self.crop_pct is not None and not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be above 0 and at most 1, not {self.crop_pct}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean and std need one value per channel")
        if not all(math.isfinite(value) for value in self.mean) or not all(
            math.isfinite(value) and value > 0 for value in self.std
        ):  # normalising by them would give infinite or NaN inputs
            raise ValueError(f"mean {self.mean} and std {self.std}: each mean finite, each std finite and above 0")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """One image as the model takes it, and as datasets and decoded uploads hold it: (C, H, W)."""
        return (self.channels, self.image_size, self.image_size)

    @property
    def decode_side(self) -> int:
        """The fewest pixels a picture's shorter side keeps where decoding shrinks it first (a JPEG's draft, a
        box reduction): twice the side it is resized to, so that the resize still averages."""
        return 2 * (self.image_size if self.crop_pct is None else math.floor(self.image_size / self.crop_pct))

    def to_dict(self) -> dict:
        values = asdict(self)
        if self.crop_pct is None:  # a squashing checkpoint's metadata stays as it was, for earlier readers
            del values["crop_pct"]
        return values

    @classmethod
    def from_dict(cls, values: dict) -> PreprocessConfig:
        return cls(
            image_size=int(values["image_size"]),
            channels=int(values["channels"]),
            mean=tuple(values["mean"]),
            std=tuple(values["std"]),
            resize=values.get("resize", "bilinear"),
            crop_pct=None if values.get("crop_pct") is None else float(values["crop_pct"]),
        )


RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


class ImageTooLargeError(ValueError):
    """The image header declares more pixels than allowed; nothing was decoded."""


OWN_FILES_MAX_PIXELS = 512 * 1024 * 1024  # Pillow refuses twice this, 1.07 gigapixels; its default refuses 179 M


@contextmanager
def own_files_pixel_limit() -> Iterator[None]:
    """Pillow's decompression-bomb limit raised, and its warning silenced, while a command reads the user's own
    files (vit-predict, vit-train, vit-evaluate): a 200-megapixel phone photo was refused as an attack, and one
    of 90 warned about with Pillow's source line. The server keeps Pillow's limit, under VIT_MAX_IMAGE_PIXELS.
    Pillow has one limit per process, so it is set here, around a whole command, not around each file read in
    threads; a large JPEG is drafted at its decoding anyway (drafted)."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = OWN_FILES_MAX_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = limit


class UnsupportedFormatError(ValueError):
    """A readable image in a format the caller does not accept."""


def open_image(data: bytes, max_pixels: int | None = None, formats: set[str] | None = None) -> Image.Image:
    """Read only the header of encoded bytes, and check the format and pixel count before any decoding.

    Raises UnidentifiedImageError for bytes that are no image, UnsupportedFormatError for an image in a
    format outside `formats`, or one that Pillow cannot read but foreign_format recognises.
    """
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise ImageTooLargeError(str(error)) from error
    except UnidentifiedImageError:
        if (name := foreign_format(data)) is None:
            raise
        if READS_HEIF and name in HEIF_BRANDS.values():  # read here, but not this file: truncated, or damaged
            raise ValueError(f"a {name} file whose header libheif cannot read") from None
        raise _not_accepted(name, formats) from None
    if formats is not None and image.format not in formats:
        raise _not_accepted(image.format, formats)
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}")
    return image


def _not_accepted(name: str | None, formats: set[str] | None) -> UnsupportedFormatError:
    accepted = f"use one of {', '.join(sorted(formats))}" if formats else "Pillow cannot read it"
    return UnsupportedFormatError(f"image format {name} is not accepted; {accepted}")


HEIF_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"heim": "HEIC", b"heis": "HEIC", b"mif1": "HEIF", b"msf1": "HEIF"}


# The suffixes of the formats foreign_format knows: a folder's pictures in them are named, not read (model/data.py).
FOREIGN_SUFFIXES = (
    {".jxl", ".svg", ".pdf"} | (set() if READS_AVIF else {".avif"}) | (set() if READS_HEIF else {".heic", ".heif"})
)


def foreign_format(data: bytes) -> str | None:
    """The name of an image format that Pillow cannot read, from its first bytes; None for others.

    So that a JPEG XL photo, a PDF or an SVG (and HEIC without pi-heif) is told that its format is not accepted, rather
    than that it is not an image. AVIF counts where Pillow is built without libavif.
    """
    head = data[:1024]
    if head[4:8] == b"ftyp":  # an ISO base media file: its major brand says which
        brand = head[8:12]
        return HEIF_BRANDS.get(brand) or ("AVIF" if brand in (b"avif", b"avis") else None)
    if head.startswith(b"%PDF-"):
        return "PDF"
    if head.startswith((b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")):  # a bare codestream, or a container
        return "JPEG XL"
    text = head.removeprefix(b"\xef\xbb\xbf").lstrip()
    if text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in text):
        return "SVG"
    return None


def finish_decoding(image: Image.Image) -> Image.Image:
    """Decode every pixel of an opened image (so corrupt data fails now, not in a batch) and apply EXIF orientation."""
    image.load()
    return ImageOps.exif_transpose(image)


def drafted(image: Image.Image, min_side: int) -> Image.Image:
    """An opened JPEG set to decode at the smallest DCT scale (1/2, 1/4, 1/8) that keeps both sides at
    least min_side: libjpeg then skips most of the work and memory of a large photo. Others unchanged."""
    if image.format in ("JPEG", "MPO"):
        image.draft(image.mode, (min_side, min_side))
    return image


def decode_image(
    data: bytes, max_pixels: int | None = None, formats: set[str] | None = None, min_side: int | None = None
) -> Image.Image:
    """Encoded bytes -> a decoded, upright PIL image, checked against `max_pixels` and `formats` first.

    With min_side, a JPEG may come out smaller, down to min_side on its shorter side (drafted).
    """
    image = open_image(data, max_pixels, formats)
    return finish_decoding(drafted(image, min_side) if min_side else image)


def _to_eight_bit(image: Image.Image) -> Image.Image:
    """PIL's convert() clips 16/32-bit integer pixels at 255 instead of scaling them.

    Others are stretched over their finite range, in which NaN counts as its low end and infinities as
    its ends: a float image (a depth map, say) that marks missing values so used to come out all black.
    """
    array = np.asarray(image)
    if image.mode.startswith("I;16"):
        return Image.fromarray((array.astype(np.uint32) >> 8).astype(np.uint8))
    array = array.astype(np.float64)
    finite = array[np.isfinite(array)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    array = np.nan_to_num(array, nan=low, posinf=high, neginf=low)
    scaled = (array - low) / max(high - low, 1.0) * 255.0
    return Image.fromarray(scaled.round().astype(np.uint8))


def convert_mode(image: Image.Image, channels: int) -> Image.Image:
    """Any PIL mode to 'L' or 'RGB'. Transparent pixels become black, Fashion-MNIST's background."""
    if image.mode.startswith("I") or image.mode == "F":
        image = _to_eight_bit(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    try:
        return image.convert("L" if channels == 1 else "RGB")
    except ValueError as error:  # a mode Pillow cannot convert, such as LAB: a valid image, not a corrupt one
        raise UnsupportedFormatError(f"image mode {image.mode} is not accepted ({error})") from error


REDUCIBLE_MODES = {"L", "LA", "RGB", "RGBA", "CMYK", "YCbCr", "I", "F"}  # what Image.reduce() takes


def reduced(image: Image.Image, min_side: int) -> Image.Image:
    """Box-averaged by the largest whole factor that keeps both sides at least min_side, in its own mode.

    A 5000 x 5000 upload is then converted and resized at a few hundred pixels, not at 25 million
    (an RGBA one used to need 400 MB for its composite over black).
    """
    factor = min(image.size) // min_side
    return image.reduce(factor) if factor >= 2 and image.mode in REDUCIBLE_MODES else image


def center_crop(size: tuple[int, int], config: PreprocessConfig) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """For a config with crop_pct, where a picture of `size` (width, height) is resized to and the box of that
    which the model sees: torchvision's Resize(image_size / crop_pct) and CenterCrop(image_size), as timm runs
    them, pixel for pixel."""
    width, height = size
    short = math.floor(config.image_size / config.crop_pct)
    resized = (short, int(short * height / width)) if width <= height else (int(short * width / height), short)
    left = round((resized[0] - config.image_size) / 2.0)  # round half to even, as torchvision does
    top = round((resized[1] - config.image_size) / 2.0)
    return resized, (left, top, left + config.image_size, top + config.image_size)


def seen_region(size: tuple[int, int], config: PreprocessConfig) -> tuple[float, float, float, float]:
    """The part of a picture of `size` that the model sees, as fractions of its width and height (left, top,
    right, bottom): all of it, squashed, unless the config crops."""
    if config.crop_pct is None:
        return 0.0, 0.0, 1.0, 1.0
    (width, height), (left, top, right, bottom) = center_crop(size, config)
    return left / width, top / height, right / width, bottom / height


def image_to_array(image: Image.Image, config: PreprocessConfig) -> np.ndarray:
    """Convert and resize a PIL image: (channels, size, size) uint8, the form datasets keep in memory."""
    image = convert_mode(reduced(image, config.decode_side), config.channels)
    size = (config.image_size, config.image_size)
    if config.crop_pct is not None:
        resized, box = center_crop(image.size, config)
        image = image.resize(resized, RESAMPLING[config.resize]).crop(box)
    elif image.size != size:
        image = image.resize(size, RESAMPLING[config.resize])
    array = np.asarray(image, dtype=np.uint8).reshape(config.image_size, config.image_size, config.channels)
    return array.transpose(2, 0, 1).copy()  # (C, H, W), contiguous and writable


def pixels_to_image(pixels: np.ndarray) -> Image.Image:
    """(C, H, W) uint8 -> a PIL image ('L' or 'RGB'): the inverse of image_to_array (a CPU tensor works too)."""
    array = np.asarray(pixels).transpose(1, 2, 0)
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
