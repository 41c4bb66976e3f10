"""vit-import: a timm or torchvision VisionTransformer made here (no download) becomes a checkpoint that serves its
logits."""

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
import transformers
from PIL import Image
from safetensors.torch import save_file
from timm.data.transforms_factory import transforms_imagenet_eval
from timm.layers import resample_abs_pos_embed
from timm.models import save_for_hf
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn
from timm.utils import CheckpointSaver
from torchvision.transforms import InterpolationMode

from model.checkpoint import load_checkpoint
from model.data import FASHION_MNIST_CLASSES
from model.evaluate import main as evaluate_main
from model.images import image_to_array, pixels_to_image
from model.import_weights import HubConfig, main
from model.metadata import read_metadata
from model.train import Trainer
from model.train import main as train_main
from model.train_options import parse_args
from tests.support.client import run
from tests.support.images import image_bytes

TIMM_KWARGS = {"img_size": 32, "patch_size": 8, "in_chans": 3, "num_classes": 3, "embed_dim": 48, "depth": 2}


def timm_model(**overrides) -> TimmVisionTransformer:
    torch.manual_seed(0)
    return TimmVisionTransformer(**(TIMM_KWARGS | {"num_heads": 3} | overrides)).eval()


def test_a_classes_file_saved_by_notepad_is_read_and_one_not_in_utf8_is_refused_by_name(tmp_path):
    weights, classes = tmp_path / "timm.safetensors", tmp_path / "classes.txt"
    save_file(timm_model().state_dict(), str(weights))
    classes.write_bytes("\ufeffcafé\r\nthé\r\n\r\nbière\r\n".encode())  # a byte-order mark first, CRLF lines
    main([str(weights), "--num-heads", "3", "--classes", str(classes), "--out", str(tmp_path / "a.safetensors")])
    assert load_checkpoint(tmp_path / "a.safetensors").classes == ["café", "thé", "bière"]  # not "\ufeffcafé"
    classes.write_bytes("café\nthé\nbière\n".encode("cp1252"))
    with pytest.raises(SystemExit, match=rf"^vit-import: --classes {classes}: not UTF-8 text \(byte 0xe9 at 3\); "):
        main([str(weights), "--num-heads", "3", "--classes", str(classes), "--out", str(tmp_path / "b.safetensors")])


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_imported_weights_give_timms_logits_in_the_model_and_through_the_server(tmp_path, suffix):
    theirs = timm_model()
    weights = tmp_path / f"timm{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": theirs.state_dict()}, weights)
    else:
        save_file(theirs.state_dict(), str(weights))
    out = tmp_path / "imported.safetensors"
    main([str(weights), "--num-heads", "3", "--class-names", "ant,bee,cow", "--name", "bugs", "--out", str(out)])

    checkpoint = load_checkpoint(out)
    inputs = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(checkpoint.model(inputs), theirs(inputs), atol=1e-5)
    assert checkpoint.name == "bugs" and checkpoint.classes == ["ant", "bee", "cow"]
    assert checkpoint.preprocess.resize == "bicubic" and checkpoint.preprocess.mean == (0.485, 0.456, 0.406)
    assert checkpoint.preprocess.crop_pct == 0.9

    # a picture taller than wide, classified by timm's own evaluation transform and model, from end to end
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 40, 3), dtype=np.uint8))
    upload = {"file": ("bug.png", image_bytes(picture), "image/png")}
    answer = run(lambda client: client.post("/predict", files=upload), checkpoint=out, device="cpu")
    assert answer.status_code == 200 and answer.json()["model"] == "bugs"
    served = {p["label"]: p["probability"] for p in answer.json()["results"][0]["predictions"]}
    timm_transform = transforms_imagenet_eval(32, crop_pct=0.9, interpolation="bicubic")
    with torch.inference_mode():
        expected = theirs(timm_transform(picture)[None]).softmax(-1)[0]
    assert [served[name] for name in ("ant", "bee", "cow")] == pytest.approx(expected.tolist(), abs=1e-5)


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with other weights, as a moving average of its training would have them."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


@pytest.mark.parametrize("script", ["timm", "torchvision"])
def test_a_training_scripts_checkpoint_gives_the_moving_averages_weights_as_timms_loader_takes_them(
    tmp_path, script, capsys
):
    # Both scripts keep their argparse options beside the weights, and the file was refused as "not a state dict
    # that torch.load reads without running code"; both keep a moving average's weights beside the model's.
    if script == "timm":  # train.py's own saver: state_dict, state_dict_ema, args, optimizer, ...
        model, average = timm_model(), timm.utils.ModelEmaV3(timm_model())
        perturbed(average.module)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        saver = CheckpointSaver(
            model, optimizer, argparse.Namespace(model="vit_tiny_patch16_224"), average, checkpoint_dir=str(tmp_path)
        )
        saver.save_checkpoint(epoch=0, metric=50.0)
        weights, averaged = tmp_path / "last.pth.tar", average.module
    else:  # references/classification/train.py: model, model_ema (torch's AveragedModel, module.* and n_averaged)
        model, averaged = torchvision_model(), perturbed(torchvision_model())
        ema = torch.optim.swa_utils.AveragedModel(averaged)
        weights = tmp_path / "checkpoint.pth"
        torch.save(
            {
                "model": model.state_dict(),
                "model_ema": ema.state_dict(),
                "epoch": 0,
                "args": argparse.Namespace(lr=0.5),
            },
            weights,
        )
    out = tmp_path / "imported.safetensors"
    main([str(weights), "--num-heads", "3", "--class-names", "ant,bee,cow", "--out", str(out)])
    entry = "state_dict_ema" if script == "timm" else "model_ema"
    assert f"the moving average's weights ({entry}), as timm's loader takes them" in capsys.readouterr().out

    checkpoint = load_checkpoint(out)
    assert checkpoint.training["imported_from"]["entry"] == entry
    inputs = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(checkpoint.model(inputs), averaged(inputs), atol=1e-5)
        assert not torch.allclose(checkpoint.model(inputs), model(inputs), atol=1e-3)
    if script == "timm":
        loaded = timm_model()
        timm.models.load_checkpoint(loaded, str(weights))
        with torch.inference_mode():
            assert torch.allclose(checkpoint.model(inputs), loaded(inputs), atol=1e-5)


