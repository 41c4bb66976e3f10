"""vit-export: the ONNX graph gives our logits in onnxruntime, at any batch size, and carries the preprocessing."""

import json

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from model.checkpoint import load_checkpoint
from model.export import OPSETS, main


def test_onnx_logits_equal_ours_and_the_file_carries_classes_and_preprocessing(tmp_path, shipped_checkpoint):
    checkpoint_path = tmp_path / "model.safetensors"
    checkpoint_path.write_bytes(shipped_checkpoint.read_bytes())
    main(["--checkpoint", str(checkpoint_path), "--format", "onnx"])
    exported = tmp_path / "model.onnx"  # beside the checkpoint, one file with the weights inside it
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.onnx", "model.safetensors"]

    session = onnxruntime.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    model = load_checkpoint(checkpoint_path).model
    for batch in (1, 7):
        pixels = torch.randn(batch, 1, 28, 28)
        [logits] = session.run(["logits"], {"pixels": pixels.numpy()})
        with torch.inference_mode():
            expected = model(pixels).numpy()
        assert logits.shape == (batch, 10)
        assert np.abs(logits - expected).max() <= 1e-4
    metadata = {entry.key: entry.value for entry in onnx.load(str(exported)).metadata_props}
    assert json.loads(metadata["classes"])[9] == "Ankle boot"
    assert json.loads(metadata["preprocess"])["image_size"] == 28 and metadata["name"] == "model"


@pytest.mark.parametrize("opset", ["16", "24", "99"])
def test_an_opset_the_exporter_cannot_write_stops_vit_export_in_one_line(tmp_path, small_checkpoint, opset, capsys):
    out = tmp_path / "model.onnx"
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(small_checkpoint), "--out", str(out), "--opset", opset])
    printed = capsys.readouterr()
    assert exit_info.value.code == 2 and printed.out == ""  # torch printed its whole graph, 175 lines, on stdout
    assert printed.err.splitlines()[-1].endswith(f"argument --opset: {opset} is not a whole number from 17 to 23")
    assert not out.exists()


def test_the_opsets_vit_export_offers_are_those_the_exporter_supports(tmp_path, small_checkpoint):
    assert OPSETS == (17, torch.onnx._constants.ONNX_MAX_OPSET)
    for opset in OPSETS:
        main(["--checkpoint", str(small_checkpoint), "--out", str(tmp_path / f"{opset}.onnx"), "--opset", str(opset)])
        assert onnx.load(str(tmp_path / f"{opset}.onnx")).opset_import[0].version == opset


def test_vit_export_makes_the_folder_of_its_output_or_says_why_it_cannot(tmp_path, small_checkpoint):
    out = tmp_path / "exports" / "today" / "model.onnx"
    main(["--checkpoint", str(small_checkpoint), "--out", str(out)])
    assert onnx.load(str(out)).graph.input[0].name == "pixels"
    blocked = tmp_path / "notes.txt"
    blocked.write_text("a file where a folder would go")
    with pytest.raises(
        SystemExit, match=f"^vit-export: --out {blocked / 'model.onnx'}: {blocked} is a file, not a folder$"
    ):
        main(["--checkpoint", str(small_checkpoint), "--out", str(blocked / "model.onnx")])
    with pytest.raises(SystemExit, match=f"^vit-export: --out {out.parent}: {out.parent} is a folder, not a file$"):
        main(["--checkpoint", str(small_checkpoint), "--out", str(out.parent)])
