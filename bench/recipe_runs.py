"""The training runs of the model card, side by side on one GPU, in windows of machine time.

    python -m bench.recipe_runs --runs tiny-base-30,small-full-300 --window 420 --pack OUT

Each run is one `vit-train` command (RUNS). The runs start together, one process each on the same GPU:
a small ViT leaves most of an H100 idle between its kernels, so several runs fill it. Each gets
`--stop-after` to end inside the window, and a run whose folder holds a saved state resumes. So a run
longer than a window goes in pieces: run the same command again in the next window, with the run's
folder copied back.

`--pack DIR` gathers what a window brings back, in few files of at most 16 MiB: `runs.tar.gz` (every
run's log, metrics, curves and checkpoint, where it is small) and, for each unfinished run, its state
files under `DIR/<run>/`. `tar xzf runs.tar.gz -C <root>` and copying those files into `<root>/<run>/`
restores the folder that the next piece resumes from.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from model.run_state import shard_paths
from model.train import read_metrics
from model.train_options import STATE_NAME

FULL = ["--augment", "trivialaugment", "--mixup", "0.8", "--cutmix", "1.0", "--lr", "1.5e-3"]  # every augmentation
RUNS = {
    # What each recipe option does to the tiny model on a short schedule; the first is the CLI's defaults.
    "tiny-base-30": ["--model", "tiny", "--epochs", "30"],
    "tiny-trivialaugment-30": ["--model", "tiny", "--epochs", "30", "--augment", "trivialaugment"],
    "tiny-mix-30": ["--model", "tiny", "--epochs", "30", "--mixup", "0.8", "--cutmix", "1.0"],
    "tiny-repeated-30": ["--model", "tiny", "--epochs", "30", "--repeated-aug", "3"],
    "small-base-30": ["--model", "small", "--epochs", "30"],
    # The candidate: a larger model, every augmentation, a long schedule at a lower peak learning rate.
    "small-full-250": ["--model", "small", *FULL, "--epochs", "250", "--warmup-epochs", "10"],
    # Its recipe with one thing changed: twice the schedule, or 2-pixel patches (196 tokens instead of 49).
    "small-full-500": ["--model", "small", *FULL, "--epochs", "500", "--warmup-epochs", "20"],
    "small-p2-full-250": ["--model", "small", "--patch-size", "2", *FULL, "--epochs", "250", "--warmup-epochs", "10"],
    # Distillation from a convolutional teacher (model/teacher.py): the teacher first, in a window of its
    # own, then the candidate's recipe learning from it too. {root} is --root.
    "teacher-densenet-60": ["--model", "densenet-bc-100", "--epochs", "60", "--warmup-epochs", "3"],
    "small-distill-250": [
        *["--model", "small", *FULL, "--epochs", "250", "--warmup-epochs", "10"],
        *["--teacher", "{root}/teacher-densenet-60/model.safetensors"],
    ],
    # The candidate distilled into the tiny model, whose CPU serving stays as fast as the shipped one's.
    "tiny-distill-small-150": [
        *["--model", "tiny", "--epochs", "150", "--warmup-epochs", "5"],
        *["--teacher", "{root}/small-full-250/model.safetensors"],
    ],
}
SMALL_FILE_BYTES = 4 * 2**20  # checkpoints up to this size go into the archive
MAX_FILE_BYTES = 16 * 2**20


def command(name: str, root: Path, stop_after: float, device: str, extra: list[str]) -> list[str]:
    out = root / name
    resume = ["--resume"] if (out / STATE_NAME).exists() else []
    fast = ["--compile"] if device.startswith("cuda") else []  # on a CPU, compiling costs more than it saves
    recipe = [arg.format(root=root) for arg in RUNS[name]]
    args = [*recipe, *fast, *extra, "--name", name, "--out-dir", str(out), "--device", device]
    return [sys.executable, "-m", "model.train", *args, "--stop-after", str(stop_after), *resume]


def unfinished_teacher(name: str, root: Path) -> bool:
    """Whether the run's teacher has yet to finish: a run writes its checkpoint at every epoch, so the
    file alone does not say that the teacher is done."""
    recipe = RUNS[name]
    if "--teacher" not in recipe:
        return False
    teacher = Path(recipe[recipe.index("--teacher") + 1].format(root=root))
    return not teacher.exists() or not summary(root, [teacher.parent.name])[0]["finished"]


def summary(root: Path, names: list[str]) -> list[dict]:
    rows = []
    for name in names:
        metrics = read_metrics(root / name / "metrics.jsonl")
        last = metrics[-1] if metrics else {}
        planned = metrics[-1]["epochs_planned"] if metrics else None
        recipe = RUNS[name]  # before its first epoch, a run's planned epochs are its recipe's
        shown = planned or recipe[recipe.index("--epochs") + 1]
        rows.append(
            {
                "run": name,
                "epochs": f"{last.get('epoch', 0)}/{shown}",
                "finished": planned is not None and last.get("epoch") == planned,  # no epoch yet: not finished
                "test_accuracy": last.get("test_accuracy"),
                "train_s": last.get("elapsed_s"),
            }
        )
    return rows


def pack(root: Path, names: list[str], rows: list[dict], destination: Path) -> None:
    destination.mkdir(parents=True, exist_ok=True)
    with tarfile.open(destination / "runs.tar.gz", "w:gz") as archive:
        archive.add(root / "summary.json", arcname="summary.json")
        for name in names:
            state = {root / name / STATE_NAME, *shard_paths(root / name / STATE_NAME)}
            for path in sorted((root / name).glob("*")):
                if path in state or path.is_dir():
                    continue
                if path.suffix == ".safetensors" and path.stat().st_size > SMALL_FILE_BYTES:
                    continue
                archive.add(path, arcname=f"{name}/{path.name}")
    for name, row in zip(names, rows, strict=True):
        large = root / name / "model.safetensors"
        if row["finished"] and large.exists() and large.stat().st_size > SMALL_FILE_BYTES:
            (destination / name).mkdir(exist_ok=True)
            shutil.copy(large, destination / name / large.name)
        if not row["finished"] and (root / name / STATE_NAME).exists():
            (destination / name).mkdir(exist_ok=True)
            for path in [root / name / STATE_NAME, *shard_paths(root / name / STATE_NAME)]:
                shutil.copy(path, destination / name / path.name)
    too_large = [path for path in destination.rglob("*") if path.is_file() and path.stat().st_size > MAX_FILE_BYTES]
    if too_large:
        print(f"warning: over 16 MiB: {', '.join(map(str, too_large))}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", required=True, help=f"comma-separated names: {', '.join(RUNS)}")
    parser.add_argument("--root", type=Path, default=Path("runs/recipes"), help="one folder per run inside")
    parser.add_argument("--window", type=float, default=420.0, help="seconds that every run must end within")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--pack", type=Path, help="gather what the window brings back into this folder")
    parser.add_argument("--extra", default="", help="more vit-train options for every run, e.g. '--train-limit 512'")
    args = parser.parse_args()
    names = args.runs.split(",")
    unknown = [name for name in names if name not in RUNS]
    if unknown:
        parser.error(f"unknown runs {', '.join(unknown)}; choose from {', '.join(RUNS)}")

    waiting = [name for name in names if unfinished_teacher(name, args.root)]
    if waiting:
        parser.error(f"{', '.join(waiting)}: the teacher's run has not finished; finish it in earlier windows")

    started = time.monotonic()
    args.root.mkdir(parents=True, exist_ok=True)
    processes = {}
    for name in names:
        (args.root / name).mkdir(exist_ok=True)
        log = open(args.root / name / "log.txt", "a")  # noqa: SIM115 - the child writes it until it exits
        # Compilation and loading come out of the window too: stop training 60 s before it ends.
        processes[name] = subprocess.Popen(
            command(name, args.root, max(0.0, args.window - 60), args.device, shlex.split(args.extra)),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    for name, process in processes.items():
        remaining = args.window - (time.monotonic() - started)
        try:
            process.wait(timeout=max(1.0, remaining))
        except subprocess.TimeoutExpired:
            process.terminate()  # vit-train logs where the run stands; its last saved epoch stands for --resume
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:  # SIGTERM acts when Python runs again: a call that never returns
                process.kill()
                process.wait()
            print(f"{name}: still running at the end of the window, stopped", file=sys.stderr)
    rows = summary(args.root, names)
    for row in rows:
        accuracy = f"{100 * row['test_accuracy']:.2f} %" if row["test_accuracy"] is not None else "-"
        trained = f"{row['train_s']} s" if row["train_s"] is not None else "-"
        print(f"{row['run']:<24} epochs {row['epochs']:>8}  test {accuracy:>8}  train {trained}")
    (args.root / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    if args.pack:
        pack(args.root, names, rows, args.pack)


if __name__ == "__main__":
    main()
