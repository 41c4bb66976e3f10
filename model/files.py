"""Files that the commands write, whole or not at all, and named in the one line that says why one was not."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class WriteError(Exception):
    """A file that could not be written, and the system's reason: `cannot write runs/a/model.safetensors (No space
    left on device)`. Nothing of it was left, and an earlier file of its name is as it was."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"cannot write {path} ({reason})")
        self.reason = reason


@contextmanager
def written(path: Path) -> Iterator[Path]:
    """A temporary file beside `path` for the caller to write, put in its place once whole (an atomic rename).

    A write that fails removes it. One that fails with an OSError (a full disk, a folder made read-only) comes out as
    WriteError: Pillow, Matplotlib, onnx and torch.save raised theirs from deep inside, as a traceback, after
    leaving an empty or partial file under the real name. The temporary is hidden, so that no listing of the folder
    takes it for one of its files (a state's shards, `state-e*.pt`), and keeps the suffix, by which writers choose
    a format (onnx: `.onnx`, protobuf; `.txtpb`, text; numpy adds `.npy` to a name without it).
    """
    temporary = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        yield temporary
        temporary.replace(path)
    except BaseException as error:
        with contextlib.suppress(OSError):  # where it could not be made, it cannot be removed either
            temporary.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise WriteError(path, error.strerror or str(error)) from error
        raise
