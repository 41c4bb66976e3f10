"""An image folder's decoded images, kept in a run's folder, so that `--resume` and vit-evaluate read them
back instead of decoding every file again.

Decoding is what an image folder costs before the first step: photos of a few megapixels decode at tens
of milliseconds each, so 50,000 of them take minutes on a few cores, and a long run carried out in pieces
paid that at every piece. The images are kept as they are held in memory, (N, C, H, W) uint8, in one
.npy file per split (what `datasets` does with its Arrow cache files, on a smaller scale).

A file's name holds a digest of everything that decoding reads: each file's path, size and modification
time, the preprocessing's size, channels, filter and crop, Pillow's and pi-heif's versions (pi-heif decodes
HEIC) and DECODING_VERSION. A change to any of them decodes the files again, and the new images replace the old.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
import torch

from model.data import Decoder, decode_files
from model.files import WriteError, written
from model.images import HEIF_DECODER, PreprocessConfig
from model.memory import sized

DECODED_FOLDER = "decoded"  # in a run's folder
# Raise it when model/images.py or model/preprocess.py decode a file into other pixels than before.
DECODING_VERSION = 1


def fingerprint(paths: list[Path], preprocess: PreprocessConfig) -> str | None:
    """A digest of what decoding `paths` through `preprocess` depends on; None where a file cannot be looked
    at (decoding then says which, and why)."""
    digest = hashlib.sha256()
    decoding = {
        "version": DECODING_VERSION,
        "pillow": PIL.__version__,
        "heif": HEIF_DECODER,
        "image_size": preprocess.image_size,
        "channels": preprocess.channels,
        "resize": preprocess.resize,
        "crop_pct": preprocess.crop_pct,
    }  # not the mean and std: they are applied later, to these pixels
    digest.update(json.dumps(decoding, sort_keys=True).encode())
    for path in paths:
        try:
            stat = path.stat()
        except OSError:
            return None
        # surrogateescape: a name in bytes that are not UTF-8 is hashed as those bytes, not refused
        digest.update(f"{path.absolute()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode(errors="surrogateescape"))
    return digest.hexdigest()[:24]


@dataclass
class DecodedCache:
    """A Decoder that keeps what `decode` gives in `folder`, and reads it back for the same files decoded alike.

    `agree` turns this process's "I have them" into the job's: under torchrun every process must find
    the file, or all decode together (Distributed.decode is a collective). Only a process that `writes`
    keeps what was decoded; vit-evaluate reads a run's files and writes none. Where a file could not be
    read, nothing is kept: the run stops on it.
    """

    folder: Path
    decode: Decoder = decode_files
    agree: Callable[[bool], bool] = bool
    writes: bool = True

    def __call__(
        self, paths: list[Path], preprocess: PreprocessConfig, description: str
    ) -> tuple[torch.Tensor, dict[int, str]]:
        key = fingerprint(paths, preprocess)
        stem = re.sub(r"[^A-Za-z0-9]+", "-", description).strip("-") or "images"  # "decode train": decode-train
        path = self.folder / f"{stem}-{key}.npy"
        shape = (len(paths), *preprocess.image_shape)
        kept = read(path, shape) if key is not None else None
        if self.agree(kept is not None):
            return torch.from_numpy(kept), {}
        images, errors = self.decode(paths, preprocess, description)
        if key is not None and self.writes and not errors:
            self.keep(images, path, stem)
        return images, errors

    def keep(self, images: torch.Tensor, path: Path, stem: str) -> None:
        """Write `images` to `path` whole or not at all, and remove the files that they replace."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with written(path) as temporary:
                np.save(temporary, images.numpy(), allow_pickle=False)
        except (OSError, WriteError) as error:  # a full disk, a read-only run folder: the run goes on, decodes again
            reason = error.reason if isinstance(error, WriteError) else error.strerror or error
            print(f"{self.folder}: the decoded images are not kept ({reason}); --resume decodes again", file=sys.stderr)
            return
        for stale in self.folder.glob(f"{stem}-*.npy"):
            if stale != path:
                stale.unlink(missing_ok=True)
        print(
            f"{self.folder}: {len(images):,} decoded images kept ({sized(images.numel())}) "
            "for --resume and vit-evaluate",
            file=sys.stderr,
        )


def read(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """The images kept at `path`, or None where there are none of that shape (a damaged file is decoded again)."""
    try:
        images = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    return images if images.dtype == np.uint8 and images.shape == shape else None
