"""DDP on the CPU with gloo: two processes split the data, stay in step, and only rank 0 writes."""

import os
import subprocess
import sys

import torch
import torch.multiprocessing as mp

from model.checkpoint import load_checkpoint
from model.train import Trainer, main
from tests.support.server import free_port

TRAIN_LIMIT = 128
RUN = [
    "--model",
    "nano",
    "--train-limit",
    str(TRAIN_LIMIT),
    "--test-limit",
    "64",
    "--batch-size",
    "32",
    "--epochs",
    "1",
    "--device",
    "cpu",
]


def record_rank(rank: int, world_size: int, port: int, out_dir: str, record_dir: str) -> None:
    """One torchrun-like process that also records which images it trained on and its final weights."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    seen: list[int] = []
    plan, run = Trainer.epoch_plan, Trainer.run

    def recording_plan(self, epoch):
        indices, choices = plan(self, epoch)
        seen.extend(indices.tolist())
        return indices, choices

    def run_and_record(self):
        run(self)
        torch.save({"seen": seen, "weights": self.model.state_dict()}, f"{record_dir}/rank{rank}.pt")

    Trainer.epoch_plan, Trainer.run = recording_plan, run_and_record
    main([*RUN, "--out-dir", out_dir])


def test_two_gloo_processes_split_the_data_and_end_with_identical_weights(tmp_path):
    out_dir, record_dir = tmp_path / "run", tmp_path / "records"
    record_dir.mkdir()
    mp.spawn(record_rank, args=(2, free_port(), str(out_dir), str(record_dir)), nprocs=2, join=True)
    first, second = (torch.load(record_dir / f"rank{rank}.pt", weights_only=True) for rank in (0, 1))
    assert len(first["seen"]) == len(second["seen"]) == TRAIN_LIMIT // 2
    assert set(first["seen"]).isdisjoint(second["seen"])
    assert set(first["seen"]) | set(second["seen"]) == set(range(TRAIN_LIMIT))
    for name, value in first["weights"].items():
        assert torch.equal(value, second["weights"][name]), name
    assert sorted(path.name for path in out_dir.iterdir()) == [
        "metrics.jsonl",
        "metrics.png",
        "model.safetensors",
        "state-e0001-1.pt",
        "state.pt",
    ]
    assert load_checkpoint(out_dir / "model.safetensors").training["processes"] == 2


def test_torchrun_launches_the_cli_and_writes_exactly_one_checkpoint(tmp_path):
    out_dir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        "-m",
        "model.train",
        *RUN,
        "--out-dir",
        str(out_dir),
    ]
    result = subprocess.run(
        command, check=False, capture_output=True, text=True, timeout=300, env=os.environ | {"OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list(out_dir.glob("*.safetensors"))) == 1
    assert result.stderr.count("epoch 1/") == 1  # one process logged
    checkpoint = load_checkpoint(out_dir / "model.safetensors")
    assert checkpoint.training["processes"] == 2 and checkpoint.training["epochs"] == 1
