"""DDP on the CPU with gloo: two processes split the data, stay in step, and only rank 0 writes."""

import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

import model.data
import model.distributed
from model.checkpoint import load_checkpoint
from model.data import decode_files, default_preprocess, load_dataset
from model.decoded_cache import DecodedCache
from model.distributed import Distributed
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


def decode_rank(
    rank: int, world_size: int, port: int, folder: str, record_dir: str, gathered_rows: int = 0, kept: tuple = ()
) -> None:
    """One torchrun-like process that decodes the folder's training split with the job, and records which
    files it opened itself; with `gathered_rows`, the processes gather that many 16-pixel RGB images of each at once;
    with `kept`, each process keeps the split's decoded images in its folder there, as a run does in its own."""
    if gathered_rows:
        model.distributed.GATHERED_BYTES = gathered_rows * world_size * 3 * 16 * 16
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    opened, read = [], model.data.read_image_file

    def counted(path, preprocess):
        opened.append(path.name)
        return read(path, preprocess)

    model.data.read_image_file = counted
    distributed = Distributed.from_environment("cpu")
    try:
        preprocess = default_preprocess("imagefolder", 16, 3)
        decode = distributed.decode
        if kept:
            decode = DecodedCache(Path(kept[rank]), decode, distributed.all_agree, writes=distributed.is_main)
        dataset = load_dataset("imagefolder", "train", Path(folder), preprocess, decode=decode)
        images, errors = distributed.decode(sorted(Path(folder, "train", "bee").iterdir()), preprocess, "decode")
    except model.data.DatasetError as error:
        dataset, images, errors = str(error), None, None
    finally:
        dist.destroy_process_group()
    torch.save(
        {"opened": opened, "dataset": dataset, "images": images, "errors": errors}, f"{record_dir}/rank{rank}.pt"
    )


def write_ants_and_bees(folder: Path) -> Path:
    """An image folder of 14 training files, 7 of each class (blocks of 7 for two processes; the bees' 7 split
    4 and 3), and one validation file of each."""
    for split, count in (("train", 7), ("val", 1)):
        for label in ("ant", "bee"):
            (folder / split / label).mkdir(parents=True)
            for i in range(count):
                colour = (30 * i, 100 if label == "ant" else 200, 0)
                Image.new("RGB", (20, 12), colour).save(folder / split / label / f"{i}.png")
    return folder


def test_the_processes_of_a_job_each_decode_a_share_of_an_image_folder_and_all_get_all_of_it(tmp_path):
    folder, record_dir = write_ants_and_bees(tmp_path / "images"), tmp_path / "records"
    record_dir.mkdir()
    # Gathered 2 images of each process at a time: blocks of 7 in 4 rounds, the bees' 4 and 3 in 2.
    mp.spawn(decode_rank, args=(2, free_port(), str(folder), str(record_dir), 2), nprocs=2, join=True)
    records = [torch.load(record_dir / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    preprocess = default_preprocess("imagefolder", 16, 3)
    alone = load_dataset("imagefolder", "train", folder, preprocess)  # one process, every file
    bees, no_errors = decode_files(sorted((folder / "train" / "bee").iterdir()), preprocess, "decode")
    for record in records:
        assert torch.equal(record["dataset"].images, alone.images)
        assert torch.equal(record["dataset"].labels, alone.labels)
        assert torch.equal(record["images"], bees) and record["errors"] == no_errors == {}
    # Each file opened once in the job, not once in each process.
    assert [len(record["opened"]) for record in records] == [7 + 4, 7 + 3]
    assert sorted(records[0]["opened"] + records[1]["opened"]) == sorted(
        [path.name for path in (folder / "train").rglob("*.png")] + [f"{i}.png" for i in range(7)]
    )


def test_a_job_reads_kept_images_only_where_every_process_finds_them_and_decodes_together_otherwise(tmp_path):
    folder, record_dir = write_ants_and_bees(tmp_path / "images"), tmp_path / "records"
    record_dir.mkdir()
    alone = load_dataset("imagefolder", "train", folder, default_preprocess("imagefolder", 16, 3))
    first, second = str(tmp_path / "kept-0"), str(tmp_path / "kept-1")  # a folder of kept images per process

    def job(kept: tuple[str, str]) -> list[int]:
        """How many files each process of a job of two opened, the bees' 7 that it decodes after the split included."""
        mp.spawn(decode_rank, args=(2, free_port(), str(folder), str(record_dir), 0, kept), nprocs=2, join=True)
        records = [torch.load(record_dir / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
        for record in records:
            assert torch.equal(record["dataset"].images, alone.images)
        return [len(record["opened"]) for record in records]

    assert job((first, second)) == [7 + 4, 7 + 3]  # decoded together; the first process keeps them
    assert len(list(Path(first).iterdir())) == 1 and not Path(second).exists()
    assert job((first, second)) == [7 + 4, 7 + 3]  # one process lacks them: both decode, neither waits forever
    assert job((first, first)) == [4, 3]  # both find them: no file of the split is opened


def test_a_file_that_one_process_of_a_job_cannot_read_stops_every_process_with_the_same_message(tmp_path):
    folder, record_dir = tmp_path / "images", tmp_path / "records"
    for split, count in (("train", 4), ("val", 1)):
        for label in ("ant", "bee"):
            (folder / split / label).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (8, 8), (50 * i, 0, 0)).save(folder / split / label / f"{i}.png")
    (folder / "train" / "bee" / "3.png").write_bytes(b"not a picture")  # in the second process's share
    record_dir.mkdir()
    mp.spawn(decode_rank, args=(2, free_port(), str(folder), str(record_dir)), nprocs=2, join=True)
    said = [torch.load(record_dir / f"rank{rank}.pt", weights_only=False)["dataset"] for rank in (0, 1)]
    assert said[0] == said[1] and "1 of 8 image files cannot be read" in said[0] and "3.png" in said[0]
