import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model.checkpoint import load_checkpoint, save_checkpoint
from model.import_weights import WeightsImportError, read_state_dict
from model.metadata import CheckpointError, read_metadata
from model.vit import VisionTransformer
from tests.support.commands import as_unprivileged_user
from tests.support.models import FASHION_PREPROCESS, SMALL_CONFIG


def test_round_trip_gives_the_same_logits_and_metadata(tmp_path):
    torch.manual_seed(0)
    model = VisionTransformer(SMALL_CONFIG).eval()
    path = tmp_path / "model.safetensors"
    classes = [f"class {i}" for i in range(10)]
    save_checkpoint(path, model, classes, FASHION_PREPROCESS, {"dataset": "fashion-mnist", "epochs": 3})
    loaded = load_checkpoint(path)
    images = torch.randn(2, 1, 28, 28)
    assert torch.equal(loaded.model(images), model(images))
    assert loaded.model.config == SMALL_CONFIG
    assert loaded.classes == classes
    assert loaded.preprocess == FASHION_PREPROCESS
    assert loaded.training == {"dataset": "fashion-mnist", "epochs": 3}
    assert not loaded.model.training


def test_class_names_are_composed_as_a_keyboard_types_them_whenever_the_checkpoint_was_written(tmp_path):
    decomposed = ["Cafe\u0301", "Cre\u0300me", *"abcdefgh"]  # "Café", "Crème", as a Mac names folders
    model = VisionTransformer(SMALL_CONFIG).eval()
    path = tmp_path / "new.safetensors"
    save_checkpoint(path, model, decomposed, FASHION_PREPROCESS, {})
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert json.loads(metadata["classes"])[:2] == ["Caf\u00e9", "Cr\u00e8me"]
    older = tmp_path / "older.safetensors"  # as written before names were composed
    save_file(load_file(str(path)), str(older), metadata=metadata | {"classes": json.dumps(decomposed)})
    assert load_checkpoint(older).classes == read_metadata(older)["classes"] == ["Caf\u00e9", "Cr\u00e8me", *"abcdefgh"]


def test_a_saved_checkpoint_is_readable_by_other_users(small_checkpoint):
    # A container's non-root user must read a user's weights mounted read-only.
    assert stat.S_IMODE(small_checkpoint.stat().st_mode) == 0o644


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "absent.safetensors"
    with pytest.raises(CheckpointError, match=f"{path}: no such checkpoint file"):
        load_checkpoint(path)


def test_a_checkpoint_this_user_may_not_read_is_named_as_such_not_as_missing_or_corrupt(
    small_checkpoint, shared_tmp_path
):
    # A checkpoint mounted into the container, whose user is not its owner: safetensors said "No such file or
    # directory" of the file, and one in a folder the user may not enter stopped start-up with a traceback.
    shared = shared_tmp_path
    private, closed = shared / "model.safetensors", shared / "closed"
    shutil.copyfile(small_checkpoint, private)
    private.chmod(0o600)
    closed.mkdir(mode=0o700)
    shutil.copyfile(small_checkpoint, closed / "model.safetensors")
    shutil.copyfile(small_checkpoint, shared / "weights.pth")
    (shared / "weights.pth").chmod(0o600)

    def errors() -> str:
        reads = [
            (read_metadata, private),
            (read_metadata, closed / "model.safetensors"),
            (read_state_dict, private),
            (read_state_dict, shared / "weights.pth"),
        ]
        said = []
        for read, path in reads:
            try:
                read(path)
                said.append(f"{path}: read")
            except (CheckpointError, WeightsImportError) as error:
                said.append(str(error))
        return "\n".join(said)

    file, folder, weights, pth = as_unprivileged_user(errors).splitlines()
    assert file.startswith(f"{private}: permission denied: ")
    assert file.endswith(f" may not read it (-rw-------, owned by uid {os.getuid()})")
    assert folder.startswith(f"{closed / 'model.safetensors'}: permission denied: ")
    assert folder.endswith(f"may not enter {closed}")
    assert weights == file
    assert pth.startswith(f"{shared / 'weights.pth'}: permission denied: ") and "may not read it" in pth


def test_a_device_or_a_pipe_given_as_the_checkpoint_is_named_as_no_regular_file_not_as_missing(tmp_path):
    pipe = tmp_path / "model.safetensors"
    os.mkfifo(pipe)
    for path in (Path("/dev/null"), pipe):
        with pytest.raises(CheckpointError, match=f"^{path}: not a regular file, so not a checkpoint$"):
            load_checkpoint(path)


def test_a_folder_given_as_the_checkpoint_names_the_checkpoints_in_it(tmp_path, small_checkpoint):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(CheckpointError, match=f"^{run}: a folder, not a checkpoint file, and it holds no .safetensors"):
        load_checkpoint(run)
    (run / "model.safetensors").write_bytes(small_checkpoint.read_bytes())
    with pytest.raises(CheckpointError, match=f"^{run}: a folder, not a checkpoint file; the checkpoints in it: model"):
        load_checkpoint(run)