@pytest.mark.parametrize("wrappers", ["DataParallel", "torch.compile", "both"])
def test_weights_saved_from_a_wrapped_model_are_read_by_the_models_own_names(tmp_path, wrappers):
    # DataParallel and DDP name every weight module.*, a compiled model _orig_mod.*: the weights were refused as
    # "timm options this model does not have".
    theirs = timm_model()
    wrapped = torch.nn.DataParallel(theirs) if wrappers != "torch.compile" else theirs
    wrapped = torch.compile(wrapped) if wrappers != "DataParallel" else wrapped
    weights = tmp_path / "wrapped.pth"
    torch.save(wrapped.state_dict(), weights)
    assert all(name.startswith(("module.", "_orig_mod.")) for name in torch.load(weights))
    out = tmp_path / "imported.safetensors"
    main([str(weights), "--num-heads", "3", "--class-names", "ant,bee,cow", "--out", str(out)])
    inputs = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(load_checkpoint(out).model(inputs), theirs(inputs), atol=1e-5)


def test_an_mlp_width_that_a_ratio_gives_only_rounded_up_is_imported_at_that_width(tmp_path):
    theirs = timm_model(embed_dim=56, num_heads=4, mlp_ratio=1.09)  # 61 hidden units, and 61 / 56 * 56 < 61
    weights = tmp_path / "timm.safetensors"
    save_file(theirs.state_dict(), str(weights))
    main([str(weights), "--num-heads", "4", "--class-names", "a,b,c", "--out", str(tmp_path / "x.safetensors")])
    ours = load_checkpoint(tmp_path / "x.safetensors").model  # it was load_state_dict's size mismatch, 60 against 61
    inputs = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(ours(inputs), theirs(inputs), atol=1e-5)


