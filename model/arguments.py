"""argparse types for the commands' numeric options, with their ranges, and for their paths; their help's
format, the check of an output's folder, standard output that its reader may stop reading, and Ctrl-C.

A value out of range stops the command with argparse's one line naming the option, as a value of the
wrong type does. Unchecked, `--batch-size 0` ended in a ZeroDivisionError deep in training, `--epochs 0`
in a missing log file, and `--train-limit -5` or `--top-k -3` quietly meant "all but the last few".
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from model.device import resolve_device
from model.files import WriteError
from model.paths import mode_and_owner, path_problem, this_user


def integer(low: int, high: int | None = None) -> Callable[[str], int]:
    """A whole number of at least `low`, and at most `high` where given."""
    wanted = f"of at least {low}" if high is None else f"from {low} to {high}"

    def parse(text: str) -> int:
        value = int(text)
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text} is not a whole number {wanted}")
        return value

    parse.__name__ = "int"  # argparse's message for text that is not one: "invalid int value: 'x'"
    return parse


def real(low: float, high: float | None = None, *, above: bool = False, below: bool = False) -> Callable[[str], float]:
    """A finite number from `low` (or, with above, above it) up to `high` (or, with below, under it)."""
    start = f"above {low:g}" if above else f"from {low:g}"
    wanted = start if high is None else f"{start} {'up to but not including' if below else 'to'} {high:g}"

    def parse(text: str) -> float:
        value = float(text)
        within = math.isfinite(value) and (value > low if above else value >= low)
        if high is not None:
            within = within and (value < high if below else value <= high)
        if not within:
            raise argparse.ArgumentTypeError(f"{text} is not a number {wanted}")
        return value

    parse.__name__ = "float"
    return parse


def device_name(text: str) -> str:
    """A device that torch has on this machine (resolve_device), kept as written: "auto" is resolved
    where it is used, per process under torchrun."""
    try:
        resolve_device(text)
    except RuntimeError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def model_name(text: str) -> str:
    """A model's name (--name), which the v2 routes take as one segment of their path: /v2/models/NAME. A
    name with '/' in it served, but no v2 client could address it."""
    if not text.strip() or text != text.strip() or "/" in text or not text.isprintable():
        raise argparse.ArgumentTypeError(
            f"{text!r}: a model's name is one segment of /v2/models/NAME: not empty, without '/', control "
            "characters or spaces around it"
        )
    return text


def nonempty_path(text: str) -> Path:
    """A file or folder, refused where model.paths says it cannot be one: empty, or a URL."""
    if problem := path_problem(text):
        raise argparse.ArgumentTypeError(f"{text!r} is {problem}" if not text else f"{text} is {problem}")
    return Path(text)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default in its help, unless there is none to show: argparse's formatter wrote
    "(default: None)" after an option without one, and a second default after a help that gives its own."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, argparse.SUPPRESS) or action.required or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


POSITIVE = integer(1)
NON_NEGATIVE = integer(0)
PROBABILITY = real(0.0, 1.0)


def folder_problem(folder: Path) -> str | None:
    """Why this user cannot make `folder` or write in it, or None: found before the work, not after it."""
    existing = next(path for path in (folder, *folder.absolute().parents) if path.exists())
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{this_user()} may not write in {existing} ({mode_and_owner(existing)})"
    return None


def make_folder_for(path: Path, option: str, reads: Path | None = None) -> None:
    """Make the folder of the output file `path`, as vit-train makes its --out-dir, or raise a ValueError
    that names `option` and why it cannot be written: among them, that it is `reads`, the file the
    command reads (`vit-export --checkpoint m.safetensors --out m.safetensors` wrote ONNX over it)."""
    problem = f"{path} is a folder, not a file" if path.is_dir() else folder_problem(path.parent)
    if not problem and reads is not None and path.exists() and reads.exists() and os.path.samefile(path, reads):
        problem = f"the same file as {reads}, which this command reads; writing it would replace it"
    if problem:
        raise ValueError(f"{option} {path}: {problem}")
    path.parent.mkdir(parents=True, exist_ok=True)


def print_to_reader(text: str) -> bool:
    """Print `text` to standard output, flushed; False where its reader has gone (`vit-evaluate ... | head`
    reads ten lines and exits). Standard output is then /dev/null, so that the exit's own flush does not
    raise BrokenPipeError again, as Python's signal docs advise; a command exits 1 then, without a traceback.
    Where it cannot be written (`vit-predict photos/ > answers.txt` on a full disk), WriteError says why."""
    try:
        print(text, flush=True)
        return True
    except OSError as error:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if isinstance(error, BrokenPipeError):
            return False
        raise WriteError("the standard output", error.strerror or str(error)) from None


def interrupted_says(command: str, outcome: str) -> Callable[[Callable[..., int | None]], Callable[..., int | None]]:
    """A command's `main` that Ctrl-C ends with one line, `command: interrupted; outcome`, and status 130, as a
    shell gives a process that SIGINT ended, not with a traceback of wherever it was (loading a checkpoint,
    walking folders, exporting). Its files are written whole or not at all (`written`), so `outcome` holds."""

    def decorate(main: Callable[..., int | None]) -> Callable[..., int | None]:
        @functools.wraps(main)
        def interruptible(*args: object, **kwargs: object) -> int | None:
            try:
                return main(*args, **kwargs)
            except KeyboardInterrupt:
                print(f"{command}: interrupted; {outcome}", file=sys.stderr)
                return 128 + signal.SIGINT

        return interruptible

    return decorate
