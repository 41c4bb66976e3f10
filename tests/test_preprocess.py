import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from model.images import READS_HEIF, ImageTooLargeError, PreprocessConfig, UnsupportedFormatError, decode_image
from model.paths import this_user
from model.preprocess import UnreadableImageError, preprocess_image, read_image_file
from tests.support.commands import ROOT, as_unprivileged_user
from tests.support.images import HEIC_EXAMPLE, foreign_images, image_bytes
from tests.support.models import FASHION_PREPROCESS

RGB_PREPROCESS = PreprocessConfig(image_size=32, channels=3, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def image_in_mode(mode: str) -> Image.Image:
    if mode == "I;16":
        return Image.fromarray(np.full((20, 30), 40000, dtype=np.uint16))
    return Image.new("RGB", (30, 20), (200, 100, 50)).convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "CMYK", "I;16", "LA", "1", "L", "I", "F"])
@pytest.mark.parametrize("config", [FASHION_PREPROCESS, RGB_PREPROCESS], ids=["gray", "rgb"])
def test_every_mode_gives_the_models_shape(mode, config):
    tensor = preprocess_image(image_in_mode(mode), config)
    size = config.image_size
    assert tensor.shape == (config.channels, size, size)
    assert tensor.dtype == torch.float32
    assert torch.isfinite(tensor).all()


def test_sixteen_bit_pixels_are_scaled_not_clipped():
    tensor = preprocess_image(image_in_mode("I;16"), PreprocessConfig(28, 1, (0.0,), (1.0,)))
    assert tensor.mean().item() == pytest.approx((40000 >> 8) / 255, abs=1e-3)


def test_a_float_image_with_nan_and_infinite_pixels_is_stretched_over_its_finite_values():
    depth = np.tile(np.linspace(1.0, 3.0, 28, dtype=np.float32), (28, 1))  # left to right, near to far
    marked = depth.copy()
    marked[0, 3], marked[5, 5], marked[9, 9] = np.nan, np.inf, -np.inf  # a depth map's missing values
    config = PreprocessConfig(28, 1, (0.0,), (1.0,))
    clean, holed = (preprocess_image(Image.fromarray(array, "F"), config)[0] for array in (depth, marked))
    assert clean[0, 0].item() == 0.0 and clean[0, -1].item() == 1.0
    others = torch.from_numpy(np.isfinite(marked))
    assert torch.equal(holed[others], clean[others])
    assert (holed[0, 3].item(), holed[5, 5].item(), holed[9, 9].item()) == (0.0, 1.0, 0.0)  # NaN low, +-inf the ends


def test_an_image_mode_that_cannot_be_converted_is_unsupported_not_corrupt():
    lab = io.BytesIO()
    Image.new("LAB", (28, 28), (50, 0, 0)).save(lab, format="TIFF")
    image = decode_image(lab.getvalue())
    with pytest.raises(UnsupportedFormatError, match="image mode LAB is not accepted"):
        preprocess_image(image, FASHION_PREPROCESS)


def test_transparent_pixels_become_black():
    image = Image.new("RGBA", (28, 28), (255, 255, 255, 0))
    tensor = preprocess_image(image, PreprocessConfig(28, 1, (0.0,), (1.0,)))
    assert tensor.abs().max().item() == 0.0


def test_normalisation_uses_the_configured_statistics():
    image = Image.new("L", (28, 28), 255)
    tensor = preprocess_image(image, FASHION_PREPROCESS)
    assert tensor[0, 0, 0].item() == pytest.approx((1.0 - 0.2860) / 0.3530, rel=1e-5)