@pytest.mark.parametrize("options, crop_pct", [([], 0.9), (["--crop-pct", "0.875"], 0.875), (["--squash"], None)])
def test_the_evaluation_crop_is_timms_unless_told_and_the_checkpoint_keeps_it(tmp_path, options, crop_pct):
    weights = tmp_path / "timm.safetensors"
    save_file(timm_model().state_dict(), str(weights))
    out = tmp_path / "imported.safetensors"
    main([str(weights), "--num-heads", "3", "--class-names", "a,b,c", *options, "--out", str(out)])
    preprocess = load_checkpoint(out).preprocess
    assert preprocess.crop_pct == crop_pct
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 70, 3), dtype=np.uint8))
    if crop_pct is None:  # the whole picture, squashed
        expected = np.asarray(picture.resize((32, 32), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    else:
        expected = transforms_imagenet_eval(32, crop_pct=crop_pct, interpolation="bicubic", normalize=False)(picture)
    assert np.array_equal(image_to_array(picture, preprocess), np.asarray(expected))


@pytest.mark.parametrize(
    "overrides, named",
    [({"reg_tokens": 2}, "reg_token"), ({"qk_norm": True}, "attn.k_norm"), ({"pre_norm": True}, "norm_pre")],
)
def test_timm_options_this_model_lacks_are_refused_by_name(tmp_path, overrides, named, capsys):
    weights = tmp_path / "timm.safetensors"
    save_file(timm_model(**overrides).state_dict(), str(weights))
    with pytest.raises(SystemExit, match=rf"vit-import: timm options this model does not have.*{named}"):
        main([str(weights), "--num-heads", "3", "--class-names", "a,b,c", "--out", str(tmp_path / "x.safetensors")])
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize(
    "options, folded",
    [
        ({"no_embed_class": True}, ["no_embed_class"]),  # FlexiViT: it was "pos_embed ... not a square grid"
        ({"init_values": 1e-5}, ["layer_scale"]),  # it was refused by name, ls1.gamma
        ({"no_embed_class": True, "init_values": 1e-5}, ["no_embed_class", "layer_scale"]),  # DeiT III
        ({"qkv_bias": False}, ["qkv_bias"]),  # vit_base_patch16_224_miil: it was refused, "weights it lacks"
    ],
    ids=["no_embed_class", "layer_scale", "deit3", "qkv_bias"],
)
def test_timm_options_that_fold_into_this_model_give_timms_logits_at_its_size_and_another(
    tmp_path, capsys, options, folded
):
    theirs = timm_model(dynamic_img_size=True, **options)
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if name.endswith(".gamma"):  # learned ones, not init_values' constant
                parameter.copy_(torch.rand_like(parameter) * 2 - 0.5)
    weights = tmp_path / "timm.safetensors"
    save_file(theirs.state_dict(), str(weights))
    out = tmp_path / "imported.safetensors"
    main([str(weights), "--num-heads", "3", "--class-names", "a,b,c", "--out", str(out)])
    checkpoint = load_checkpoint(out)
    assert checkpoint.model.config.image_size == 32 and checkpoint.training["imported_from"]["folded"] == folded
    printed = capsys.readouterr().out
    notes = {"no_embed_class": "(timm's no_embed_class): it is zeros", "layer_scale": "layer scale is folded"}
    notes["qkv_bias"] = "attn.qkv had no bias (timm's qkv_bias=False): it is zeros"
    assert {name for name, note in notes.items() if note in printed} == set(folded)
    with torch.inference_mode():
        for size in [(32, 32), (48, 40)]:  # the trained grid, and one that both resample the patches' part to
            inputs = torch.randn(2, 3, *size)
            assert torch.allclose(checkpoint.model(inputs), theirs(inputs), atol=1e-5)


@pytest.mark.parametrize(
    "change, refusal",
    [
        ("swiglu", "blocks.0.mlp.fc1 gives 128 features and fc2 takes 64: a gated MLP"),
        ("pruned", r"MLPs are 192 wide, as blocks.0's: blocks.1.mlp.fc1.weight \[64, 48\], not \[192, 48\]"),
    ],
)
def test_weights_of_other_shapes_than_the_model_are_refused_in_a_line_that_names_them(tmp_path, change, refusal):
    if change == "swiglu":
        theirs = timm_model(mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU, mlp_ratio=8 / 3)
    else:  # a block's MLP narrower than the first's, as a pruned model's
        theirs = timm_model()
        theirs.blocks[1].mlp = timm.layers.Mlp(48, 64)
    weights = tmp_path / "timm.safetensors"
    save_file(theirs.state_dict(), str(weights))
    with pytest.raises(SystemExit, match=refusal):
        main([str(weights), "--num-heads", "3", "--class-names", "a,b,c", "--out", str(tmp_path / "x.safetensors")])
    assert not (tmp_path / "x.safetensors").exists()


def test_class_names_must_match_the_head_each_named_and_distinct(tmp_path):
    weights = tmp_path / "timm.safetensors"
    save_file(timm_model().state_dict(), str(weights))
    for names, problem in [
        ("a,b", "2 class names for a head of 3 classes"),
        ("a,b,a", 'class names given to more than one output: "a"'),  # which of the two would an answer name?
        ("a,,b", "class 1 has a blank name"),
    ]:
        with pytest.raises(SystemExit, match=problem):
            main([str(weights), "--num-heads", "3", "--class-names", names, "--out", str(tmp_path / "x.safetensors")])
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("std", [["0", "0.2", "0.2"], ["nan", "0.2", "0.2"], ["-0.2", "0.2", "0.2"]])
def test_a_std_that_would_make_inputs_infinite_is_refused_before_anything_is_written(tmp_path, std):
    weights = tmp_path / "timm.safetensors"
    save_file(timm_model().state_dict(), str(weights))
    flags = ["--num-heads", "3", "--class-names", "a,b,c", "--std", *std, "--out", str(tmp_path / "x.safetensors")]
    with pytest.raises(
        SystemExit, match=r"vit-import: mean .* and std .*: each mean finite, each std finite and above 0"
    ):
        main([str(weights), *flags])
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("saved", ["whole model", "random bytes"])
def test_a_pth_that_is_not_a_plain_state_dict_is_refused_in_one_line_without_running_it(tmp_path, saved):
    weights = tmp_path / "timm.pth"
    if saved == "whole model":
        torch.save(timm_model(), weights)  # a pickled object: loading it would run code from the file
    else:
        weights.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(
        SystemExit, match=r"not a state dict that torch.load reads without running code .*state_dict\(\)"
    ):
        main([str(weights), "--num-heads", "3", "--class-names", "a,b,c", "--out", str(tmp_path / "x.safetensors")])
    assert not (tmp_path / "x.safetensors").exists()


def test_weights_that_are_missing_damaged_or_without_blocks_and_an_unusable_out_are_one_line_each(tmp_path):
    weights = tmp_path / "timm.safetensors"
    save_file(timm_model().state_dict(), str(weights))
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(weights.read_bytes()[:100])  # a download cut short
    headless = tmp_path / "blockless.safetensors"
    save_file({k: v for k, v in timm_model().state_dict().items() if not k.startswith("blocks.")}, str(headless))
    blocked = tmp_path / "notes.txt"
    blocked.write_text("a file where a folder would go")
    out = tmp_path / "x.safetensors"
    cases = [
        (tmp_path / "missing.pth", out, "missing.pth: no such file"),
        (
            tmp_path,
            out,
            f"{tmp_path}: a folder without model.safetensors, pytorch_model.bin or their shards' index; name the file",
        ),
        (damaged, out, "damaged.safetensors: not a readable .safetensors file (truncated or corrupt?)"),
        (headless, out, "not a timm VisionTransformer with transformer blocks: no blocks.0.mlp.fc1.weight"),
        (weights, blocked / "x.safetensors", f"--out {blocked / 'x.safetensors'}: {blocked} is a file, not a folder"),
    ]
    for source, target, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main([str(source), "--num-heads", "3", "--class-names", "a,b,c", "--out", str(target)])
        assert str(exit_info.value).startswith("vit-import: ") and message in str(exit_info.value)
        assert "\n" not in str(exit_info.value)
    assert not out.exists()


def test_a_backbone_without_a_head_is_imported_with_a_new_one_to_fine_tune_and_served_with_a_warning(
    tmp_path, capsys, caplog
):
    # timm's num_classes=0, as DINO's ViTs are published: refused as "no head.weight", so no fine-tuning from them
    theirs = timm_model(num_classes=0)
    weights, backbone = tmp_path / "dino.safetensors", tmp_path / "backbone.safetensors"
    save_file(theirs.state_dict(), str(weights))
    with pytest.raises(SystemExit, match=r"these weights have no head \(a backbone: timm's num_classes=0\); name the"):
        main([str(weights), "--num-heads", "3", "--out", str(backbone)])
    main([str(weights), "--num-heads", "3", "--class-names", "red,green", "--out", str(backbone)])
    assert "no head in the weights: a new, untrained one for these classes" in capsys.readouterr().out
    checkpoint = load_checkpoint(backbone)
    assert checkpoint.classes == ["red", "green"] and checkpoint.training["imported_from"]["head"] == "new"
    inputs = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():  # timm's features, to the last norm, on the class token
        assert torch.allclose(checkpoint.model.forward_features(inputs)[:, 0], theirs(inputs), atol=1e-5)

    with caplog.at_level("WARNING", logger="app"):
        answer = run(lambda client: client.get("/model"), checkpoint=backbone, device="cpu")
    assert answer.status_code == 200
    assert any("has a head that no one trained" in record.getMessage() for record in caplog.records)

    for channel, label in enumerate(("red", "green")):
        (tmp_path / "images" / label).mkdir(parents=True)
        for index in range(4):
            pixels = np.full((32, 32, 3), 30, dtype=np.uint8)
            pixels[:, :, channel] = 200 + index
            Image.fromarray(pixels).save(tmp_path / "images" / label / f"{index}.png")
    train_main(
        ["--dataset", "imagefolder", "--data-dir", str(tmp_path / "images"), "--init-from", str(backbone)]
        + ["--epochs", "1", "--batch-size", "4", "--device", "cpu", "--out-dir", str(tmp_path / "run")]
    )
    tuned = load_checkpoint(tmp_path / "run" / "model.safetensors")
    assert "imported_from" not in tuned.training and tuned.training["init_from"]["path"] == str(backbone)
    assert tuned.model.config.dim == 48 and tuned.training["init_from"]["head"] == "reordered"  # green, red sorted


def test_an_imported_model_is_fine_tuned_on_a_folder_in_its_own_architecture_and_preprocessing(tmp_path, capsys):
    weights, parent = tmp_path / "timm.safetensors", tmp_path / "imported.safetensors"
    save_file(timm_model().state_dict(), str(weights))
    main([str(weights), "--num-heads", "3", "--class-names", "ant,bee,cow", "--out", str(parent)])
    rng = np.random.default_rng(0)
    for channel, label in enumerate(("red", "green")):
        (tmp_path / "images" / label).mkdir(parents=True)
        for index in range(6):
            pixels = rng.integers(0, 80, (40, 50, 3), dtype=np.uint8)
            pixels[:, :, channel] = 220
            Image.fromarray(pixels).save(tmp_path / "images" / label / f"{index}.png")
    run_args = ["--dataset", "imagefolder", "--data-dir", str(tmp_path / "images"), "--init-from", str(parent)]
    run_args += ["--epochs", "1", "--batch-size", "4", "--device", "cpu", "--out-dir", str(tmp_path / "run")]

    start = Trainer(parse_args(run_args), run_args).model.state_dict()
    imported = load_checkpoint(parent)
    for name, value in imported.model.state_dict().items():
        assert name.startswith("head.") or torch.equal(start[name], value), name
    train_main(run_args)
    tuned = load_checkpoint(tmp_path / "run" / "model.safetensors")
    assert tuned.classes == ["green", "red"]
    assert tuned.model.config.to_dict() == imported.model.config.to_dict() | {"num_classes": 2, "drop_path": 0.1}
    assert tuned.preprocess == imported.preprocess  # ImageNet's mean and std, bicubic, timm's centre crop
    without = [option for option in run_args if option not in ("--init-from", str(parent))]
    train_main([*without, "--resume", "--epochs", "2"])  # where the model came from is the run's own
    resumed = read_metadata(tmp_path / "run" / "model.safetensors")["training"]
    assert resumed["epochs"] == 2 and resumed["recipe"]["init_from"] == str(parent)

    # Options that would need another architecture are refused, before any data is read
    for option, said in [
        (["--model", "tiny"], "--model tiny is not the architecture of --init-from"),
        (["--patch-size", "4"], f"--patch-size 4: --init-from {parent} has 8; leave --patch-size out"),
        (["--image-size", "36"], f"--image-size 36 is not a whole number of --init-from {parent}'s 8-pixel patches"),
        (["--channels", "1"], f"--channels 1: --init-from {parent} has 3; leave --channels out"),
    ]:
        with pytest.raises(SystemExit):
            parse_args([*run_args, *option])
        assert said in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--init-from", str(parent), "--out-dir", str(tmp_path / "other")])
    assert "takes images with 3 channels; fashion-mnist images have 1" in capsys.readouterr().err


def test_an_imported_model_is_fine_tuned_at_another_resolution_from_timms_resampled_position_embedding(tmp_path):
    weights, parent = tmp_path / "timm.safetensors", tmp_path / "imported.safetensors"
    save_file(timm_model().state_dict(), str(weights))  # 32 pixels, 8-pixel patches: a 4 x 4 grid
    main([str(weights), "--num-heads", "3", "--class-names", "ant,bee,cow", "--out", str(parent)])
    for shade, label in ((40, "ant"), (120, "bee"), (200, "cow")):
        (tmp_path / "images" / label).mkdir(parents=True)
        for index in range(3):
            Image.new("RGB", (60, 50), (shade + index, 90, 90)).save(tmp_path / "images" / label / f"{index}.png")
    run_args = ["--dataset", "imagefolder", "--data-dir", str(tmp_path / "images"), "--init-from", str(parent)]
    run_args += ["--image-size", "64", "--epochs", "1", "--batch-size", "3", "--device", "cpu"]
    run_args += ["--out-dir", str(tmp_path / "run")]

    start = Trainer(parse_args(run_args), run_args).model.eval()  # the same classes: the head is kept too
    theirs = timm_model(img_size=64)  # timm loads the 32-pixel weights for its 8 x 8 grid so
    theirs.load_state_dict(checkpoint_filter_fn(load_checkpoint(parent).model.state_dict(), theirs))
    images = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(start(images), theirs(images), atol=1e-5)
    train_main(run_args)
    tuned = load_checkpoint(tmp_path / "run" / "model.safetensors")
    assert tuned.model.config.image_size == 64 and tuned.model.pos_embed.shape == (1, 1 + 64, 48)
    assert tuned.preprocess == replace(load_checkpoint(parent).preprocess, image_size=64)  # ImageNet's, at 64
    other = run_args[: run_args.index("--image-size")] + ["--image-size", "32"] + run_args[run_args.index("--epochs") :]
    with pytest.raises(SystemExit, match="was trained with --image-size 64; this command gives --image-size 32. Leave"):
        train_main([*other, "--resume", "--epochs", "2"])
    train_main(["--out-dir", str(tmp_path / "run"), "--resume", "--epochs", "2", "--device", "cpu"])  # the run's size
    assert read_metadata(tmp_path / "run" / "model.safetensors")["config"]["image_size"] == 64


def imported_grey_model(tmp_path, **timm_options) -> Path:
    """vit-import's checkpoint of a timm model of one channel and ten classes, with its own mean and std."""
    weights, parent = tmp_path / "timm.safetensors", tmp_path / "imported.safetensors"
    save_file(timm_model(in_chans=1, num_classes=10, **timm_options).state_dict(), str(weights))
    names = ",".join(f"kind {index}" for index in range(10))
    main(
        [
            str(weights),
            "--num-heads",
            "3",
            "--class-names",
            names,
            "--mean",
            "0.3",
            "--std",
            "0.35",
            "--out",
            str(parent),
        ]
    )
    return parent


def test_a_model_of_32_pixels_is_fine_tuned_on_fashion_mnists_28_in_its_patches(tmp_path):
    parent = imported_grey_model(tmp_path, patch_size=4)
    run_args = ["--init-from", str(parent), "--train-limit", "8", "--test-limit", "8", "--device", "cpu"]
    run_args += ["--out-dir", str(tmp_path / "run")]
    start = Trainer(parse_args(run_args), run_args)
    assert start.model.config.image_size == start.preprocess.image_size == 28  # a 7 x 7 grid of the 8 x 8
    expected = resample_abs_pos_embed(load_checkpoint(parent).model.pos_embed, [7, 7])
    assert torch.allclose(start.model.pos_embed, expected, atol=1e-6)


def test_a_checkpoint_fine_tunes_at_an_image_size_that_a_built_in_datasets_images_are_resized_to(
    tmp_path, fashion_test, capsys
):
    parent = imported_grey_model(tmp_path, patch_size=4)  # 32 pixels
    run_args = ["--init-from", str(parent), "--image-size", "56", "--train-limit", "8", "--test-limit", "4"]
    run_args += ["--epochs", "1", "--batch-size", "4", "--device", "cpu", "--out-dir", str(tmp_path / "run")]
    start = Trainer(parse_args(run_args), run_args)
    assert start.model.config.image_size == 56 and start.test_set.images.shape == (4, 1, 56, 56)
    for index in range(4):  # each resized whole by Pillow with the checkpoint's filter, as an upload to the server is
        picture = pixels_to_image(fashion_test.images[index].numpy())
        expected = image_to_array(picture, replace(load_checkpoint(parent).preprocess, image_size=56, crop_pct=None))
        assert np.array_equal(start.test_set.images[index].numpy(), expected)
    train_main(run_args)
    with pytest.raises(SystemExit, match="was trained with --image-size 56; this command gives --image-size 28. Leave"):
        train_main([*run_args, "--image-size", "28", "--resume", "--epochs", "2"])
    without = [option for option in run_args if option not in ("--image-size", "56")]
    train_main([*without, "--resume", "--epochs", "2"])  # resized to the run's size, as it was
    assert read_metadata(tmp_path / "run" / "model.safetensors")["training"]["epochs"] == 2
    capsys.readouterr()
    evaluate_main(["--checkpoint", str(tmp_path / "run" / "model.safetensors"), "--device", "cpu"])
    assert "top-1 on 10000 fashion-mnist test images" in capsys.readouterr().out  # resized as uploads are
    with pytest.raises(SystemExit):  # a model trained from scratch at 56 would pass for one trained at 28
        parse_args(["--image-size", "56"])
    assert "--image-size is an option of --dataset imagefolder only" in capsys.readouterr().err


def torchvision_model(**overrides) -> torchvision.models.VisionTransformer:
    torch.manual_seed(0)
    kwargs = {"image_size": 32, "patch_size": 8, "num_layers": 2, "num_heads": 3, "hidden_dim": 48, "mlp_dim": 192}
    return torchvision.models.VisionTransformer(**(kwargs | {"num_classes": 3} | overrides)).eval()


def test_torchvisions_vit_weights_give_its_logits_and_its_transform_through_the_server(tmp_path, capsys):
    theirs = torchvision_model()
    weights = tmp_path / "vit_b_16.pth"
    torch.save(theirs.state_dict(), weights)  # as torchvision's hub files hold them
    out = tmp_path / "imported.safetensors"
    main([str(weights), "--num-heads", "3", "--class-names", "ant,bee,cow", "--out", str(out)])
    assert "torchvision's 2 blocks of dim 48, 3 heads" in capsys.readouterr().out

    checkpoint = load_checkpoint(out)
    inputs = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(checkpoint.model(inputs), theirs(inputs), atol=1e-5)
    assert checkpoint.preprocess.resize == "bilinear" and checkpoint.preprocess.crop_pct == 0.875
    assert checkpoint.training["imported_from"]["format"] == "torchvision"

    # a picture wider than tall, through torchvision's own evaluation transform (resize 256, crop 224, scaled)
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    upload = {"file": ("bug.png", image_bytes(picture), "image/png")}
    answer = run(lambda client: client.post("/predict", files=upload), checkpoint=out, device="cpu")
    served = {p["label"]: p["probability"] for p in answer.json()["results"][0]["predictions"]}
    preset = torchvision.models.ViT_B_16_Weights.IMAGENET1K_V1.transforms.func  # its class, at our model's size
    transform = preset(crop_size=32, resize_size=36, interpolation=InterpolationMode.BILINEAR)
    with torch.inference_mode():
        expected = theirs(transform(picture)[None]).softmax(-1)[0]
    assert [served[name] for name in ("ant", "bee", "cow")] == pytest.approx(expected.tolist(), abs=1e-5)


def at_our_eps(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with its LayerNorms' eps at this model's 1e-6, where transformers' is 1e-12 (the import keeps ours,
    and says so): compared at its own, the logits parted by up to 2e-5 under torch 2.11, from a class token whose
    variance before the first block was 0.07, so that the weights' mapping, held to 1e-5, passed by the draw."""
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = 1e-6
    return model


def transformers_config() -> transformers.ViTConfig:
    """A small ViT's, whose weights start at a trained model's scale: at transformers' initial 0.02, the hidden
    states' variance comes near the LayerNorms' eps, where its 1e-12 and this model's 1e-6 part ways."""
    return transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=192,
        initializer_range=0.2,
    )


def test_a_transformers_vit_from_the_hub_gives_its_logits_and_its_processors_transform_through_the_server(
    tmp_path, capsys
):
    # google/vit-base-patch16-224, the most downloaded ViT on the Hub, is a transformers ViTForImageClassification:
    # its weights were refused as "timm options this model does not have".
    config = transformers_config()
    config.id2label = {0: "crane", 1: "bee", 2: "crane"}  # ImageNet's labels name two classes "crane"
    torch.manual_seed(0)
    theirs = transformers.ViTForImageClassification(config).eval()
    with torch.no_grad():  # a trained model's LayerNorms are not the identity
        for name, parameter in theirs.named_parameters():
            if "layernorm" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    hub = tmp_path / "hub"
    theirs.save_pretrained(hub)
    # transformers 5's ViTImageProcessor resizes with torchvision; its PIL one (4's ViTImageProcessor) as we do
    pil_processor = getattr(transformers, "ViTImageProcessorPil", transformers.ViTImageProcessor)
    processor = pil_processor(size={"height": 32, "width": 32}, resample=3, image_mean=[0.4] * 3)
    processor.save_pretrained(hub)
    at_our_eps(theirs)  # saved at its own
    out = tmp_path / "imported.safetensors"
    main([str(hub), "--out", str(out)])  # the heads, the classes and the transform from its two JSON files
    said = capsys.readouterr().out
    assert "transformers' 2 blocks of dim 48, 3 heads" in said and "its LayerNorms' eps 1e-12 is 1e-06 here" in said

    checkpoint = load_checkpoint(out)
    assert checkpoint.classes == ["crane (0)", "bee", "crane (2)"] and checkpoint.preprocess.crop_pct is None
    assert checkpoint.preprocess.mean == (0.4,) * 3 and checkpoint.preprocess.resize == "bicubic"
    inputs = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(checkpoint.model(inputs), theirs(inputs).logits, atol=1e-5)

    picture = Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    upload = {"file": ("bug.png", image_bytes(picture), "image/png")}
    answer = run(lambda client: client.post("/predict", files=upload), checkpoint=out, device="cpu")
    served = {p["label"]: p["probability"] for p in answer.json()["results"][0]["predictions"]}
    with torch.inference_mode():
        expected = theirs(**processor(picture, return_tensors="pt")).logits.softmax(-1)[0]
    assert [served[name] for name in checkpoint.classes] == pytest.approx(expected.tolist(), abs=1e-5)


def test_a_model_saved_in_shards_imports_whole_and_one_shard_named_alone_is_refused(tmp_path):
    # save_pretrained splits weights over its max_shard_size into shards and an index; such a folder was refused
    # as holding no weights, and a shard named alone was read as the whole model.
    config = transformers_config()
    config.id2label = {0: "ant", 1: "bee", 2: "cow"}
    torch.manual_seed(0)
    theirs = transformers.ViTForImageClassification(config).eval()
    hub = tmp_path / "hub"
    at_our_eps(theirs).save_pretrained(hub, max_shard_size="50KB")
    shards = sorted(hub.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and (hub / "model.safetensors.index.json").is_file()
    main([str(hub), "--out", str(tmp_path / "whole.safetensors")])
    checkpoint = load_checkpoint(tmp_path / "whole.safetensors")
    inputs = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(checkpoint.model(inputs), theirs(inputs).logits, atol=1e-5)
    assert checkpoint.classes == ["ant", "bee", "cow"]
    with pytest.raises(SystemExit, match=f"^vit-import: {shards[1]}: one of {len(shards)} shards of a model's weights"):
        main(
            [str(shards[1]), "--num-heads", "3", "--class-names", "a,b,c", "--out", str(tmp_path / "part.safetensors")]
        )
    shards[-1].unlink()  # a download cut short
    with pytest.raises(SystemExit, match=f"^vit-import: {shards[-1]}: "):
        main([str(hub), "--out", str(tmp_path / "short.safetensors")])


def test_a_transformers_backbone_gets_a_new_head_without_its_pooler_and_what_differs_otherwise_is_refused(tmp_path):
    # A ViTModel (facebook/dino-vits16) names its weights without `vit.` and has a pooler that classifying never reads.
    config = transformers_config()
    torch.manual_seed(0)
    backbone = transformers.ViTModel(config).eval()
    backbone.save_pretrained(tmp_path / "dino")
    out = tmp_path / "imported.safetensors"
    main([str(tmp_path / "dino"), "--class-names", "ant,bee,cow", "--out", str(out)])
    checkpoint = load_checkpoint(out)
    assert checkpoint.training["imported_from"]["head"] == "new"
    inputs = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():  # every token's features after the last LayerNorm, which the new head reads from
        ours, theirs = checkpoint.model.forward_features(inputs), backbone(inputs).last_hidden_state
    assert torch.allclose(ours, theirs, atol=1e-4)  # of features up to about 3 in size

    # facebook/deit-base-patch16-224's processor squashes to 256 x 256, then keeps the centre 224: no option's transform
    (tmp_path / "dino" / "preprocessor_config.json").write_text(json.dumps({"do_center_crop": True, "crop_size": 28}))
    with pytest.raises(SystemExit, match="then its centre crop_size kept, which is not offered here; pass --crop-pct"):
        main([str(tmp_path / "dino"), "--class-names", "ant,bee,cow", "--out", str(out)])
    main([str(tmp_path / "dino"), "--class-names", "ant,bee,cow", "--crop-pct", "0.875", "--out", str(out)])
    assert load_checkpoint(out).preprocess.crop_pct == 0.875

    config.hidden_act = "gelu_new"
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path / "tanh")  # GELU's tanh approximation
    with pytest.raises(SystemExit, match="config.json: hidden_act 'gelu_new'; this model's MLP has the exact GELU"):
        main([str(tmp_path / "tanh"), "--class-names", "ant,bee", "--out", str(tmp_path / "x.safetensors")])


def test_a_torchvision_vit_with_a_pre_logits_layer_is_refused_by_name(tmp_path):
    weights = tmp_path / "vit.safetensors"
    save_file(torchvision_model(representation_size=24).state_dict(), str(weights))
    with pytest.raises(SystemExit, match="torchvision options this model does not have.*heads.pre_logits.weight"):
        main([str(weights), "--num-heads", "3", "--class-names", "a,b,c", "--out", str(tmp_path / "out.safetensors")])


def test_an_imported_model_fine_tuned_on_a_built_in_dataset_serves_uploads_whole_as_that_data_was(tmp_path):
    parent = imported_grey_model(tmp_path, img_size=28, patch_size=7)
    assert load_checkpoint(parent).preprocess.crop_pct == 0.9
    run_args = ["--init-from", str(parent), "--epochs", "1", "--train-limit", "64", "--test-limit", "32"]
    train_main([*run_args, "--batch-size", "32", "--device", "cpu", "--out-dir", str(tmp_path / "run")])
    tuned = load_checkpoint(tmp_path / "run" / "model.safetensors").preprocess
    # Fashion-MNIST's pictures are whole, never cropped: an upload is resized whole too, with the mean and std kept
    assert tuned.crop_pct is None and (tuned.mean, tuned.std) == ((0.3,), (0.35,))


def test_vit_evaluate_scores_an_imported_model_on_the_built_in_dataset_of_its_classes_or_all_of_a_folder(
    tmp_path, capsys
):
    # An imported checkpoint records no dataset: Fashion-MNIST was taken for any, whatever its classes, and of
    # a folder of images it scored the fifth that a run trained on the folder would have held out.
    weights, fashion, bugs = (
        tmp_path / "timm.safetensors",
        tmp_path / "fashion.safetensors",
        tmp_path / "bugs.safetensors",
    )
    save_file(timm_model(in_chans=1, num_classes=10, img_size=28, patch_size=7).state_dict(), str(weights))
    grey = ["--mean", "0.286", "--std", "0.353", "--squash"]
    main(
        [
            str(weights),
            "--num-heads",
            "3",
            "--class-names",
            ",".join(FASHION_MNIST_CLASSES),
            *grey,
            "--out",
            str(fashion),
        ]
    )
    save_file(timm_model().state_dict(), str(weights))
    main([str(weights), "--num-heads", "3", "--class-names", "ant,bee,cow", "--out", str(bugs)])
    capsys.readouterr()
    evaluate_main(["--checkpoint", str(fashion), "--device", "cpu"])
    assert " % top-1 on 10000 fashion-mnist test images" in capsys.readouterr().out.splitlines()[0]
    with pytest.raises(SystemExit) as refused:
        evaluate_main(["--checkpoint", str(bugs), "--device", "cpu"])
    assert str(refused.value) == (
        f"vit-evaluate: {bugs} records no dataset that it was trained on, as vit-import's checkpoints do not, and its "
        "classes (ant, bee, cow) are not a built-in dataset's; give --dataset imagefolder and a --data-dir with a "
        "folder of images for each class"
    )
    images = tmp_path / "images"
    for label in ("ant", "bee", "cow"):
        (images / label).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(images / label / f"{i}.png")
    evaluate_main(["--checkpoint", str(bugs), "--dataset", "imagefolder", "--data-dir", str(images), "--device", "cpu"])
    assert capsys.readouterr().out.splitlines()[0].endswith(" % top-1 on 15 imagefolder test images")


def test_timms_config_json_beside_the_weights_gives_the_heads_classes_and_its_own_transform(tmp_path, capsys):
    theirs = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=3).eval()
    assert theirs.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)  # augreg's, not ImageNet's
    label_names = ["n02012849", "n02219486", "n03126707"]
    descriptions = {"n02012849": "crane", "n02219486": "ant", "n03126707": "crane"}  # ImageNet has two cranes
    hub = tmp_path / "snapshot"
    save_for_hf(theirs, str(hub), model_config={"label_names": label_names, "label_descriptions": descriptions})
    out = tmp_path / "imported.safetensors"
    main([str(hub), "--out", str(out)])  # a Hugging Face Hub download's folder: the weights and config.json in it
    assert f"as {hub / 'config.json'} says" in capsys.readouterr().out

    checkpoint = load_checkpoint(out)
    assert checkpoint.model.config.num_heads == 3  # vit_tiny's, which the file does not repeat
    assert checkpoint.classes == ["crane (n02012849)", "ant", "crane (n03126707)"]
    assert checkpoint.preprocess.mean == (0.5, 0.5, 0.5) and checkpoint.preprocess.crop_pct == 0.9
    picture = Image.fromarray(np.random.default_rng(2).integers(0, 256, (50, 40, 3), dtype=np.uint8))
    upload = {"file": ("bug.png", image_bytes(picture), "image/png")}
    answer = run(lambda client: client.post("/predict", files=upload), checkpoint=out, device="cpu")
    served = {p["label"]: p["probability"] for p in answer.json()["results"][0]["predictions"]}
    saved = json.loads((hub / "config.json").read_text())["pretrained_cfg"]
    transform = timm.data.create_transform(**timm.data.resolve_data_config(pretrained_cfg=saved))  # timm's own
    with torch.inference_mode():
        expected = theirs(transform(picture)[None]).softmax(-1)[0]
    assert [served[name] for name in checkpoint.classes] == pytest.approx(expected.tolist(), abs=1e-5)

    # options still win over the file, and what the file rules out is refused by name
    main([str(hub / "pytorch_model.bin"), "--mean", "0.4", "0.4", "0.4", "--class-names", "a,b,c", "--out", str(out)])
    assert load_checkpoint(out).preprocess.mean == (0.4, 0.4, 0.4) and load_checkpoint(out).classes == ["a", "b", "c"]
    config = json.loads((hub / "config.json").read_text())
    (hub / "config.json").write_text(json.dumps(config | {"label_names": ["n02012849", "n02219486"]}))
    with pytest.raises(SystemExit, match="config.json: its label_names are 2 class names for a head of 3 classes"):
        main([str(hub / "pytorch_model.bin"), "--out", str(out)])
    (hub / "config.json").write_text(json.dumps(config | {"global_pool": "avg"}))
    with pytest.raises(SystemExit, match="global_pool 'avg'; this model classifies from the class token"):
        main([str(hub / "pytorch_model.bin"), "--out", str(out)])


@pytest.mark.parametrize(
    "architecture, heads",
    [
        ("vit_small_patch16_224", 6),
        ("deit_small_patch16_224", 6),
        ("flexivit_small", 6),
        ("deit3_small_patch16_224", 6),
        ("vit_base_patch32_384", None),
        ("eva02_s", None),
    ],
)
def test_the_heads_come_from_an_architectures_name_only_where_its_width_is_that_sizes(architecture, heads):
    # 384 wide: a small ViT's width, not a base's (768); EVA names say nothing of heads
    assert HubConfig(Path("config.json"), {"architecture": architecture, "pretrained_cfg": {}}).num_heads(384) == heads


def test_without_a_config_json_the_heads_and_the_classes_must_be_given(tmp_path):
    weights = tmp_path / "timm.safetensors"
    save_file(timm_model().state_dict(), str(weights))
    with pytest.raises(SystemExit, match="--num-heads is needed: no shape holds it"):
        main([str(weights), "--class-names", "a,b,c", "--out", str(tmp_path / "out.safetensors")])
    with pytest.raises(SystemExit, match="--classes or --class-names is needed"):
        main([str(weights), "--num-heads", "3", "--out", str(tmp_path / "out.safetensors")])
