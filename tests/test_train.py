"""The training CLI on a small subset: it writes a checkpoint the server serves, and resumes."""

import contextlib
import importlib
import io
import itertools
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib import font_manager
from PIL import Image
from safetensors.torch import load_file, save_file

import model.data
import model.evaluate
import model.predict
import model.train
from model import DEFAULT_CHECKPOINT
from model.arguments import folder_problem
from model.checkpoint import load_checkpoint
from model.data import image_files, load_dataset
from model.evaluate import confusion_matrix, preprocess_dataset
from model.evaluate import main as evaluate_main
from model.export import main as export_main
from model.import_weights import main as import_main
from model.metadata import CheckpointError, file_sha256, read_metadata
from model.optimizer import learning_rate, load_optimizer_state
from model.paths import this_user
from model.plots import confusion_figure, training_curves
from model.predict import classify
from model.predict import main as predict_main
from model.preprocess import normalize, preprocess_image
from model.run_state import load_state, shard_paths
from model.teacher import distillation_loss, load_teacher
from model.train import Trainer, initialise_from, main
from model.train_options import parse_args, run_name, warmup_warning
from model.vit import VisionTransformer
from tests.support.client import run
from tests.support.commands import ROOT, as_unprivileged_user, run_module
from tests.support.images import image_bytes
from tests.support.models import FASHION_PREPROCESS, save_small_checkpoint, save_teacher_checkpoint

TINY_RUN = ["--model", "nano", "--train-limit", "256", "--test-limit", "128", "--batch-size", "64", "--device", "cpu"]


def test_one_tiny_epoch_makes_a_checkpoint_the_server_predicts_with(tmp_path, fashion_test):
    out = tmp_path / "run"
    main([*TINY_RUN, "--epochs", "1", "--out-dir", str(out)])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in records] == [1]
    assert 0.0 <= records[0]["test_accuracy"] <= 1.0
    assert (out / "state.pt").is_file()
    with Image.open(out / "metrics.png") as curves:
        assert curves.format == "PNG" and curves.width > 300
    checkpoint = load_checkpoint(out / "model.safetensors")
    assert checkpoint.training["dataset"] == "fashion-mnist" and checkpoint.training["epochs"] == 1
    recipe = checkpoint.training["recipe"]
    assert recipe["label_smoothing"] == 0.1
    # the images trained on, not the defaults of --dataset imagefolder's options, which do not apply
    assert (recipe["image_size"], recipe["channels"], recipe["val_fraction"]) == (28, 1, None)
    assert checkpoint.training["command"].startswith("python -m model.train --model nano --train-limit 256")

    async def predict(client):
        image = image_bytes(fashion_test.images[0, 0].numpy())
        return await client.post("/predict", files={"file": ("0.png", image, "image/png")})

    response = run(predict, checkpoint=out / "model.safetensors", device="cpu")
    assert response.status_code == 200
    assert response.json()["model"] == "run"  # without --name, the run's folder's name: it was the file's, `model`
    assert len(response.json()["results"][0]["predictions"]) == 5