def test_a_checkpoint_named_in_bytes_that_are_not_utf8_is_refused_so_not_as_weights_that_do_not_match(
    tmp_path, small_checkpoint
):
    latin = tmp_path / os.fsdecode(b"caf\xe9")  # a folder or a file so named: safetensors loads neither
    latin.mkdir()
    for path in (latin / "model.safetensors", tmp_path / os.fsdecode(b"caf\xe9.safetensors")):
        path.write_bytes(small_checkpoint.read_bytes())
        shown = os.fsencode(path).decode(errors="backslashreplace")  # .../caf\xe9...: the lone surrogate, escaped
        with pytest.raises(CheckpointError) as refused:
            load_checkpoint(path)
        assert str(refused.value) == (
            f"{shown}: a path in bytes that are not UTF-8, which safetensors cannot load, and whose name no answer "
            "could carry; rename it"
        )


def test_truncated_file_names_the_path(tmp_path, small_checkpoint):
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(small_checkpoint.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=f"{path}: not a readable .safetensors file"):
        load_checkpoint(path)


def test_file_that_is_not_safetensors_at_all(tmp_path):
    path = tmp_path / "pickle.data"
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match=f"{path}: not a readable .safetensors file"):
        load_checkpoint(path)


def test_a_pytorch_file_an_onnx_graph_or_a_runs_state_given_as_the_checkpoint_is_named_as_what_it_is(tmp_path):
    # Each was "not a readable .safetensors file (truncated or corrupt?): ... header too large".
    for name in ("vit_small.pth", "model.onnx", "state.pt"):
        torch.save({"weights": torch.zeros(3)}, tmp_path / name)
    said = {}
    for name in ("vit_small.pth", "model.onnx", "state.pt"):
        with pytest.raises(CheckpointError) as refused:
            load_checkpoint(tmp_path / name)
        said[name] = str(refused.value).removeprefix(f"{tmp_path / name}: ")
    assert said == {
        "vit_small.pth": "a PyTorch file, not a .safetensors checkpoint; vit-import makes one of a timm or "
        "torchvision ViT's weights",
        "model.onnx": "an ONNX graph (vit-export writes them, for runtimes without PyTorch), not a .safetensors "
        "checkpoint",
        "state.pt": f"vit-train's resumable state, not a checkpoint; the run's checkpoint is "
        f"{tmp_path / 'model.safetensors'}",
    }


def test_foreign_safetensors_file_is_refused(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(path), metadata={"producer": "someone else"})
    with pytest.raises(CheckpointError, match=f"{path}: a .safetensors file, but not a ViT checkpoint") as refused:
        read_metadata(path)
    assert str(refused.value).endswith("(a timm or torchvision ViT's weights? vit-import makes a checkpoint of them)")


def test_weights_that_contradict_the_config_are_refused(tmp_path, small_checkpoint):
    with safe_open(str(small_checkpoint), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(small_checkpoint))
    del tensors["head.bias"]
    path = tmp_path / "mismatched.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match=f"{path}: weights do not match"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "key, value, reason",
    [
        ("classes", '"abcdefghij"', 'classes must be a list of names, not "abcdefghij"'),
        ("classes", '["a", "b"]', "2 class names for a head of 10 outputs"),
        ("classes", json.dumps([*"abcdefghi", "a"]), 'class names given to more than one output: "a"'),
        ("classes", json.dumps([*"abcdefghi", " "]), "class 9 has a blank name"),
        ("classes", json.dumps([*"abcdefgh", "\u00e9", "e\u0301"]), 'more than one output: "\\u00e9"'),
        ("preprocess", {"std": [0.0]}, "each std finite and above 0"),
        ("preprocess", {"crop_pct": 1.5}, "crop_pct must be above 0 and at most 1, not 1.5"),
        (
            "preprocess",
            {"channels": 3, "mean": [0.5] * 3, "std": [0.5] * 3},
            "preprocess gives 3 channels, the model takes 1",
        ),
        ("config", {"num_heads": 5}, "dim 32 is not divisible by num_heads 5"),
    ],
    ids=[
        "classes-not-a-list",
        "classes-too-few",
        "classes-twice",
        "class-blank",
        "class-twice-in-two-unicode-forms",  # the one name, as typed and as a Mac names files: which is which?
        "std-zero",
        "crop-above-1",
        "channels",
        "heads",
    ],
)
def test_metadata_that_would_serve_wrongly_is_refused_naming_the_file(tmp_path, small_checkpoint, key, value, reason):
    with safe_open(str(small_checkpoint), framework="pt") as handle:
        metadata = handle.metadata()
    metadata[key] = value if isinstance(value, str) else json.dumps(json.loads(metadata[key]) | value)
    path = tmp_path / "edited.safetensors"
    save_file(load_file(str(small_checkpoint)), str(path), metadata=metadata)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert str(error.value).startswith(f"{path}: ") and reason in str(error.value)