def test_exif_orientation_is_applied():
    wide = Image.new("L", (40, 20), 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    wide.save(buffer, format="JPEG", exif=exif)
    assert decode_image(buffer.getvalue()).size == (20, 40)


def test_pixel_limit_is_checked_before_decoding():
    with pytest.raises(ImageTooLargeError, match="over the limit"):
        decode_image(image_bytes(Image.new("L", (100, 100))), max_pixels=5000)


def test_format_allowlist():
    with pytest.raises(UnsupportedFormatError, match="ICO"):
        decode_image(image_bytes(Image.new("L", (16, 16)), format="ICO"), formats={"PNG"})


@pytest.mark.parametrize("name", foreign_images())
def test_a_format_pillow_cannot_read_is_named_as_unsupported_rather_than_not_an_image(name, tmp_path):
    filename, data = foreign_images()[name]
    with pytest.raises(UnsupportedFormatError, match=f"^image format {name} is not accepted; use one of JPEG, PNG$"):
        decode_image(data, formats={"PNG", "JPEG"})
    (tmp_path / filename).write_bytes(data)  # in a training folder
    with pytest.raises(UnreadableImageError, match=f"{filename}: image format {name} is not accepted; Pillow cannot"):
        read_image_file(tmp_path / filename, FASHION_PREPROCESS)


@pytest.mark.skipif(not READS_HEIF, reason="pi-heif is not installed, so HEIC is refused by name")
def test_a_heic_file_that_libheif_cannot_open_is_damaged_not_a_format_refused(tmp_path):
    head = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64)  # a HEIC's first box, and no more
    with pytest.raises(ValueError, match="^a HEIC file whose header libheif cannot read$"):
        decode_image(head, formats={"HEIF", "PNG"})  # was: image format HEIC is not accepted; use one of HEIF, PNG
    (tmp_path / "IMG_0001.HEIC").write_bytes(HEIC_EXAMPLE.read_bytes()[:1500])
    with pytest.raises(UnreadableImageError, match=r"IMG_0001\.HEIC: \S[^\n]*\S\Z"):  # its newline cut
        read_image_file(tmp_path / "IMG_0001.HEIC", FASHION_PREPROCESS)


def test_without_pi_heif_the_package_imports_and_names_heic_as_foreign():
    # pi-heif is a dependency, but a GPU machine given only the web stack's wheels has none
    script = """
import sys
sys.modules["pi_heif"] = None
from model.images import FOREIGN_SUFFIXES, READS_HEIF, foreign_format
import app.main
from model.data import IMAGE_SUFFIXES as READ
print(READS_HEIF, ".heic" in FOREIGN_SUFFIXES, ".heic" in READ, foreign_format(b"\\x00\\x00\\x00\\x18ftypheic"))
"""
    result = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True", "False", "HEIC"]


def test_an_image_this_user_may_not_read_is_refused_naming_the_user_and_the_files_owner(shared_tmp_path):
    # Photos mounted into a container, whose user (vit, uid 10001) is not their owner: "Permission denied" said not
    # whose permission, nor what the file allows.
    photo = shared_tmp_path / "boot.png"
    Image.new("L", (8, 8)).save(photo)
    photo.chmod(0o600)

    def refusal() -> str:
        with pytest.raises(UnreadableImageError) as refused:
            read_image_file(photo, FASHION_PREPROCESS)
        return f"{this_user()}\n{refused.value}"

    user, said = as_unprivileged_user(refusal).split("\n")
    assert said == f"{photo}: permission denied: {user} may not read it (-rw-------, owned by uid {os.getuid()})"


def test_a_squashing_config_is_written_as_before_and_a_cropping_one_keeps_its_crop():
    squash = PreprocessConfig(28, 1, (0.5,), (0.5,))
    assert "crop_pct" not in squash.to_dict()  # checkpoints that squash stay readable by earlier versions
    crop = PreprocessConfig(224, 3, (0.5,) * 3, (0.5,) * 3, "bicubic", 0.875)
    assert PreprocessConfig.from_dict(crop.to_dict()) == crop and PreprocessConfig.from_dict(squash.to_dict()) == squash


def test_a_pillow_that_has_never_heard_of_avif_imports_the_package_and_names_avif_as_foreign():
    # Pillow before 11.2 has no "avif" module (here it is taken out), and features.check_module raises on a
    # name it does not know.
    script = """
from PIL import features
features.modules.pop("avif", None)
from model.images import FOREIGN_SUFFIXES, READS_AVIF, foreign_format
import app.main
print(READS_AVIF, ".avif" in FOREIGN_SUFFIXES, foreign_format(b"\\x00\\x00\\x00\\x1cftypavif" + bytes(32)))
"""
    result = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True", "AVIF"]