def test_resume_after_a_crash_gives_the_same_weights_as_a_straight_run(tmp_path, monkeypatch):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run = [*TINY_RUN, "--epochs", "2", "--ema-decay", "0.99"]
    main([*run, "--out-dir", str(straight)])

    save = Trainer.save

    class Crash(Exception):
        pass

    def save_then_crash(self, epoch, record):
        save(self, epoch, record)
        raise Crash  # killed right after the first epoch was written

    monkeypatch.setattr(Trainer, "save", save_then_crash)
    with pytest.raises(Crash):
        main([*run, "--out-dir", str(resumed)])
    monkeypatch.undo()
    main([*run, "--out-dir", str(resumed), "--resume"])

    epochs_logged = [json.loads(line)["epoch"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert epochs_logged == [1, 2]
    expected, actual = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert expected.keys() == actual.keys()
    for name in expected:  # the shipped (EMA) weights
        assert torch.allclose(expected[name], actual[name]), name
    expected_state = load_state(straight / "state.pt", torch.device("cpu"))
    actual_state = load_state(resumed / "state.pt", torch.device("cpu"))
    assert expected_state["ema"]["updates"] == actual_state["ema"]["updates"] == 8  # 2 epochs of 4 steps
    for name, value in expected_state["model"].items():  # the raw weights too
        assert torch.allclose(value, actual_state["model"][name]), name
    for name, value in expected_state["optimizer"]["state"][0].items():
        assert torch.allclose(value, actual_state["optimizer"]["state"][0][name]), name


def test_a_run_in_pieces_with_every_recipe_option_ends_as_a_straight_run_does(tmp_path, monkeypatch):
    recipe = [*TINY_RUN, "--epochs", "3", "--augment", "trivialaugment", "--mixup", "0.8", "--cutmix", "1.0"]
    recipe += ["--repeated-aug", "2", "--warmup-epochs", "1"]
    straight, pieces = tmp_path / "straight", tmp_path / "pieces"
    main([*recipe, "--out-dir", str(straight)])
    monkeypatch.setattr("model.run_state.MAX_FILE_BYTES", 100_000)  # a 139 k-parameter model: several files
    main([*recipe, "--out-dir", str(pieces), "--stop-after", "0"])  # one epoch, then out of time
    assert [json.loads(line)["epoch"] for line in (pieces / "metrics.jsonl").read_text().splitlines()] == [1]
    first_shards = shard_paths(pieces / "state.pt")
    assert len(first_shards) > 5 and all(path.stat().st_size <= 100_000 for path in first_shards)
    main([*recipe, "--out-dir", str(pieces), "--resume", "--stop-after", "0"])
    # Options left out are the run's own, from its state where only the state files were copied along; the last
    # epoch: nothing to stop
    (pieces / "model.safetensors").unlink()
    main(["--out-dir", str(pieces), "--resume", "--stop-after", "0", "--device", "cpu"])
    assert [json.loads(line)["epoch"] for line in (pieces / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert {path.name.split("-")[1] for path in shard_paths(pieces / "state.pt")} == {"e0003"}  # older ones gone
    expected, actual = load_file(str(straight / "model.safetensors")), load_file(str(pieces / "model.safetensors"))
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    recipe_saved = load_checkpoint(pieces / "model.safetensors").training["recipe"]
    assert recipe_saved["augment"] == "trivialaugment" and recipe_saved["repeated_aug"] == 2


@pytest.mark.parametrize("policy", [[], ["--augment", "trivialaugment"]], ids=["plain", "policy"])
def test_training_images_too_large_for_the_device_stay_in_host_memory_and_train_alike(
    policy, tmp_path, monkeypatch, capsys
):
    run = [*TINY_RUN, "--epochs", "2", "--warmup-epochs", "1", *policy]
    main([*run, "--out-dir", str(tmp_path / "device")])
    asked = []

    def too_large(nbytes, device):
        asked.append(nbytes)
        return False

    monkeypatch.setattr("model.train.fits_on_device", too_large)
    main([*run, "--out-dir", str(tmp_path / "host")])
    assert asked == [256 * 28 * 28]  # the 256 training images, or the epoch's 256 augmented ones
    assert "they stay in host memory, and each batch is copied over" in capsys.readouterr().err
    expected, actual = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("device", "host"))
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


def test_a_file_of_the_run_that_cannot_be_written_stops_it_in_one_line_that_says_what_is_saved(tmp_path):
    stopped = run_module("model.train", *TINY_RUN, "--epochs", "1", "--out-dir", tmp_path, max_file_bytes=200_000)
    assert stopped.returncode == 1 and "Traceback" not in stopped.stderr, stopped.stderr[-2000:]
    assert stopped.stderr.splitlines()[-2:] == [  # the epoch ran; its checkpoint could not be written
        "epoch 1/1  " + stopped.stderr.split("epoch 1/1  ")[1].splitlines()[0],
        f"vit-train: cannot write {tmp_path}/model.safetensors (File too large); nothing of this run is saved",
    ]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["metrics.jsonl"]  # no part of a file is left


def test_a_full_disk_keeps_the_last_epochs_state_whole_and_resume_goes_on_from_it_once_there_is_room(
    tmp_path, monkeypatch
):
    """/dev/full, where a temporary file of the state goes, is a disk that fills as the file is written."""
    monkeypatch.setattr("model.run_state.MAX_FILE_BYTES", 100_000)  # the state in shards, as a larger model's is
    run, out = [*TINY_RUN, "--epochs", "2", "--out-dir", str(tmp_path)], tmp_path
    main([*TINY_RUN, "--epochs", "1", "--out-dir", str(out)])
    (out / ".state-e0002-2.tmp.pt").symlink_to("/dev/full")  # the second shard of the second epoch's state
    with pytest.raises(SystemExit) as stop:
        main([*run, "--resume"])
    assert str(stop.value) == (
        f"vit-train: cannot write {out}/state-e0002-2.pt (No space left on device); {out} holds the run up to "
        "epoch 1 of 2, its checkpoint included; --resume continues it"
    )
    assert not any(".tmp" in path.name for path in out.iterdir())
    assert load_state(out / "state.pt", torch.device("cpu"))["epoch"] == 0  # the first epoch's state, whole
    main([*run, "--resume"])
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert all(path.name.startswith("state-e0002-") for path in shard_paths(out / "state.pt"))


def test_resume_of_a_finished_run_says_it_is_done_and_one_of_fewer_epochs_is_refused(tmp_path, capsys):
    main([*TINY_RUN, "--epochs", "2", "--out-dir", str(tmp_path)])
    files = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    capsys.readouterr()
    main([*TINY_RUN, "--epochs", "2", "--out-dir", str(tmp_path), "--resume"])  # what a window's script does
    assert capsys.readouterr().err.splitlines()[-1] == f"{tmp_path}: all 2 epochs are done; a larger --epochs trains on"
    with pytest.raises(SystemExit, match=r"state.pt has trained 2 epochs, more than --epochs 1; pass the run's"):
        main([*TINY_RUN, "--epochs", "1", "--out-dir", str(tmp_path), "--resume"])  # used to print "epochs 3..1"
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == files


def test_resume_with_other_options_than_the_run_was_trained_with_is_refused_before_any_data_is_read(tmp_path):
    # The resumed run used the new values without a word, and its checkpoint's recipe claimed them for all of it.
    main([*TINY_RUN, "--epochs", "1", "--out-dir", str(tmp_path)])
    files = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    other = ["--lr", "0.001", "--no-flip", "--teacher", str(tmp_path / "model.safetensors"), "--train-limit", "128"]
    with pytest.raises(SystemExit) as stop:
        main([*TINY_RUN, *other, "--epochs", "2", "--out-dir", str(tmp_path), "--resume"])
    assert str(stop.value) == (
        f"vit-train: --resume: {tmp_path} was trained with --lr 0.002, --flip, no --teacher, --train-limit 256; "
        f"this command gives --lr 0.001, --no-flip, --teacher {tmp_path / 'model.safetensors'}, --train-limit 128. "
        "Leave those out to take the run's own (--epochs may grow, and --stop-after, --device and the speed options "
        "may change), or --force to start over"
    )
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == files
    main(
        [*TINY_RUN, "--epochs", "2", "--stop-after", "600", "--name", "renamed", "--out-dir", str(tmp_path), "--resume"]
    )
    assert read_metadata(tmp_path / "model.safetensors")["training"]["epochs"] == 2


def test_resume_where_there_is_no_run_is_refused_before_any_data_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(model.train, "load_dataset", lambda *args, **kwargs: pytest.fail("the data was read"))
    with pytest.raises(SystemExit) as stop:  # it said so once the data was decoded: minutes, for a large folder
        main([*TINY_RUN, "--out-dir", str(tmp_path / "typo"), "--resume"])
    state = tmp_path / "typo" / "state.pt"
    assert str(stop.value) == f"vit-train: --resume: {state} does not exist; no run to continue there"


def test_a_state_with_a_shard_missing_or_cut_short_is_named_in_a_line_not_a_traceback(tmp_path, monkeypatch):
    monkeypatch.setattr("model.run_state.MAX_FILE_BYTES", 100_000)
    main([*TINY_RUN, "--epochs", "1", "--out-dir", str(tmp_path)])
    shard = shard_paths(tmp_path / "state.pt")[-1]
    kept = shard.read_bytes()
    shard.unlink()  # a copy to another machine that left it out: FileNotFoundError's traceback
    with pytest.raises(SystemExit) as stop:
        main([*TINY_RUN, "--epochs", "2", "--out-dir", str(tmp_path), "--resume"])
    assert str(stop.value) == (
        f"vit-train: --resume: {tmp_path / 'state.pt'} needs {shard}, which is missing: copy every state-* file; "
        "--force starts over"
    )
    shard.write_bytes(kept[: len(kept) // 2])  # cut short: torch's traceback advised weights_only=False
    said = rf"^vit-train: --resume: {shard}: not a file of the state that vit-train writes, or one cut short"
    with pytest.raises(SystemExit, match=said + r"( \(.+\))?; --force starts over$"):  # torch's reason, or the zip's
        main([*TINY_RUN, "--epochs", "2", "--out-dir", str(tmp_path), "--resume"])


def test_resume_keeps_a_saved_ema_and_refuses_to_drop_it_or_to_invent_a_missing_one(tmp_path):
    with_ema, without_ema = tmp_path / "ema", tmp_path / "plain"
    main([*TINY_RUN, "--epochs", "1", "--ema-decay", "0.99", "--out-dir", str(with_ema)])
    main([*TINY_RUN, "--epochs", "1", "--out-dir", str(without_ema)])
    with pytest.raises(SystemExit, match="trained with --ema-decay 0.99; this command gives --ema-decay 0.0. Leave"):
        main([*TINY_RUN, "--epochs", "2", "--ema-decay", "0", "--out-dir", str(with_ema), "--resume"])
    with pytest.raises(SystemExit, match="trained with --ema-decay 0.0; this command gives --ema-decay 0.99. Leave"):
        main([*TINY_RUN, "--epochs", "2", "--ema-decay", "0.99", "--out-dir", str(without_ema), "--resume"])
    main(["--epochs", "2", "--device", "cpu", "--out-dir", str(with_ema), "--resume"])  # left out: the run's EMA
    assert load_state(with_ema / "state.pt", torch.device("cpu"))["ema"]["updates"] == 8  # 2 epochs of 4 steps


def test_resume_refuses_a_run_on_other_classes_or_into_another_model_in_one_line(tmp_path):
    images = tmp_path / "images"
    for index, label in enumerate(("ant", "bee", "cow")):
        (images / label).mkdir(parents=True)
        for i in range(4):
            Image.new("L", (8, 8), 80 * index + i).save(images / label / f"{i}.png")
    out, tiny, tuned = tmp_path / "run", tmp_path / "tiny", tmp_path / "tuned"
    folder = ["--dataset", "imagefolder", "--data-dir", str(images), "--image-size", "8", "--channels", "1"]
    folder += ["--device", "cpu"]
    run = [*folder, "--model", "nano", "--out-dir", str(out)]
    main([*run, "--epochs", "2", "--stop-after", "0"])
    with pytest.raises(
        SystemExit,
        match=rf"^vit-train: --resume: {out} was trained with --model nano; this command gives --model tiny\. Leave",
    ):
        main([*run, "--epochs", "2", "--resume", "--model", "tiny"])
    # A run from a checkpoint, resumed from another one (its path may differ on another machine): the weights tell.
    main([*folder, "--model", "tiny", "--out-dir", str(tiny), "--epochs", "1"])
    main(
        [
            *folder,
            "--init-from",
            str(out / "model.safetensors"),
            "--out-dir",
            str(tuned),
            "--epochs",
            "2",
            "--stop-after",
            "0",
        ]
    )
    with pytest.raises(
        SystemExit, match=r"^vit-train: --resume: .*state.pt holds another model .* Missing key\(s\)"
    ) as stop:
        main(
            [
                *folder,
                "--init-from",
                str(tiny / "model.safetensors"),
                "--out-dir",
                str(tuned),
                "--epochs",
                "2",
                "--resume",
            ]
        )
    assert f"(the run was started with --init-from {out / 'model.safetensors'} --image-size 8; pass that again)" in str(
        stop.value
    )
    (images / "cow").rename(images / "cat")  # as many classes: the weights would load, each output another label
    with pytest.raises(
        SystemExit,
        match=r"trained on the classes ant, bee, cow, and the data now has ant, bee, cat \(new: cat; gone: cow\)$",
    ):
        main([*run, "--epochs", "2", "--resume"])


def test_a_resumed_image_folder_run_and_vit_evaluate_read_the_decoded_images_not_the_files(
    tmp_path, monkeypatch, capsys
):
    images = tmp_path / "images"
    for index, label in enumerate(("ant", "bee")):
        (images / label).mkdir(parents=True)
        for i in range(6):
            Image.new("L", (8, 8), 120 * index + 10 * i).save(images / label / f"{i}.png")
    run = ["--dataset", "imagefolder", "--data-dir", str(images), "--image-size", "8", "--channels", "1"]
    run += ["--model", "nano", "--device", "cpu", "--batch-size", "4", "--epochs", "2"]
    main([*run, "--out-dir", str(tmp_path / "whole")])
    out = tmp_path / "pieces"
    main([*run, "--out-dir", str(out), "--stop-after", "0"])
    assert sorted(path.name[:12] for path in (out / "decoded").iterdir()) == ["decode-test-", "decode-train"]

    def no_file_decoded(path, preprocess):
        raise AssertionError(f"{path} was decoded again")

    monkeypatch.setattr("model.data.read_image_file", no_file_decoded)
    capsys.readouterr()
    main([*run, "--out-dir", str(out), "--resume"])
    assert "epoch 2/2" in capsys.readouterr().err
    whole, pieces = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("whole", "pieces"))
    for name, value in whole.items():
        assert torch.equal(value, pieces[name]), name
    evaluate_main(["--checkpoint", str(out / "model.safetensors"), "--device", "cpu"])
    share = f"{images}'s held-out share (--val-fraction 0.2, --seed 0, as at training)"
    assert capsys.readouterr().out.splitlines()[0].endswith(f"top-1 on 2 imagefolder test images, {share}")


def test_a_run_and_vit_evaluate_walk_each_class_folder_of_a_train_and_val_tree_once(tmp_path, monkeypatch):
    for split, count in (("train", 3), ("val", 1)):
        for index, label in enumerate(("ant", "bee")):
            (tmp_path / split / label).mkdir(parents=True)
            for i in range(count):
                Image.new("L", (8, 8), 120 * index + i).save(tmp_path / split / label / f"{i}.png")
    walked, walk = [], model.data.image_files

    def recorded(folder, *rest):
        walked.append(str(folder.relative_to(tmp_path)))
        return walk(folder, *rest)

    monkeypatch.setattr("model.data.image_files", recorded)
    args = parse_args(["--dataset", "imagefolder", "--data-dir", str(tmp_path), "--image-size", "8", "--channels", "1"])
    train, test, preprocess = model.train.load_data(args)
    assert walked == ["train/ant", "train/bee", "val/ant", "val/bee"]  # the test split's classes: the training split's
    assert test.classes == train.classes == ["ant", "bee"] and test.labels.tolist() == [0, 1]
    walked.clear()
    load_dataset("imagefolder", "test", tmp_path, preprocess, classes=["ant", "bee"])  # as vit-evaluate loads it
    assert walked == ["val/ant", "val/bee"]


def test_init_from_starts_at_the_checkpoint_weights_and_records_where_they_came_from(tmp_path, capsys):
    parent_dir, child_dir = tmp_path / "parent", tmp_path / "child"
    main([*TINY_RUN, "--epochs", "1", "--out-dir", str(parent_dir)])
    parent_path = parent_dir / "model.safetensors"
    parent_weights = load_file(str(parent_path))

    child_run = [
        *TINY_RUN,
        "--epochs",
        "1",
        "--seed",
        "7",
        "--init-from",
        str(parent_path),
        "--out-dir",
        str(child_dir),
    ]
    child = Trainer(parse_args(child_run), child_run)
    for name, value in child.model.state_dict().items():
        assert torch.equal(value, parent_weights[name]), name

    main(child_run)
    lineage = load_checkpoint(child_dir / "model.safetensors").training["init_from"]
    assert lineage["sha256"] == file_sha256(parent_path) and lineage["training"]["epochs"] == 1
    assert lineage["head"] == "kept"  # the same classes, in the same order
    assert load_checkpoint(parent_path).training["init_from"] is None

    with pytest.raises(SystemExit):
        parse_args([*child_run[:-2], "--model", "tiny"])
    said = capsys.readouterr().err
    assert "--model tiny is not the architecture of --init-from" in said and "(dim 64, depth 4, num_heads 2" in said


@pytest.mark.parametrize("change", ["other order", "other names", "fewer"])
def test_init_from_puts_the_heads_rows_in_this_runs_order_or_starts_a_fresh_head_for_other_classes(
    small_checkpoint, change
):
    parent = load_checkpoint(small_checkpoint)
    classes = {
        "other order": sorted(
            parent.classes, key=str.lower
        ),  # a folder's names, sorted; the dataset's own order differs
        "other names": [f"class {index}" for index in range(len(parent.classes))],
        "fewer": ["ant", "bee", "cow"],
    }[change]
    torch.manual_seed(1)
    child = VisionTransformer(
        type(parent.model.config)(**{**parent.model.config.to_dict(), "num_classes": len(classes)})
    )
    fresh_head = child.head.weight.clone()
    lineage = initialise_from(child, small_checkpoint, classes)
    weights = load_file(str(small_checkpoint))
    assert torch.equal(child.pos_embed, weights["pos_embed"])
    assert torch.equal(child.blocks[1].mlp.fc2.weight, weights["blocks.1.mlp.fc2.weight"])
    if change == "other order":
        assert classes != parent.classes and lineage["head"] == "reordered"
        for row, name in enumerate(classes):
            assert torch.equal(child.head.weight[row], weights["head.weight"][parent.classes.index(name)]), name
            assert child.head.bias[row] == weights["head.bias"][parent.classes.index(name)], name
    else:
        assert torch.equal(child.head.weight, fresh_head) and lineage["head"] == "new"


def last_line_of_run(out_dir, use: str) -> str:
    """What a run that has trained into `out_dir` says last: where its checkpoint is, how good, and `use` it."""
    test_accuracy = json.loads((out_dir / "metrics.jsonl").read_text().splitlines()[-1])["test_accuracy"]
    return (
        f"{out_dir / 'model.safetensors'}: epoch 1 of 1, {100 * test_accuracy:.2f} % top-1 on the 32 test images; "
        f"curves in {out_dir / 'metrics.png'}; use it: {use}"
    )


def test_a_teacher_trained_by_vit_train_is_distilled_into_a_vit_that_names_it(tmp_path, capsys):
    teacher_run, student_run = tmp_path / "teacher", tmp_path / "student"
    small = ["--train-limit", "64", "--test-limit", "32", "--batch-size", "32", "--device", "cpu", "--epochs", "1"]
    main(["--model", "densenet-bc-100", *small, "--out-dir", str(teacher_run)])
    teacher_file = teacher_run / "model.safetensors"
    said = capsys.readouterr().err.splitlines()[-1]  # the run ends saying where its checkpoint is and what it is for
    assert said == last_line_of_run(teacher_run, f"--teacher {teacher_file}")
    teacher = load_teacher(teacher_file)
    assert teacher.architecture == "densenet-bc-100" and teacher.training["epochs"] == 1
    assert not any(parameter.requires_grad for parameter in teacher.model.parameters())
    with pytest.raises(CheckpointError, match="a densenet-bc-100 teacher for vit-train --teacher, not a ViT"):
        load_checkpoint(teacher_file)  # so vit-serve and vit-evaluate refuse it by name

    main(["--model", "nano", *small, "--teacher", str(teacher_file), "--out-dir", str(student_run)])
    said = capsys.readouterr().err.splitlines()[-1]
    assert said == last_line_of_run(student_run, f"VIT_CHECKPOINT={student_run / 'model.safetensors'} vit-serve")
    student = load_checkpoint(student_run / "model.safetensors")
    assert isinstance(student.model, VisionTransformer)
    assert student.training["teacher"]["sha256"] == file_sha256(teacher_file)
    assert student.training["teacher"]["training"]["recipe"]["model"] == "densenet-bc-100"
    assert student.training["recipe"]["distill_weight"] == 0.5


@pytest.mark.parametrize("save_teacher", [save_teacher_checkpoint, save_small_checkpoint], ids=["densenet", "vit"])
def test_a_student_distilled_with_full_weight_learns_the_teachers_answer_not_the_labels(save_teacher, tmp_path):
    """A convnet teaches, and so does a ViT checkpoint (a larger model distilled into a smaller one)."""
    teacher = save_teacher(tmp_path / "teacher.safetensors", favours=3)  # "Dress", whatever the image
    loaded = load_teacher(teacher)
    assert not loaded.model.training and not any(parameter.requires_grad for parameter in loaded.model.parameters())
    run = [*TINY_RUN, "--epochs", "3", "--warmup-epochs", "0", "--erasing", "0", "--out-dir", str(tmp_path / "run")]
    main([*run, "--teacher", str(teacher), "--distill-weight", "1"])
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trainer = Trainer(parse_args([*run, "--force"]), [])
    student = load_checkpoint(tmp_path / "run" / "model.safetensors").model
    with torch.no_grad():
        predictions = student(normalize(trainer.test_set.images, trainer.preprocess)).argmax(1)
    assert (predictions == 3).float().mean() > 0.95
    assert log[-1]["test_accuracy"] < 0.2  # a tenth of Fashion-MNIST's test images are dresses


def test_distillation_is_the_cross_entropy_on_the_teachers_class_or_the_scaled_divergence_of_soft_targets():
    torch.manual_seed(0)
    logits, teacher_logits = torch.randn(8, 10), torch.randn(8, 10)
    hard = distillation_loss(logits, teacher_logits, temperature=0)
    assert torch.allclose(hard, torch.nn.functional.cross_entropy(logits, teacher_logits.argmax(1)))
    assert distillation_loss(teacher_logits, teacher_logits, temperature=4).abs() < 1e-6  # agreeing: nothing to learn
    soft = [distillation_loss(logits, teacher_logits, temperature=t) for t in (1, 4)]
    assert soft[0] > 0 and soft[1] > 0
    divergence = torch.nn.functional.kl_div(
        logits.log_softmax(1), teacher_logits.log_softmax(1), reduction="sum", log_target=True
    )
    assert torch.allclose(soft[0], divergence / 8)  # per image, at temperature 1 unscaled


def test_vit_predict_classifies_files_a_chunk_at_a_time_and_answers_as_in_one(tmp_path, fashion_test, monkeypatch):
    paths = []
    for index in range(5):
        paths.append(tmp_path / f"{index}.png")
        paths[-1].write_bytes(image_bytes(fashion_test.images[index, 0].numpy()))
    (tmp_path / "notes.png").write_text("not an image")
    paths.insert(2, tmp_path / "notes.png")
    whole = classify(paths, DEFAULT_CHECKPOINT, 3, "cpu")
    batches = []
    counted = lambda pixels, config: batches.append(len(pixels)) or normalize(pixels, config)
    monkeypatch.setattr(model.predict, "CHUNK", 2)
    monkeypatch.setattr(model.predict, "normalize", counted)
    chunked = classify(paths, DEFAULT_CHECKPOINT, 3, "cpu")
    assert chunked[1] == whole[1] and len(whole[1]) == 1  # the unreadable file's line
    probabilities = lambda answer: [[p["probability"] for p in r["predictions"]] for r in answer[0]["results"]]
    labels = lambda answer: [(r["filename"], [p["label"] for p in r["predictions"]]) for r in answer[0]["results"]]
    assert labels(chunked) == labels(whole) and len(labels(whole)) == 5
    assert np.allclose(probabilities(chunked), probabilities(whole), atol=1e-6)  # another batch size, other sums
    assert batches == [2, 1, 2]  # the third chunk's first file is the unreadable one


@pytest.mark.parametrize("reader", ["gone", "on a full disk"])
@pytest.mark.parametrize("command", ["vit-predict", "vit-evaluate"])
def test_a_command_whose_output_cannot_be_written_exits_1_without_a_traceback(command, reader, small_checkpoint):
    """`vit-predict photos/ | head`: head's exit closes the pipe before the table is written, and the reader has
    what it wanted. `> answers.txt` on a full disk (/dev/full): the answers are lost, and the command says so."""
    figure = small_checkpoint.with_name("piped.png")
    arguments = {
        # the PNGs, not the folder: where pi-heif is not installed, a note says that its HEIC file is left out
        "vit-predict": ["model.predict", *sorted(map(str, (ROOT / "examples").glob("*.png")))],
        "vit-evaluate": ["model.evaluate", "--checkpoint", str(small_checkpoint), "--dataset", "fashion-mnist"]
        + ["--confusion-matrix", str(figure)],
    }[command]
    with open("/dev/full", "wb") as full:
        process = subprocess.Popen(
            [sys.executable, "-m", *arguments, "--device", "cpu"],
            stdout=subprocess.PIPE if reader == "gone" else full,
            stderr=subprocess.PIPE,
            cwd=ROOT,
        )
    if reader == "gone":
        process.stdout.close()
    stderr = process.communicate(timeout=120)[1].decode()
    said = "" if reader == "gone" else f"{command}: cannot write the standard output (No space left on device)\n"
    assert process.returncode == 1 and stderr == said, stderr
    assert command == "vit-predict" or figure.is_file()  # its work done all the same


def test_vit_predict_reads_an_image_from_the_standard_input_given_as_a_dash():
    command = [sys.executable, "-m", "model.predict", "--device", "cpu", "--format", "json"]
    vit_predict = lambda *args, stdin=b"": subprocess.run(
        [*command, *args], check=False, input=stdin, capture_output=True, cwd=ROOT, timeout=120
    )
    boot = (ROOT / "examples" / "ankle-boot.png").read_bytes()
    piped, named = vit_predict("-", stdin=boot), vit_predict("examples/ankle-boot.png")
    assert piped.returncode == 0, piped.stderr.decode()
    (result,) = json.loads(piped.stdout)["results"]
    assert result == json.loads(named.stdout)["results"][0] | {"filename": "-"}
    empty = vit_predict("-")
    assert empty.returncode == 1 and empty.stderr.decode() == "vit-predict: -: the file is empty\n"
    twice = vit_predict("-", "-", stdin=boot)
    assert twice.returncode == 1 and "given more than once" in twice.stderr.decode()


def test_vit_predict_prints_each_chunk_as_it_is_classified_and_ctrl_c_keeps_them(tmp_path, fashion_test):
    # The table was printed once every file was classified: `vit-predict photos/ | head` read them all first,
    # and Ctrl-C lost every answer in a traceback. The last file, the standard input, waits until it is closed.
    files = [tmp_path / f"{index:02d}.png" for index in range(model.predict.CHUNK)]
    for index, path in enumerate(files):
        path.write_bytes(image_bytes(fashion_test.images[index, 0].numpy()))
    command = [sys.executable, "-m", "model.predict", *map(str, files), "-", "--device", "cpu"]
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    with subprocess.Popen(command, cwd=ROOT, **pipes) as process:  # its exit closes the standard input, and waits
        printed, deadline = b"", time.monotonic() + 120
        while printed.count(b"\n") < len(files) and time.monotonic() < deadline:
            if select.select([process.stdout], [], [], 1.0)[0]:
                printed += os.read(process.stdout.fileno(), 65536)
        lines = printed.decode().splitlines()
        assert [line.split()[0] for line in lines] == list(map(str, files))  # before the standard input sent a byte
        assert lines[0].split()[1:3] == ["Ankle", "boot"]
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(b"", timeout=120)  # stdin closed: its reader ends, the interrupt is taken
    assert (process.returncode, stdout) == (130, b""), stderr.decode()[-3000:]
    assert stderr.decode() == f"vit-predict: interrupted, {len(files)} of {len(files) + 1} files done\n"


def interrupted(*args, **kwargs):
    raise KeyboardInterrupt  # Ctrl-C, where a command spends its time: it was a traceback from wherever it was


def test_vit_evaluate_and_vit_predict_interrupted_say_so_in_a_line_and_exit_130(
    small_checkpoint, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(model.evaluate, "load_dataset", interrupted)  # minutes into decoding a folder
    assert evaluate_main(["--checkpoint", str(small_checkpoint), "--device", "cpu"]) == 130
    assert capsys.readouterr().err == "vit-evaluate: interrupted; nothing scored\n"
    Image.new("L", (28, 28)).save(tmp_path / "a.png")
    monkeypatch.setattr(model.predict, "load_checkpoint", interrupted)  # before classifying: while torch loads it
    assert predict_main([str(tmp_path), "--device", "cpu"]) == 130
    assert capsys.readouterr().err == "vit-predict: interrupted; nothing classified\n"


@pytest.mark.parametrize(("command", "name"), [("vit-export", "m.onnx"), ("vit-import", "m.safetensors")])
def test_a_command_interrupted_as_it_writes_its_file_says_so_and_leaves_nothing(
    command, name, tmp_path, monkeypatch, capsys
):
    main_of, argv = output_command(command, DEFAULT_CHECKPOINT)
    monkeypatch.setattr(Path, "replace", interrupted)  # the last step of writing a file whole (model.files.written)
    assert main_of([*argv, str(tmp_path / name)]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == f"{command}: interrupted; nothing written"
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary


def output_command(command: str, checkpoint: Path) -> tuple[Callable[[list[str]], object], list[str]]:
    """The main of a command that writes a file, and its arguments up to the file's, `--out` or the like."""
    return {  # our checkpoints hold timm's weight names, so vit-import reads one as timm weights
        "vit-export": (export_main, ["--checkpoint", str(checkpoint), "--out"]),
        "vit-evaluate": (evaluate_main, ["--checkpoint", str(checkpoint), "--confusion-matrix"]),
        "vit-import": (
            import_main,
            [str(checkpoint), "--num-heads", "4", "--class-names", "a,b,c,d,e,f,g,h,i,j"]
            + ["--mean", "0.5", "--std", "0.5", "--out"],
        ),
    }[command]


@pytest.mark.parametrize("command", ["vit-export", "vit-evaluate", "vit-import"])
def test_an_output_that_is_the_file_the_command_reads_is_refused_and_that_file_kept(command, tmp_path):
    checkpoint = tmp_path / "model.safetensors"
    shutil.copy(DEFAULT_CHECKPOINT, checkpoint)
    (tmp_path / "link.safetensors").symlink_to(checkpoint)
    main_of, argv = output_command(command, checkpoint)
    for out in (checkpoint, tmp_path / "link.safetensors"):
        with pytest.raises(SystemExit, match=f"{out}: the same file as {checkpoint}, which this command reads"):
            main_of([*argv, str(out)])
    assert file_sha256(checkpoint) == file_sha256(DEFAULT_CHECKPOINT)


@pytest.mark.parametrize(("command", "name"), [("vit-export", "m.onnx"), ("vit-evaluate", "m.png")])
def test_an_output_on_a_full_disk_is_one_line_that_names_it_and_an_earlier_file_of_its_name_is_kept(
    command, name, tmp_path
):
    out, earlier = tmp_path / name, b"an earlier file"
    out.write_bytes(earlier)
    (tmp_path / f".{out.stem}.tmp{out.suffix}").symlink_to("/dev/full")  # where the file is written, then renamed
    main_of, argv = output_command(command, DEFAULT_CHECKPOINT)
    with pytest.raises(SystemExit) as stop:
        main_of([*argv, str(out)])
    assert str(stop.value) == f"{command}: cannot write {out} (No space left on device)"
    assert out.read_bytes() == earlier and sorted(path.name for path in tmp_path.iterdir()) == [name]


def test_vit_import_that_cannot_write_its_checkpoint_says_so_in_one_line_and_keeps_an_earlier_one(tmp_path):
    out, earlier = tmp_path / "m.safetensors", b"an earlier file"
    out.write_bytes(earlier)
    _, argv = output_command("vit-import", DEFAULT_CHECKPOINT)  # safetensors writes past a link: a size limit
    stopped = run_module("model.import_weights", *argv, out, max_file_bytes=100_000)
    assert stopped.returncode == 1 and stopped.stderr == f"vit-import: cannot write {out} (File too large)\n"
    assert out.read_bytes() == earlier and [path.name for path in tmp_path.iterdir()] == [out.name]


def test_pictures_in_a_format_not_read_or_in_no_class_folder_are_named_where_a_folder_leaves_them_out(tmp_path, capsys):
    for label in ("ant", "bee"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (8, 8), 100 * (label == "bee") + i).save(tmp_path / "images" / label / f"{i}.png")
    for name in ("IMG_0001.JXL", "IMG_0002.jxl"):  # photos in JPEG XL among the others
        (tmp_path / "images" / "ant" / name).write_bytes(b"\xff\x0a\xfa\x7f\x01\x90\x08")
    Image.new("L", (8, 8)).save(tmp_path / "images" / "cow.png")  # dropped beside the class folders
    note = (
        f"{tmp_path / 'images'}: left out 2 files in a format not read here (.jxl): ant/IMG_0001.JXL, "
        "ant/IMG_0002.jxl; convert to PNG or JPEG to include them"
    )
    loose = f"{tmp_path / 'images'}: left out 1 image file in no class folder: cow.png; move each into its class"
    run = ["--dataset", "imagefolder", "--data-dir", str(tmp_path / "images"), "--image-size", "8", "--channels", "1"]
    main([*run, "--model", "nano", "--device", "cpu", "--epochs", "1", "--out-dir", str(tmp_path / "run")])
    assert f"vit-train: note: {note}\nvit-train: note: {loose}\n" in capsys.readouterr().err
    assert predict_main([str(tmp_path / "images"), "--device", "cpu"]) == 0  # the readable ones are classified
    printed = capsys.readouterr()  # a folder given to vit-predict is its images, wherever they lie
    assert printed.err == f"vit-predict: note: {note}\n" and len(printed.out.splitlines()) == 7


def test_images_of_one_flat_colour_are_refused_and_a_channel_the_same_in_all_is_centred_unscaled(tmp_path):
    rng = np.random.default_rng(0)
    for tree, blank in (("flat", True), ("drawings", False)):
        for label in ("ant", "bee"):
            (tmp_path / tree / label).mkdir(parents=True)
            for i in range(3):  # red and green strokes, and no blue at all
                pixels = np.zeros((8, 8, 3), dtype=np.uint8)
                pixels[..., :2] = 0 if blank else rng.integers(0, 256, (8, 8, 2))
                Image.fromarray(pixels).save(tmp_path / tree / label / f"{i}.png")
    run = ["--dataset", "imagefolder", "--image-size", "8", "--model", "nano", "--device", "cpu", "--epochs", "1"]
    with pytest.raises(SystemExit, match="the 4 training images are one flat colour, the same in all of them"):
        main([*run, "--data-dir", str(tmp_path / "flat"), "--out-dir", str(tmp_path / "flat-run")])
    main([*run, "--data-dir", str(tmp_path / "drawings"), "--out-dir", str(tmp_path / "run")])  # a traceback: std 0
    preprocess = load_checkpoint(tmp_path / "run" / "model.safetensors").preprocess
    assert preprocess.mean[2] == 0 and preprocess.std[2] == 1 and 0.2 < preprocess.std[0] < 0.4


def test_vit_predict_reads_own_photos_that_pillow_alone_warns_of_or_refuses_and_puts_its_limit_back(
    tmp_path, capsys, recwarn
):
    photos = [tmp_path / "95-megapixels.png", tmp_path / "200-megapixels.png"]  # a 200 MP phone's photo
    for photo, size in zip(photos, [(10000, 9500), (16320, 12240)], strict=True):
        picture = Image.new("L", size, 90)
        picture.paste(200, (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
        picture.save(photo, compress_level=1)
    del picture
    limit = Image.MAX_IMAGE_PIXELS
    assert predict_main([*map(str, photos), "--device", "cpu"]) == 0  # the second was "exceeds limit ..."
    printed = capsys.readouterr()
    assert printed.err == "" and [line.split()[0] for line in printed.out.splitlines()] == list(map(str, photos))
    assert not [warning for warning in recwarn if warning.category is Image.DecompressionBombWarning]
    assert Image.MAX_IMAGE_PIXELS == limit  # uploads to a server in this process meet Pillow's own limit


def test_vit_predict_with_a_checkpoint_it_cannot_use_says_why_in_one_line(tmp_path):
    with pytest.raises(SystemExit, match=f"^vit-predict: {tmp_path}: a folder, not a checkpoint file"):
        predict_main(["examples/trouser.png", "--checkpoint", str(tmp_path), "--device", "cpu"])


@pytest.mark.parametrize(
    "command, flags, message",
    [
        (parse_args, ["--epochs", "0"], "argument --epochs: 0 is not a whole number of at least 1"),
        (parse_args, ["--batch-size", "-64"], "argument --batch-size: -64 is not a whole number of at least 1"),
        (parse_args, ["--train-limit", "-5"], "argument --train-limit: -5 is not a whole number of at least 1"),
        (parse_args, ["--lr", "0"], "argument --lr: 0 is not a number above 0"),
        (parse_args, ["--lr", "nan"], "argument --lr: nan is not a number above 0"),
        (parse_args, ["--erasing", "2"], "argument --erasing: 2 is not a number from 0 to 1"),
        (parse_args, ["--ema-decay", "1"], "argument --ema-decay: 1 is not a number from 0 up to but not including 1"),
        (parse_args, ["--mixup", "-1"], "argument --mixup: -1 is not a number from 0"),
        (parse_args, ["--distill-weight", "1.5"], "argument --distill-weight: 1.5 is not a number from 0 to 1"),
        (parse_args, ["--epochs", "ten"], "argument --epochs: invalid int value: 'ten'"),
        (
            parse_args,
            ["--patch-size", "5"],
            "--patch-size 5 does not divide the 28-pixel side of the fashion-mnist images",
        ),
        (parse_args, ["--min-lr", "0.1", "--lr", "0.01"], "--min-lr 0.1 is above --lr 0.01"),
        (
            parse_args,
            ["--repeated-aug", "64", "--batch-size", "64"],
            "--repeated-aug 64 fills a batch of --batch-size 64 with copies of one image; use fewer copies than a "
            + "batch holds images (DeiT uses 3)",
        ),
        (parse_args, ["--resume", "--force"], "argument --force: not allowed with argument --resume"),
        (  # ignored, it trained at 28 pixels under a command that said 56
            parse_args,
            ["--image-size", "56"],
            "--image-size is an option of --dataset imagefolder only; fashion-mnist images are 28 x 28 with 1 channel",
        ),
        (
            parse_args,
            ["--dataset", "cifar10", "--channels", "1"],
            "--channels is an option of --dataset imagefolder only; cifar10 images are 32 x 32 with 3 channels",
        ),
        (
            parse_args,
            ["--val-fraction", "0.1"],
            "--val-fraction is an option of --dataset imagefolder only; fashion-mnist comes with its own test split",
        ),
        (
            parse_args,
            ["--dataset", "imagefolder"],  # a traceback from the first look into the folder
            "--dataset imagefolder needs --data-dir: a folder of class folders, or of train/ and val/",
        ),
        (
            parse_args,
            ["--augment-workers", "100000"],  # a process each, importing torch: hundreds of GB
            f"--augment-workers 100000 is more than the {len(os.sched_getaffinity(0))} CPUs this process may run "
            + "on, which is as many as can run at once",
        ),
        (
            parse_args,
            ["--label-smoothing", "1"],
            "argument --label-smoothing: 1 is not a number from 0 up to but not including 1",
        ),
        (predict_main, ["--top-k", "0"], "argument --top-k: 0 is not a whole number of at least 1"),
        (predict_main, ["--device", "cpux"], "argument --device: 'cpux' is not a device: auto, cpu, cuda or cuda:N"),
        (evaluate_main, ["--device", "gpu"], "argument --device: 'gpu' is not a device: auto, cpu, cuda or cuda:N"),
        # names torch takes, where this code never ran: mps said the weights did not match; xpu, a traceback
        (predict_main, ["--device", "mps"], "argument --device: 'mps' is not a device: auto, cpu, cuda or cuda:N"),
        (parse_args, ["--device", "xpu"], "argument --device: 'xpu' is not a device: auto, cpu, cuda or cuda:N"),
        *(  # Path('') is the current folder: vit-predict "$IMAGE", IMAGE unset, classified every image under it
            (command, flags, f"argument {option}: '' is an empty path (an unset variable?): name a file or folder")
            for command, flags, option in (
                (predict_main, [""], "images"),
                (predict_main, ["--checkpoint", ""], "--checkpoint"),
                (parse_args, ["--out-dir", ""], "--out-dir"),
                (parse_args, ["--dataset", "imagefolder", "--data-dir", ""], "--data-dir"),
                (evaluate_main, ["--checkpoint", ""], "--checkpoint"),
                (export_main, ["--checkpoint", ""], "--checkpoint"),
                (import_main, ["--out", ""], "--out"),
            )
        ),
        (  # Path() made it https:/example.com/boot.png, of which vit-predict said that no such file exists
            predict_main,
            ["https://example.com/boot.png"],
            "argument images: https://example.com/boot.png is a URL, not a path: download it first "
            + "(curl -sLO https://example.com/boot.png)",
        ),
        (
            parse_args,
            ["--dataset", "imagefolder", "--data-dir", "s3://bucket/photos"],
            "argument --data-dir: s3://bucket/photos is a URL, not a path: download it first",
        ),
        *(  # /v2/models/fashion/v2 reaches no route, so no v2 client could address that model
            (
                parse_args,
                ["--name", name],
                f"argument --name: {name!r}: a model's name is one segment of /v2/models/NAME: not empty, without "
                + "'/', control characters or spaces around it",
            )
            for name in ("fashion/v2", "", " boots", "line\nbreak")
        ),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else "",
)
def test_an_option_out_of_its_range_stops_the_command_in_one_line_that_names_it(command, flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        command([*flags, *(["examples/trouser.png"] if command is predict_main else [])])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"error: {message}")


@pytest.mark.parametrize(
    ("flags", "needs"),
    [
        (["--augment", "trivialaugment"], "--augment trivialaugment"),
        (["--mixup", "0.2"], "--mixup or --cutmix"),
        (["--model", "densenet-bc-100"], "--model densenet-bc-100"),
        (["--data-dir", "EMPTY"], "FashionMNIST is not on disk, and downloading it"),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else "",
)
def test_an_option_that_needs_torchvision_where_it_is_not_installed_stops_the_command_in_one_line(
    flags, needs, monkeypatch, tmp_path
):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # `pip install .`, as `make serve` installs: no extras
    flags = [str(tmp_path / "empty") if flag == "EMPTY" else flag for flag in flags]
    run = ["--epochs", "1", "--warmup-epochs", "0", "--train-limit", "64", "--test-limit", "64"]
    with pytest.raises(SystemExit) as exit_info:  # it was a traceback
        main([*flags, *run, "--out-dir", str(tmp_path / "run")])
    assert exit_info.value.code == f"vit-train: {needs} needs torchvision: pip install 'vit-serving[datasets]'"
    if "--data-dir" in flags:
        with pytest.raises(SystemExit) as exit_info:
            evaluate_main(["--checkpoint", str(DEFAULT_CHECKPOINT), *flags])
        assert exit_info.value.code == f"vit-evaluate: {needs} needs torchvision: pip install 'vit-serving[datasets]'"


def test_compile_where_the_machine_has_no_compiler_stops_the_command_in_one_line(monkeypatch, capsys):
    monkeypatch.setenv("CXX", "no-such-c++")  # Inductor's traceback came at the first step, after the data had loaded
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--compile"])
    assert exit_info.value.code == 2
    said = capsys.readouterr().err.splitlines()[-1]
    assert said.endswith(
        "error: --compile needs a C++ compiler (no-such-c++; CXX names another), with which torch.compile "
        "builds its kernels (Debian: apt-get install g++ python3-dev)"
    )


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model", "densenet-bc-100", "--teacher", "teacher"], "--teacher trains a ViT; --model densenet-bc-100"),
        (["--teacher", "weights"], "neither a ViT checkpoint nor a teacher that vit-train --model densenet-bc-100"),
        (
            ["--teacher", "other-classes"],
            "was trained on other data: classes a, b, c, d, e, f, g, h, i, j, here T-shirt/",
        ),
        (
            ["--teacher", "other-mean"],
            "was trained on other data: mean (0.5,), here (0.286,); std (0.5,), here (0.353,)",
        ),
        (["--teacher", "missing"], "no such checkpoint file"),
    ],
    ids=["teacher-of-a-teacher", "weights-alone", "other-classes", "other-mean", "missing"],
)
def test_a_teacher_that_cannot_teach_this_run_is_refused_in_one_line(flags, message, tmp_path):
    files = {
        "teacher": save_teacher_checkpoint(tmp_path / "teacher.safetensors"),
        "weights": tmp_path / "weights.safetensors",  # written below: someone else's weights, no metadata of ours
        "other-classes": save_teacher_checkpoint(tmp_path / "other.safetensors", classes=list("abcdefghij")),
        "other-mean": save_teacher_checkpoint(
            tmp_path / "mean.safetensors", preprocess=replace(FASHION_PREPROCESS, mean=(0.5,), std=(0.5,))
        ),
        "missing": tmp_path / "missing.safetensors",
    }
    save_file({"weight": torch.zeros(2, 2)}, str(files["weights"]))
    flags = [str(files[flag]) if flag in files else flag for flag in flags]
    with pytest.raises(SystemExit, match="^vit-train: .*" + re.escape(message)):  # named as every vit-train error
        main([*TINY_RUN, "--epochs", "1", *flags, "--out-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_learning_rate_warms_up_then_follows_a_cosine():
    schedule = [learning_rate(step, 100, 10, 1e-3, 1e-5) for step in range(100)]
    assert schedule[0] == 1e-4 and schedule[9] == 1e-3
    assert all(later <= earlier for earlier, later in itertools.pairwise(schedule[9:]))
    assert abs(schedule[-1] - 1e-5) < 1e-6


def test_a_state_saved_with_other_optimizer_settings_resumes_with_this_runs_and_its_learning_rate():
    # A CPU run saves an unfused AdamW; the run that resumes it is fused, as on CUDA, and reads a tensor lr.
    layer = torch.nn.Linear(4, 2)
    saving = torch.optim.AdamW(layer.parameters(), lr=1e-3, fused=False)
    layer(torch.randn(3, 4)).sum().backward()
    saving.step()
    lr = torch.tensor(2e-3)
    resuming = torch.optim.AdamW(layer.parameters(), lr=lr, fused=True)
    load_optimizer_state(resuming, saving.state_dict(), lr)
    group = resuming.param_groups[0]
    assert group["fused"] and group["lr"] is lr  # this run's settings, and the very tensor it fills each step
    step = resuming.state[layer.weight]["step"]
    assert step.item() == 1 and step.dtype == torch.float32  # where and how a fused step keeps its count
    resuming.step()
    assert resuming.state[layer.weight]["step"].item() == 2


def test_vit_evaluate_exits_0_writes_its_confusion_matrix_beside_the_checkpoint_and_scores_timm_too(tmp_path):
    checkpoint = save_small_checkpoint(tmp_path / "small.safetensors", dataset="fashion-mnist")  # no --dataset
    # run from another folder than the checkpoint's: the figure must go beside the checkpoint anyway
    result = run_module("model.evaluate", "--checkpoint", checkpoint, "--device", "cpu", "--timm", cwd=tmp_path.parent)
    assert result.returncode == 0, result.stderr
    ours = re.search(r"(\d+\.\d\d) % top-1 on 10000 fashion-mnist test images", result.stdout)
    timm = re.search(r"timm's .* weights: (\d+\.\d\d) % top-1, the same class as ours on (\d+\.\d\d) %", result.stdout)
    assert ours and timm, result.stdout
    assert abs(float(timm[1]) - float(ours[1])) <= 0.05 and float(timm[2]) >= 99.9
    assert "Ankle boot" in result.stdout and result.stdout.count("(1000 images)") == 10
    with Image.open(tmp_path / "small-confusion.png") as picture:
        assert picture.format == "PNG"


def test_vit_evaluate_preprocesses_and_scores_a_chunk_at_a_time_so_its_memory_is_that_of_the_images(tmp_path):
    checkpoint = save_small_checkpoint(tmp_path / "small.safetensors", ["ant", "bee"], rgb_size=64)

    def peak_memory(count: int) -> int:
        """VmHWM growth of a vit-evaluate run on `count` images, in bytes."""
        for label in ("ant", "bee"):
            (tmp_path / f"{count}" / "val" / label).mkdir(parents=True)
            for i in range(count // 2):
                Image.new("L", (8, 8), i % 256).save(tmp_path / f"{count}" / "val" / label / f"{i}.png")
        script = f"""
import model.evaluate
model.evaluate.SCORED_AT_ONCE = 100
status = lambda field: int(open("/proc/self/status").read().split(field + ":")[1].split()[0]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from the present
before = status("VmHWM")
model.evaluate.main(["--checkpoint", {str(checkpoint)!r}, "--dataset", "imagefolder", "--data-dir",
                     {str(tmp_path / f"{count}")!r}, "--device", "cpu"])
print(status("VmHWM") - before)
"""
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT)
        assert f"top-1 on {count} imagefolder test images" in result.stdout
        return int(result.stdout.splitlines()[-1])

    # Plotting, decoding threads and torch take tens of MB whatever the count, more on some machines than
    # others, and most in the first run (matplotlib's font cache): the growth from 400 to 4,000 images, the
    # smaller first, is what the images cost.
    fewer = peak_memory(400)
    per_image = (peak_memory(4000) - fewer) / 3600
    image = 3 * 64 * 64  # bytes, as uint8; as float inputs four times as many, held twice at the peak
    assert per_image < 3 * image  # 1.3 times, 6.2 when all were preprocessed at once


def test_training_on_an_image_folder_holds_its_images_once_and_no_copy_of_them(tmp_path):
    for label, grey in (("ant", 60), ("bee", 190)):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(200):
            Image.new("L", (8, 8), grey + i % 50).save(tmp_path / "images" / label / f"{i}.png")
    script = f"""
import sys
from model.train import Trainer
from model.train_options import parse_args
status = lambda field: int(open("/proc/self/status").read().split(field + ":")[1].split()[0]) * 1024
args = parse_args(["--dataset", "imagefolder", "--data-dir", {str(tmp_path / "images")!r}, "--image-size", sys.argv[1],
                   "--patch-size", "32", "--model", "nano", "--batch-size", "8", "--epochs", "1",
                   "--warmup-epochs", "0", "--out-dir", sys.argv[2], "--device", "cpu"])
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from the present
before = status("VmHWM")
trainer = Trainer(args, [])
trainer.train_epoch(0)
print(status("VmHWM") - before, trainer.train_images.numel() + trainer.test_set.images.numel())
"""

    def grown(size: int) -> list[int]:
        command = [sys.executable, "-c", script, str(size), str(tmp_path / f"run-{size}")]
        return [
            int(number)
            for number in subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT).stdout.split()[
                -2:
            ]
        ]

    # The same 400 images at 224 and at 96 pixels: 57 and 11 MiB. What torch and the model take is the
    # same in both, so the difference in the peaks is what holding the images costs.
    (large, large_bytes), (small, small_bytes) = grown(224), grown(96)
    # 1.6 times the images: they themselves, and what decoding and batches of them take. Their statistics
    # as floats, and a second copy of the training images that each epoch gathered in its order: 4.6 times.
    assert (large - small) / (large_bytes - small_bytes) < 2.0


def test_the_test_set_of_large_images_is_evaluated_a_few_hundred_at_a_time_not_a_thousand():
    script = """
import torch
from model.data import ImageDataset
from model.evaluate import evaluate
from model.images import PreprocessConfig
from model.vit import VisionTransformer, ViTConfig
status = lambda field: int(open("/proc/self/status").read().split(field + ":")[1].split()[0]) * 1024
config = ViTConfig(image_size=224, patch_size=16, in_channels=3, num_classes=2, dim=192, depth=2, num_heads=3)
model, preprocess = VisionTransformer(config), PreprocessConfig(224, 3, (0.5,) * 3, (0.5,) * 3)
images = torch.randint(0, 256, (1000, 3, 224, 224), dtype=torch.uint8)  # 144 MiB, as a fine-tuning run holds them
test_set = ImageDataset(images, torch.zeros(1000, dtype=torch.int64), ["a", "b"])
evaluate(model, ImageDataset(images[:2], test_set.labels[:2], ["a", "b"]), preprocess, torch.device("cpu"))
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from the present
before = status("VmHWM")
evaluate(model, test_set, preprocess, torch.device("cpu"))
print((status("VmHWM") - before) / images.numel())
"""
    grown = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT)
    assert float(grown.stdout) < 8  # 3.6 times the images; all 1,000 at once, 16 times (2.3 GB)


def test_vit_evaluate_gives_a_cropping_model_each_picture_as_the_server_does_cropped_once(tmp_path):
    checkpoint = load_checkpoint(
        save_small_checkpoint(tmp_path / "crop.safetensors", ["a", "b"], rgb_size=32, crop_pct=0.8)
    )
    rng = np.random.default_rng(0)
    for index, label in enumerate(("a", "b", "a")):
        (tmp_path / "val" / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40 + 10 * index, 70, 3), dtype=np.uint8)).save(
            tmp_path / "val" / label / f"{index}.png"
        )
    dataset = load_dataset("imagefolder", "test", tmp_path, checkpoint.preprocess, classes=checkpoint.classes)
    files = sorted((tmp_path / "val").rglob("*.png"))  # the dataset's order: by class, then by name
    served = torch.stack([preprocess_image(Image.open(path), checkpoint.preprocess) for path in files])
    assert torch.equal(preprocess_dataset(dataset, checkpoint.preprocess), served)  # it cropped the crop again


def test_names_in_chinese_or_japanese_line_up_and_a_font_without_them_is_named_in_one_note(tmp_path, capsys):
    checkpoint = save_small_checkpoint(tmp_path / "cjk.safetensors", ["猫", "bird"])  # 猫 takes two columns
    for name in ("猫", "bird"):
        (tmp_path / "val" / name).mkdir(parents=True)
        shutil.copy(ROOT / "examples" / "ankle-boot.png", tmp_path / "val" / name / f"{name}.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        evaluate_main(
            [
                "--checkpoint",
                str(checkpoint),
                "--dataset",
                "imagefolder",
                "--data-dir",
                str(tmp_path),
                "--device",
                "cpu",
            ]
        )
    out, err = capsys.readouterr()
    cat, bird = out.splitlines()[1:3]
    assert cat[:7] == "  猫    " and bird[:8] == "  bird  " and len(cat[7:]) == len(bird[8:])  # was "  猫     "
    font = font_manager.get_font(font_manager.findfont(font_manager.FontProperties()))
    lacks = font.get_char_index(ord("猫")) == 0  # DejaVu Sans, Matplotlib's own, has no CJK
    assert not [w for w in caught if "missing from font" in str(w.message)]  # Matplotlib's, one per character
    assert ("font has no glyph for 猫 of the class names, drawn as boxes" in err) == lacks, err
    predict_main([str(tmp_path / "val"), "--checkpoint", str(checkpoint), "--device", "cpu", "--top-k", "1"])
    bird, cat = capsys.readouterr().out.splitlines()  # in name order
    cat, bird = cat[: cat.rindex("  ") + 2], bird[: bird.rindex("  ") + 2]  # the path column, to its answer
    assert len(cat) + cat.count("猫") == len(bird)  # as many columns: each 猫 takes two


def test_vit_evaluate_names_what_is_wrong_in_one_line(tmp_path):
    missing = tmp_path / "nothing.safetensors"
    result = run_module("model.evaluate", "--checkpoint", missing)
    assert result.returncode == 1
    assert result.stderr.strip() == f"vit-evaluate: {missing}: no such checkpoint file"


def test_vit_evaluate_finds_the_data_of_a_run_given_a_relative_folder_from_anywhere(tmp_path, monkeypatch, capsys):
    for index, label in enumerate(("ant", "bee")):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (8, 8), 100 * index + i).save(tmp_path / "images" / label / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    run = ["--dataset", "imagefolder", "--data-dir", "images", "--image-size", "8", "--channels", "1"]
    main([*run, "--model", "nano", "--device", "cpu", "--epochs", "1", "--out-dir", "run"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # where "images" names nothing
    evaluate_main(["--checkpoint", str(tmp_path / "run" / "model.safetensors"), "--device", "cpu"])
    assert "top-1 on 2 imagefolder test images" in capsys.readouterr().out
    (tmp_path / "ants" / "ant").mkdir(parents=True)  # a test set of one class of the two: bee's share is not 0 %
    shutil.copy(tmp_path / "images" / "ant" / "0.png", tmp_path / "ants" / "ant" / "0.png")
    shutil.copy(tmp_path / "images" / "ant" / "1.png", tmp_path / "ants" / "ant" / "1.png")
    ants = ["--data-dir", str(tmp_path / "ants"), "--device", "cpu"]
    evaluate_main(["--checkpoint", str(tmp_path / "run" / "model.safetensors"), *ants])
    lines = capsys.readouterr().out.splitlines()
    share = f"{tmp_path / 'ants'}'s held-out share (--val-fraction 0.2, --seed 0, as at training)"
    assert lines[0].endswith(f"top-1 on 1 imagefolder test image, {share}")  # the given folder, as a moved one
    assert re.fullmatch(r"  ant  +\d+\.\d\d %  \(1 image\)", lines[1])
    assert lines[2] == "  bee       -    (no test images)"
    (tmp_path / "images").rename(tmp_path / "moved")
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(["--checkpoint", str(tmp_path / "run" / "model.safetensors"), "--device", "cpu"])
    assert str(exit_info.value) == (
        f"vit-evaluate: {tmp_path / 'images'}, the data's folder at training, is not there; --data-dir names where "
        "it is now"
    )


def test_vit_evaluate_with_timm_where_timm_is_missing_says_so_before_scoring(tmp_path, monkeypatch):
    checkpoint = save_small_checkpoint(tmp_path / "small.safetensors", dataset="fashion-mnist")
    monkeypatch.setitem(sys.modules, "timm.models.vision_transformer", None)  # what an import finds without timm
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(["--checkpoint", str(checkpoint), "--device", "cpu", "--timm"])
    assert str(exit_info.value) == "vit-evaluate: --timm needs timm: pip install timm"
    assert not (tmp_path / "small-confusion.png").exists()  # nothing was scored


def test_vit_evaluate_makes_the_folder_of_its_confusion_matrix_or_says_before_scoring_why_it_cannot(
    tmp_path, fashion_test, monkeypatch
):
    checkpoint = save_small_checkpoint(tmp_path / "small.safetensors", dataset="fashion-mnist")
    loaded = []
    monkeypatch.setattr(
        model.evaluate, "load_dataset", lambda *args, **options: loaded.append(args) or fashion_test.subset(50)
    )
    figure = tmp_path / "figures" / "today" / "matrix"  # no suffix: still a PNG, under this very name
    evaluate_main(["--checkpoint", str(checkpoint), "--device", "cpu", "--confusion-matrix", str(figure)])
    with Image.open(figure) as picture:
        assert picture.format == "PNG"
    blocked = tmp_path / "notes.txt"
    blocked.write_text("a file where a folder would go")
    for target, problem in [
        (blocked / "matrix.png", f"{blocked} is a file, not a folder"),
        (figure.parent, f"{figure.parent} is a folder, not a file"),
    ]:
        loaded.clear()
        with pytest.raises(SystemExit) as exit_info:
            evaluate_main(["--checkpoint", str(checkpoint), "--device", "cpu", "--confusion-matrix", str(target)])
        assert str(exit_info.value) == f"vit-evaluate: --confusion-matrix {target}: {problem}"
        assert not loaded  # said before reading the test set, not after minutes of scoring


def test_confusion_matrix_counts_true_against_predicted():
    matrix = confusion_matrix(torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 0]), 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]


def test_vit_predict_classifies_files_and_reports_unreadable_ones(tmp_path, fashion_test, capsys):
    paths = []
    for index in range(3):
        path = tmp_path / f"{index}.png"
        path.write_bytes(image_bytes(fashion_test.images[index, 0].numpy()))
        paths.append(str(path))
    broken = tmp_path / "notes.png"
    broken.write_text("not an image")
    status = predict_main([*paths, str(broken), "--format", "json", "--top-k", "2", "--device", "cpu"])
    captured = capsys.readouterr()
    answer = json.loads(captured.out)
    assert status == 1 and f"{broken}: not an image" in captured.err
    assert [result["filename"] for result in answer["results"]] == paths
    assert [result["predictions"][0]["index"] for result in answer["results"]] == fashion_test.labels[:3].tolist()
    assert all(len(result["predictions"]) == 2 for result in answer["results"])
    assert predict_main([paths[0], "--device", "cpu"]) == 0
    assert "Ankle boot" in capsys.readouterr().out


def test_vit_predict_prints_a_name_in_bytes_that_are_not_utf8_as_those_bytes(tmp_path):
    photo = tmp_path / os.fsdecode(b"caf\xe9.png")  # a zip made on Windows names it in cp1252
    photo.write_bytes((ROOT / "examples" / "trouser.png").read_bytes())
    answer = subprocess.run(  # strict, as Python's standard output is in a UTF-8 locale other than C's
        [sys.executable, "-m", "model.predict", "--device", "cpu", "--top-k", "1", str(tmp_path)],
        check=False,
        capture_output=True,
        cwd=ROOT,
        timeout=120,
        env=os.environ | {"PYTHONIOENCODING": "utf-8:strict"},
    )
    assert answer.returncode == 0, answer.stderr.decode()  # it was a UnicodeEncodeError
    assert answer.stdout.startswith(os.fsencode(photo) + b"  Trouser ")


def test_vit_predict_classifies_the_images_in_a_folder_in_name_order(tmp_path, fashion_test, capsys):
    folder = tmp_path / "photos"
    for index, relative in enumerate(["b.png", "a/c.jpg", ".hidden/d.png", "a/.e.png"]):
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(image_bytes(fashion_test.images[index, 0].numpy(), "PNG"))
    (folder / "notes.txt").write_text("not an image, and not named like one")
    (folder / "album.png").mkdir()  # a folder named like an image is walked, not read as one
    (folder / "album.png" / "f.png").write_bytes(image_bytes(fashion_test.images[4, 0].numpy(), "PNG"))
    os.mkfifo(folder / "pipe.png")  # reading it waited for ever: nothing writes to it
    assert image_files(folder) == [folder / "a" / "c.jpg", folder / "album.png" / "f.png", folder / "b.png"]
    alone = tmp_path / "boot.png"
    alone.write_bytes(image_bytes(fashion_test.images[0, 0].numpy()))
    assert predict_main([str(folder), str(alone), "--format", "json", "--device", "cpu"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert [result["filename"] for result in answer["results"]] == [
        str(folder / "a" / "c.jpg"),
        str(folder / "album.png" / "f.png"),
        str(folder / "b.png"),
        str(alone),
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match=f"^vit-predict: no image files \\(.*\\.png.*\\) in {empty}$"):
        predict_main([str(empty)])


def test_vit_predict_names_a_folder_this_user_may_not_list_and_classifies_the_rest(
    shared_tmp_path, small_checkpoint, fashion_test
):
    # Its images were left out without a word, and a folder given by name was said to hold no image files.
    folder, checkpoint = shared_tmp_path / "photos", shared_tmp_path / "model.safetensors"
    shutil.copyfile(small_checkpoint, checkpoint)
    for index, relative in enumerate(["a/1.png", "b/2.png", "b/private/3.png"]):
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(image_bytes(fashion_test.images[index, 0].numpy()))
    closed = folder / "b" / "private"
    closed.chmod(0o000)

    def predicted() -> str:
        torch.set_num_threads(1)  # the parent's OpenMP threads are not in this forked child: a team of them waited
        said = []
        for given in (folder, closed):
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                status = predict_main(
                    [str(given), "--checkpoint", str(checkpoint), "--device", "cpu", "--format", "json"]
                )
            said.append(json.dumps([status, out.getvalue(), err.getvalue()]))
        return "\n".join(said)

    (status, out, err), (alone_status, alone_out, alone_err) = map(
        json.loads, as_unprivileged_user(predicted).splitlines()
    )
    assert [result["filename"] for result in json.loads(out)["results"]] == [
        str(folder / "a/1.png"),
        str(folder / "b/2.png"),
    ]
    assert err == alone_err == f"vit-predict: {closed}: cannot list this folder (Permission denied)\n"
    assert status == alone_status == 1 and alone_out == ""


@pytest.mark.parametrize(
    "command", ["model.train_options", "model.evaluate", "model.predict", "model.import_weights", "model.export"]
)
def test_every_option_of_every_command_says_what_it_does_and_its_default_once(command):
    parser = importlib.import_module(command).build_parser()
    silent = [action.dest for action in parser._actions if action.dest != "help" and not action.help]
    assert silent == []
    text = " ".join(parser.format_help().split())
    assert "--no-flip" not in text or "(--no-flip: none)" in text
    assert "(default: None)" not in text and not re.search(r"\(default[^)]*\) \(default", text)


@pytest.mark.parametrize(
    "sent, said, status",
    [(signal.SIGINT, "interrupted", 130), (signal.SIGTERM, "terminated", 143)],
    ids=["ctrl-c", "sigterm"],
)
def test_ctrl_c_or_sigterm_stops_vit_train_with_a_line_saying_where_the_run_stands(tmp_path, sent, said, status):
    # SIGINT as a terminal sends it, SIGTERM as docker stop or a scheduler does. SIGINT's handler is set again,
    # for a runner that started the tests ignoring it.
    script = "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); import model.train; "
    script += "sys.exit(model.train.main())"
    out = tmp_path / "run"
    command = [sys.executable, "-c", script, *TINY_RUN, "--epochs", "1000", "--warmup-epochs", "1", "--out-dir", out]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    logged = lambda: len((out / "metrics.jsonl").read_text().splitlines()) if (out / "metrics.jsonl").exists() else 0
    deadline = time.monotonic() + 120
    while logged() < 2 and process.poll() is None and time.monotonic() < deadline:  # epoch 1 saved, whole
        time.sleep(0.05)
    process.send_signal(sent)
    stderr = process.communicate(timeout=60)[1]
    assert process.returncode == status and "Traceback" not in stderr, stderr  # SIGTERM ended it without a word
    last = stderr.strip().splitlines()[-1]
    saved = load_state(out / "state.pt", torch.device("cpu"))["epoch"] + 1
    assert last == (
        f"vit-train: {said}; {out} holds the run up to epoch {saved} of 1000, its checkpoint included; "
        "--resume continues it"
    )


@pytest.mark.parametrize(
    "sent, said, status",
    [(signal.SIGINT, "interrupted", 130), (signal.SIGTERM, "terminated", 143)],
    ids=["ctrl-c", "sigterm"],
)
def test_a_stop_while_an_epoch_is_saved_waits_for_the_save_and_names_the_epoch_saved(
    tmp_path, monkeypatch, capsys, sent, said, status
):
    save = model.train.save_state

    def save_then_stop(*args, **kwargs):
        save(*args, **kwargs)
        os.kill(os.getpid(), sent)  # as the state file is written, before the run counts the epoch saved

    monkeypatch.setattr("model.train.save_state", save_then_stop)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        main([*TINY_RUN, "--epochs", "3", "--warmup-epochs", "1", "--out-dir", str(out)])
    assert stop.value.code == status
    assert load_state(out / "state.pt", torch.device("cpu"))["epoch"] + 1 == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        last
        == f"vit-train: {said}; {out} holds the run up to epoch 1 of 3, its checkpoint included; --resume continues it"
    )


def test_torchruns_processes_on_one_machine_split_its_cpus_between_their_decoders_and_policy_workers(
    tmp_path, monkeypatch
):
    for label in ("ant", "bee"):
        (tmp_path / label).mkdir()
        for i in range(3):
            Image.new("L", (8, 8), i).save(tmp_path / label / f"{i}.png")
    monkeypatch.setattr("model.cpu.cpu_quota", lambda: 16)
    threads, pool = [], model.data.ThreadPoolExecutor
    monkeypatch.setattr(
        "model.data.ThreadPoolExecutor",
        lambda max_workers, **kw: threads.append(max_workers) or pool(max_workers, **kw),
    )
    options = ["--dataset", "imagefolder", "--data-dir", str(tmp_path), "--augment", "trivialaugment"]
    assert parse_args(options).augment_workers == 8  # alone on the machine: one per CPU, at most 8
    load_dataset("imagefolder", "train", tmp_path)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun --nproc_per_node=4: each process a quarter
    assert parse_args(options).augment_workers == 4
    load_dataset("imagefolder", "train", tmp_path)
    assert threads == [16, 4]


def test_an_out_dir_inside_the_image_folder_is_refused_before_any_data_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr("model.train.load_data", lambda args: pytest.fail("the data was read"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "images").mkdir()
    for out in ("images/run", "images/../images/run", str(tmp_path / "images")):
        with pytest.raises(SystemExit, match=f"^vit-train: --out-dir {re.escape(out)} is inside --data-dir images: "):
            main(["--dataset", "imagefolder", "--data-dir", "images", "--epochs", "1", "--out-dir", out])


def test_an_out_dir_that_cannot_be_made_is_refused_before_any_data_is_read(tmp_path, monkeypatch):
    taken = tmp_path / "notes.txt"
    taken.write_text("a file where the run's folder would go")
    monkeypatch.setattr("model.train.load_data", lambda args: pytest.fail("the data was read"))
    for out in (taken, taken / "run"):
        with pytest.raises(SystemExit, match=f"^vit-train: --out-dir {out}: {taken} is a file, not a folder$"):
            main([*TINY_RUN, "--epochs", "1", "--out-dir", str(out)])


def test_an_out_dir_this_user_may_not_write_in_is_refused_naming_the_user_and_the_folders_owner(shared_tmp_path):
    # A container's user (vit, uid 10001) writing into a folder mounted from the host: "this user" said not whom.
    closed = shared_tmp_path / "runs"
    closed.mkdir()
    closed.chmod(0o555)
    user, problem = as_unprivileged_user(lambda: f"{this_user()}\n{folder_problem(closed / 'shapes')}").split("\n")
    assert problem == f"{user} may not write in {closed} (dr-xr-xr-x, owned by uid {os.getuid()})"


def test_a_run_reads_well_is_named_and_is_not_overwritten_by_mistake(tmp_path, capsys):
    out = tmp_path / "shoes"
    run = [*TINY_RUN, "--epochs", "1", "--name", "shoes", "--out-dir", str(out)]
    main(run)
    printed = capsys.readouterr().err
    assert "warning: --warmup-epochs 5 is as long as the run (--epochs 1)" in printed
    assert re.search(r"epoch 1/1  train loss \d\.\d{3} acc \d+\.\d\d %  test loss \d\.\d{3} acc \d+\.\d\d %", printed)
    assert '"train_loss"' in (out / "metrics.jsonl").read_text()  # the full record stays in the log
    assert load_checkpoint(out / "model.safetensors").name == "shoes"
    with pytest.raises(SystemExit, match=r"already holds a run \(model.safetensors, state.pt\); --resume continues"):
        main(run)
    main([*run, "--force", "--warmup-epochs", "0.5"])
    assert "warning" not in capsys.readouterr().err


def test_a_run_without_a_name_takes_its_folders_where_that_is_a_models_name(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert [run_name(Path(out)) for out in ("runs/shapes", "runs/shapes/", ".", "runs/x/..")] == [
        "shapes",
        "shapes",
        tmp_path.name,
        "runs",
    ]
    assert run_name(Path("/")) is None and run_name(Path("runs/ spaced ")) is None  # the checkpoint's file names it


@pytest.mark.parametrize(
    "warmup, effect",
    [
        ("4", "the learning rate peaks at 0.001 instead of --lr 0.002"),
        ("2", "the learning rate rises all run and reaches --lr 0.002 at its last step, with no decay after it"),
    ],
)
def test_a_warm_up_as_long_as_the_run_is_warned_of_with_the_learning_rate_it_gives(warmup, effect):
    args = parse_args(["--epochs", "2", "--warmup-epochs", warmup, "--lr", "0.002"])
    assert warmup_warning(args) == (
        f"warning: --warmup-epochs {warmup} is as long as the run (--epochs 2): {effect}; shorten the warm-up "
        "for a short run"
    )


def test_the_curves_of_a_one_epoch_run_show_its_points(tmp_path):
    record = {"epoch": 1, "train_loss": 1.2, "test_loss": 0.9, "train_accuracy": 0.6, "test_accuracy": 0.7}
    figure = training_curves([record])
    lines = [line for axes in figure.axes for line in axes.get_lines()]
    assert len(lines) == 4 and {line.get_marker() for line in lines} == {"o"}  # a line through one point draws nothing
    figure.canvas.draw()
    assert {tick.get_text() for axes in figure.axes for tick in axes.get_xticklabels()} == {"1"}
    long = training_curves([record | {"epoch": epoch} for epoch in range(1, 41)])
    assert {line.get_marker() for axes in long.axes for line in axes.get_lines()} == {""}


@pytest.mark.parametrize(
    "classes, counts, named", [(10, 100, 10), (30, 900, 30), (101, 0, 0), (1000, 0, 0)], ids=lambda n: str(n)
)
def test_a_confusion_matrix_of_any_number_of_classes_fits_a_picture_and_shows_what_it_has_room_for(
    classes, counts, named
):
    matrix = np.random.default_rng(0).integers(0, 50, (classes, classes))
    figure = confusion_figure(matrix, [f"class {index}" for index in range(classes)], "title")
    width, height = figure.get_size_inches() * 100  # pixels at the 100 dpi it is saved at
    assert width <= 1600 and height <= 1600  # 1,000 classes were 75,100 x 70,075
    axes = figure.axes[0]
    assert len(axes.texts) == counts  # each cell's count: 10,201 of them took 25 s to draw for 101 classes
    assert len(axes.get_xticklabels()) == len(axes.get_yticklabels()) == named


def test_cuda_graphs_on_a_cpu_are_refused_before_any_data_is_read(tmp_path, monkeypatch):
    def no_data(*args):
        raise AssertionError("the data was read before the device was checked")

    monkeypatch.setattr("model.train.load_data", no_data)
    with pytest.raises(SystemExit, match="--cuda-graphs runs on one CUDA device, without torchrun; not on cpu"):
        main([*TINY_RUN, "--epochs", "1", "--cuda-graphs", "--out-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()
