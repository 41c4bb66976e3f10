"""vit-import: a timm, torchvision or transformers ViT's weights (.safetensors or .pth) as a checkpoint to serve.

    vit-import vit_small.safetensors --num-heads 6 --classes classes.txt --out model.safetensors

Our model has timm's names and decomposition, so timm's weights load as they are, and torchvision's and
transformers' once renamed (the same model: class token, pre-norm blocks, exact GELU; transformers' query, key
and value packed into one qkv, and its LayerNorm eps of 1e-12 taken as timm's 1e-6). The architecture is read
from their shapes, except the number of heads, which no shape holds; the config.json beside the weights, where
there is one (timm's or transformers'), gives those, the classes and the transform. Three timm options become
our weights exactly (with_timm_options_folded); another that our model does not have (register tokens, a
pre-norm, pooling without the class token, torchvision's pre-logits layer, ...) shows up as weights with no
place here, and is refused by name.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import pickle
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from model.arguments import (
    POSITIVE,
    HelpFormatter,
    interrupted_says,
    make_folder_for,
    model_name,
    nonempty_path,
    real,
)
from model.checkpoint import save_checkpoint
from model.files import WriteError
from model.images import RESAMPLING, PreprocessConfig
from model.metadata import CheckpointError, class_names_problem, file_sha256, some_of
from model.paths import access_problem
from model.vit import LAYER_NORM_EPS, VisionTransformer, ViTConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsImportError(ValueError):
    """Weights that cannot become one of our checkpoints; the message says why."""


HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # what a Hugging Face Hub download of a timm model holds
# Where save_pretrained split them into shards (a model over its max_shard_size): which shard holds each weight.
SHARD_INDEXES = tuple(f"{name}.index.json" for name in HUB_WEIGHTS)
SHARD_NAME = re.compile(r"-\d{5}-of-(\d{5})\.(safetensors|bin)$")  # model-00002-of-00005.safetensors


def weights_file(path: Path) -> Path:
    """The weights that `path` names: the file itself, or the weights in a Hugging Face Hub download's folder."""
    if problem := access_problem(path):
        raise WeightsImportError(f"{path}: {problem}")
    if not path.is_dir():
        return path
    for name in HUB_WEIGHTS + SHARD_INDEXES:
        if (path / name).is_file():
            return path / name
    raise WeightsImportError(
        f"{path}: a folder without {', '.join(HUB_WEIGHTS)} or their shards' index; name the file of weights"
    )


def training_options_allowed() -> contextlib.AbstractContextManager:
    """torch.load(weights_only=True) allowed, for one load, to rebuild the options that timm's and torchvision's
    training scripts keep beside the weights (`args`, an argparse.Namespace: a plain bag of attributes), as timm's
    own loader allows it. Their checkpoints were refused as "not a state dict that torch.load reads without running
    code"."""
    return torch.serialization.safe_globals([argparse.Namespace])


# Where a training checkpoint keeps the weights, in the order that timm's loader looks for them (use_ema=True, its
# default): the moving average's, where the run kept one (timm's train.py: state_dict_ema; torchvision's
# references: model_ema), else the model's.
WEIGHTS_ENTRIES = ("state_dict_ema", "model_ema", "state_dict", "model")
AVERAGED = {"state_dict_ema", "model_ema"}
# What wrappers put before every name: DDP's module., torch.compile's _orig_mod., either around the other (timm's
# clean_state_dict). Such weights were refused as "timm options this model does not have".
WRAPPER_PREFIXES = ("_orig_mod.", "module.", "_orig_mod.")


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """A .safetensors file, or a .pth holding a state dict: bare, or a training checkpoint's (WEIGHTS_ENTRIES);
    and the entry it was, where it was one; or the shards that an index lists. The names come without the
    wrappers' prefixes."""
    check_readable(path)
    if path.name.endswith(".index.json"):
        return sharded_state_dict(path), None
    if (shard := SHARD_NAME.search(path.name)) and int(shard[1]) > 1:  # named alone, not through the index
        raise WeightsImportError(
            f"{path}: one of {int(shard[1])} shards of a model's weights; give the folder that holds them all, with "
            f"their index ({' or '.join(SHARD_INDEXES)})"
        )
    return weights_in(path)


def check_readable(path: Path) -> None:
    if problem := access_problem(path):
        raise WeightsImportError(f"{path}: {problem}")
    if not path.is_file():  # a folder is weights_file's to look into
        raise WeightsImportError(f"{path}: no such file")


def weights_in(path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """read_state_dict of one file, found readable."""
    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path))
        except SafetensorError as error:
            reason = f"not a readable .safetensors file (truncated or corrupt?): {error}"
            raise WeightsImportError(f"{path}: {reason}") from None
        return unwrapped(state), None
    try:
        with training_options_allowed():
            loaded = torch.load(path, map_location="cpu", weights_only=True)  # tensors and containers only: no code
    except pickle.UnpicklingError:  # torch's own message is pages of advice on loading it unsafely
        raise WeightsImportError(
            f"{path}: not a state dict that torch.load reads without running code (a whole pickled model, "
            "or not a .pth at all); save model.state_dict() instead"
        ) from None
    entry = next(
        (key for key in WEIGHTS_ENTRIES if isinstance(loaded, dict) and isinstance(loaded.get(key), dict)), None
    )
    loaded = loaded[entry] if entry else loaded
    if not isinstance(loaded, dict) or not all(isinstance(value, torch.Tensor) for value in loaded.values()):
        raise WeightsImportError(f"{path}: not a state dict of tensors")
    return unwrapped(loaded), entry


def sharded_state_dict(index: Path) -> dict[str, torch.Tensor]:
    """The weights of every shard that a save_pretrained index lists (`weight_map`: name -> shard file), each
    shard read as a file of weights is, and checked to hold what the index says it holds. Such a folder was
    refused as holding no weights, and one shard named alone was imported as if it were the whole model."""
    weight_map = json_file(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightsImportError(f"{index}: not an index of shards (no weight_map)")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(index.parent / name for name in set(map(str, weight_map.values()))):
        check_readable(shard)
        state |= weights_in(shard)[0]
    if missing := sorted(set(unwrapped(dict.fromkeys(weight_map))) - set(state)):  # named as the shards' are
        raise WeightsImportError(f"{index}: {some_of(missing)}: in no shard, where the index says they are")
    return state


def unwrapped(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights named as the model itself names them, without the prefixes of the wrappers it was saved in,
    and without torch's AveragedModel's count of the averages taken (torchvision's model_ema), which is no weight."""
    names = {}
    for key, value in state.items():
        for prefix in WRAPPER_PREFIXES:
            key = key.removeprefix(prefix)
        names[key] = value
    names.pop("n_averaged", None)
    return names


# torchvision's VisionTransformer -> ours: prefixes of its weight names, and what they become.
TORCHVISION_NAMES = (
    (r"conv_proj\.", "patch_embed.proj."),
    (r"class_token$", "cls_token"),
    (r"encoder\.pos_embedding$", "pos_embed"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.ln_1\.", r"blocks.\1.norm1."),
    (r"encoder\.layers\.encoder_layer_(\d+)\.self_attention\.in_proj_(weight|bias)$", r"blocks.\1.attn.qkv.\2"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.self_attention\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"encoder\.layers\.encoder_layer_(\d+)\.ln_2\.", r"blocks.\1.norm2."),
    (r"encoder\.layers\.encoder_layer_(\d+)\.mlp\.(0|linear_1)\.", r"blocks.\1.mlp.fc1."),  # linear_1: before 0.13
    (r"encoder\.layers\.encoder_layer_(\d+)\.mlp\.(3|linear_2)\.", r"blocks.\1.mlp.fc2."),
    (r"encoder\.ln\.", "norm."),
    (r"heads\.head\.", "head."),
)


# transformers' ViTForImageClassification (google/vit-base-patch16-224 and the rest on the Hugging Face Hub), as
# its files name the weights -> ours; a ViTModel (a backbone: facebook/dino-vits16) names them without `vit.`.
# Its query, key and value are separate; packed_qkv packs them as ours.
TRANSFORMERS_NAMES = tuple(
    (r"(?:vit\.)?" + pattern, replacement)
    for pattern, replacement in (
        (r"embeddings\.cls_token$", "cls_token"),
        (r"embeddings\.position_embeddings$", "pos_embed"),
        (r"embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
        (r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.", r"blocks.\1.attn.\2."),
        (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
        (r"encoder\.layer\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
        (r"encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
        (r"encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
        (r"encoder\.layer\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
        (r"layernorm\.", "norm."),
    )
) + ((r"classifier\.", "head."),)


@dataclass(frozen=True)
class Source:
    """Whose weights: how its weight names become ours, and the evaluation transform its ViTs were published with."""

    name: str
    resize: str
    crop_pct: float | None  # None: the whole picture resized to the square
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    names: tuple[tuple[str, str], ...] = ()  # prefixes of its weight names, and what they become
    unused: str | None = None  # a prefix of weights that classifying never reads, left out as its own code leaves them

    @property
    def whose(self) -> str:
        return f"{self.name}'" if self.name.endswith("s") else f"{self.name}'s"


# Most of timm's ViTs: pretrained_cfg's interpolation and crop_pct. torchvision's IMAGENET1K_V1: resize to 256, keep
# the centre 224. transformers': ViTImageProcessor's transform, and a ViTModel's pooler, which classifying never reads.
TIMM = Source("timm", "bicubic", 0.9)
TORCHVISION = Source("torchvision", "bilinear", 224 / 256, names=TORCHVISION_NAMES)
TRANSFORMERS = Source(
    "transformers", "bilinear", None, (0.5,) * 3, (0.5,) * 3, TRANSFORMERS_NAMES, unused=r"(?:vit\.)?pooler\."
)


def source_of(state: dict[str, torch.Tensor]) -> Source:
    if "conv_proj.weight" in state:
        return TORCHVISION
    if "embeddings.patch_embeddings.projection.weight" in {key.removeprefix("vit.") for key in state}:
        return TRANSFORMERS
    return TIMM


def renamed(state: dict[str, torch.Tensor], source: Source) -> dict[str, torch.Tensor]:
    """The weights under our names, by the source's rules; a name that no rule renames (torchvision's
    heads.pre_logits, transformers' mask token) is left as it was, to be refused by name."""
    ours = {}
    for key, value in state.items():
        if source.unused and re.match(source.unused, key):
            continue
        for pattern, replacement in source.names:
            key, count = re.subn("^" + pattern, replacement, key)
            if count:
                break
        ours[key] = value
    return packed_qkv(ours)


def packed_qkv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Separate attn.query, attn.key and attn.value projections (transformers') packed into one attn.qkv, stacked
    in that order along their outputs, as timm's and torchvision's are: each head's features then fall where
    ours reads them."""
    packed = dict(state)
    for query in [key for key in state if re.fullmatch(r"blocks\.\d+\.attn\.query\.(weight|bias)", key)]:
        parts = [query.replace(".query.", f".{part}.") for part in ("query", "key", "value")]
        if all(part in state for part in parts):
            packed[query.replace(".query.", ".qkv.")] = torch.cat([packed.pop(part) for part in parts])
    return packed


def _generic(key: str) -> str:
    return re.sub(r"^blocks\.\d+\.", "blocks.N.", key)


# Every weight name our model has, with the block number left out.
OUR_NAMES = frozenset(_generic(key) for key in VisionTransformer(ViTConfig()).state_dict())


def lacks_class_position(state: dict[str, torch.Tensor]) -> bool:
    """Whether pos_embed has a row per patch of a square grid and none for the class token, as timm's
    no_embed_class=True has it (FlexiViT, DeiT III). A class row and (G - 1) x (G + 1) patches make as many
    rows, but this model has square grids only."""
    pos_embed = state.get("pos_embed")
    if pos_embed is None or pos_embed.ndim != 3:
        return False
    tokens = pos_embed.shape[1]
    return math.isqrt(tokens) ** 2 == tokens and math.isqrt(tokens - 1) ** 2 != tokens - 1


def with_class_position(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights whose pos_embed lacks the class token's row, as ours: with a row of zeros there. timm adds the
    embedding to the patches and then puts the class token in front of them, untouched; ours adds it to all
    of them, so a zero row is the same sum."""
    pos_embed = state["pos_embed"]
    return state | {"pos_embed": torch.cat([pos_embed.new_zeros(1, 1, pos_embed.shape[2]), pos_embed], dim=1)}


LAYER_SCALED = {"ls1": "attn.proj", "ls2": "mlp.fc2"}  # timm's LayerScale of a block's branch, and its last layer


def with_layer_scale_folded(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights of timm's init_values (LayerScale: DeiT III), which multiplies each branch's output by a learned
    per-channel gamma, x + gamma * (W z + b), with gamma folded into the branch's last layer, (gamma W) z +
    gamma b: the same sums in blocks without it. A gamma whose layer is missing is left, to be refused."""
    folded = dict(state)
    for key in state:
        if (found := re.fullmatch(r"(blocks\.\d+)\.(ls[12])\.gamma", key)) is None:
            continue
        layer = f"{found[1]}.{LAYER_SCALED[found[2]]}"
        if f"{layer}.weight" in state and f"{layer}.bias" in state:
            gamma = folded.pop(key).float()
            folded[f"{layer}.weight"] = state[f"{layer}.weight"] * gamma[:, None]
            folded[f"{layer}.bias"] = state[f"{layer}.bias"] * gamma
    return folded


def with_zero_qkv_bias(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights of timm's qkv_bias=False (vit_base_patch16_224_miil) with a bias of zeros, which adds nothing."""
    return state | {
        key.removesuffix("weight") + "bias": weight.new_zeros(weight.shape[0])
        for key, weight in state.items()
        if re.fullmatch(r"blocks\.\d+\.attn\.qkv\.weight", key) and key.removesuffix("weight") + "bias" not in state
    }


def with_timm_options_folded(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The weights with the timm options that become ours exactly made so, and those options' names."""
    folded = []
    if lacks_class_position(state):
        state, folded = with_class_position(state), [*folded, "no_embed_class"]
    if (scaled := with_layer_scale_folded(state)).keys() != state.keys():  # a gamma folded is a key fewer
        state, folded = scaled, [*folded, "layer_scale"]
    if (zero_bias := with_zero_qkv_bias(state)).keys() != state.keys():
        state, folded = zero_bias, [*folded, "qkv_bias"]
    return state, folded


FOLDED_NOTES = {
    "no_embed_class": "pos_embed had no row for the class token (timm's no_embed_class): it is zeros",
    "layer_scale": "each block's layer scale is folded into its attn.proj and mlp.fc2",
    "qkv_bias": "attn.qkv had no bias (timm's qkv_bias=False): it is zeros",
}


NEW_HEAD_NOTE = "no head in the weights: a new, untrained one for these classes; train it with vit-train --init-from"


def config_from(
    state: dict[str, torch.Tensor], num_heads: int, source: Source = TIMM, num_classes: int | None = None
) -> ViTConfig:
    """The architecture that these weights (named as ours) fit, from their shapes; a backbone's (no head) with a
    head of `num_classes`."""
    unsupported = sorted({_generic(key) for key in state} - OUR_NAMES)
    if unsupported:
        raise WeightsImportError(
            f"{source.name} options this model does not have; weights with no place here: " + ", ".join(unsupported[:8])
        )
    needed = ("patch_embed.proj.weight", "pos_embed", "cls_token") + (("head.weight",) if num_classes is None else ())
    missing = [key for key in needed if key not in state]
    if missing:
        raise WeightsImportError(
            f"not a {source.name} VisionTransformer with a class token and a head: no {', '.join(missing)}"
        )
    dim, in_channels, patch_size, _ = state["patch_embed.proj.weight"].shape
    tokens = state["pos_embed"].shape[1] - 1  # the class token has a position too (timm's no_embed_class=False)
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise WeightsImportError(f"pos_embed holds {tokens} patch positions, not a square grid")
    depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
    if "blocks.0.mlp.fc1.weight" not in state:
        raise WeightsImportError(
            f"not a {source.name} VisionTransformer with transformer blocks: no blocks.0.mlp.fc1.weight"
        )
    hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    if "blocks.0.mlp.fc2.weight" in state and (taken := state["blocks.0.mlp.fc2.weight"].shape[1]) != hidden:
        raise WeightsImportError(
            f"blocks.0.mlp.fc1 gives {hidden} features and fc2 takes {taken}: a gated MLP (timm's SwiGLU), "
            "which this model does not have"
        )
    mlp_ratio = hidden / dim
    while int(dim * mlp_ratio) < hidden:  # the MLP is int(dim * mlp_ratio) wide: 56 * (61 / 56) is 60.999...
        mlp_ratio = math.nextafter(mlp_ratio, math.inf)
    return ViTConfig(
        image_size=grid * patch_size,
        patch_size=patch_size,
        in_channels=in_channels,
        num_classes=state["head.weight"].shape[0] if num_classes is None else num_classes,
        dim=dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
    )


def import_weights(
    state: dict[str, torch.Tensor], num_heads: int, source: Source = TIMM, num_classes: int | None = None
) -> VisionTransformer:
    """Our model with these weights (named as ours). config_from has refused weights with no place here; what
    is left to refuse is weights that are missing. A backbone without a head (timm's num_classes=0: DINO's
    ViTs) gets a new head of `num_classes`, initialised as a fresh model's, for vit-train --init-from to train."""
    model = VisionTransformer(config_from(state, num_heads, source, num_classes))
    if num_classes is not None:  # a backbone's: the head that the model was built with
        state = state | {name: value for name, value in model.state_dict().items() if name.startswith("head.")}
    absent = sorted(key for key in model.state_dict() if key not in state)
    if absent:
        raise WeightsImportError(
            f"{source.name} options this model does not have; weights it lacks: {', '.join(absent[:8])}"
        )
    misshapen = [
        f"{key} {list(state[key].shape)}, not {list(value.shape)}"
        for key, value in model.state_dict().items()
        if state[key].shape != value.shape
    ]
    if misshapen:  # load_state_dict's message is a line per weight, in its own words
        raise WeightsImportError(
            f"weights shaped otherwise than in a {source.name} ViT of dim {model.config.dim} whose MLPs are "
            f"{model.blocks[0].mlp.fc1.out_features} wide, as blocks.0's: " + "; ".join(misshapen[:4])
        )
    model.load_state_dict(state)
    return model.eval()


# timm's ViT sizes by the word in their names (vit_base_patch16_224, deit_small_patch16_224...): width and
# heads, for a config.json whose model_args leave the heads to the architecture's defaults.
TIMM_SIZES = {"tiny": (192, 3), "small": (384, 6), "medium": (512, 8), "base": (768, 12), "large": (1024, 16)}
TIMM_SIZES |= {"huge": (1280, 16)}


@dataclass(frozen=True)
class HubConfig:
    """timm's config.json beside the weights, as a Hugging Face Hub download has it: the architecture's name,
    the evaluation transform (pretrained_cfg) and, for many models, the class names. Without it, the
    preprocessing defaulted to ImageNet's mean and std, and the many timm ViTs trained with 0.5 (the
    augreg ones) were served pictures standardised wrongly, without a word."""

    path: Path
    config: dict
    classes_key = "label_names"

    @classmethod
    def beside(cls, weights: Path) -> HubConfig | None:
        path = weights.with_name("config.json")
        config = json_file(path)
        if not isinstance(config.get("pretrained_cfg"), dict):
            return None  # not timm's: a transformers config.json, say
        return cls(path, config)

    @property
    def data(self) -> dict:
        return self.config["pretrained_cfg"]

    def num_heads(self, dim: int) -> int | None:
        if isinstance(heads := self.config.get("model_args", {}).get("num_heads"), int):
            return heads
        size = re.match(r"(?:vit|deit|deit3|flexivit)_([a-z]+)(?:_|$)", str(self.config.get("architecture", "")))
        width, heads = TIMM_SIZES.get(size.group(1) if size else "", (None, None))
        return heads if width == dim else None

    def classes(self) -> list[str] | None:
        """label_names in head order, each as its label_description where there is one; a description that
        two classes share (ImageNet's two cranes) keeps its name beside it."""
        names = self.config.get("label_names")
        if isinstance(names, dict):  # classifier index -> name, where the indices have gaps
            names = [names[key] for key in sorted(names, key=int)]
        if not isinstance(names, list) or not names:
            return None
        descriptions = self.config.get("label_descriptions") or {}
        return told_apart([str(descriptions.get(name, name)) for name in names], names)

    def notes(self) -> list[str]:
        return []

    def check_model(self) -> None:
        if (pool := self.config.get("global_pool", "token")) != "token":
            raise WeightsImportError(f"{self.path}: global_pool {pool!r}; this model classifies from the class token")

    def crop(self, default: float | None) -> float | None:
        """pretrained_cfg's crop_pct in its crop_mode: a centre crop, or None for a squash to the square; `default`
        where it gives none."""
        if "crop_pct" not in self.data:
            return default
        mode, crop_pct = self.data.get("crop_mode", "center"), self.data["crop_pct"]
        if mode == "center" or crop_pct is None:
            return crop_pct
        if mode == "squash" and crop_pct >= 1:
            return None
        raise WeightsImportError(
            f"{self.path}: crop_mode {mode!r} with crop_pct {crop_pct} is not offered here; pass --crop-pct or --squash"
        )


def told_apart(labels: list[str], tags: list[object]) -> list[str]:
    """Class names from a config's labels: a label that two classes share keeps its tag (timm's class name,
    transformers' index) beside it, as an answer could not say which class it means: `crane (134)`."""
    counts = Counter(labels)
    return [f"{label} ({tag})" if counts[label] > 1 else label for label, tag in zip(labels, tags, strict=True)]


def json_file(path: Path) -> dict:
    """A JSON object from `path`, or {} where there is no such file."""
    if not path.is_file():
        return {}
    try:
        loaded = json.loads(path.read_bytes())  # JSON is UTF-8, with or without a byte-order mark, whatever the locale
    except (OSError, ValueError) as error:
        raise WeightsImportError(f"{path}: not a readable JSON file: {error}") from None
    return loaded if isinstance(loaded, dict) else {}


def class_lines(path: Path) -> list[str]:
    """--classes: a class name per line, blank lines skipped. A byte-order mark, which Windows' Notepad writes
    first, is dropped: it was the first class's first character."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise WeightsImportError(
            f"--classes {path}: not UTF-8 text (byte {error.object[error.start]:#x} at {error.start}); save it as UTF-8"
        ) from None
    return [line.strip() for line in text.splitlines() if line.strip()]


PIL_FILTERS = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # transformers' `resample`, PIL's numbers for its filters


@dataclass(frozen=True)
class TransformersConfig:
    """transformers' config.json and preprocessor_config.json beside the weights, as a Hugging Face Hub download of
    a ViTForImageClassification has them (google/vit-base-patch16-224): the heads, the classes and the transform
    of its ViTImageProcessor (the whole picture resized to the square, standardised by its image_mean and
    image_std). Such weights were refused as "timm options this model does not have"."""

    path: Path
    config: dict
    processor: dict
    classes_key = "id2label"

    @classmethod
    def beside(cls, weights: Path) -> TransformersConfig | None:
        path = weights.with_name("config.json")
        if (config := json_file(path)).get("model_type") != "vit":
            return None
        return cls(path, config, json_file(weights.with_name("preprocessor_config.json")))

    @property
    def data(self) -> dict:
        """What its processor says of the transform, in the words of timm's pretrained_cfg."""
        names = {"image_mean": "mean", "image_std": "std"}
        data = {ours: self.processor[theirs] for theirs, ours in names.items() if theirs in self.processor}
        if "resample" in self.processor:
            data["interpolation"] = PIL_FILTERS.get(self.processor["resample"], str(self.processor["resample"]))
        return data

    def check_model(self) -> None:
        """What no weight shows, and this model does otherwise: another activation."""
        if (activation := self.config.get("hidden_act", "gelu")) != "gelu":
            raise WeightsImportError(f"{self.path}: hidden_act {activation!r}; this model's MLP has the exact GELU")

    def num_heads(self, dim: int) -> int | None:
        heads = self.config.get("num_attention_heads")
        return heads if isinstance(heads, int) else None

    def classes(self) -> list[str] | None:
        """id2label in head order; a label that two classes share (ImageNet's two cranes, 134 and 517, in
        google/vit-base-patch16-224's) keeps its index beside it, as an answer could not say which it means."""
        labels = self.config.get("id2label")
        if not isinstance(labels, dict) or not labels:
            return None
        indices = sorted(labels, key=int)
        return told_apart([str(labels[index]) for index in indices], [int(index) for index in indices])

    def crop(self, default: float | None) -> float | None:
        """`default`, ViTImageProcessor's squash; a processor that crops after it (facebook/deit-base-patch16-224's:
        the picture squashed to 256 x 256, then its centre 224 kept) is refused, as no option here does as it does."""
        if not self.processor.get("do_center_crop"):
            return default
        raise WeightsImportError(
            f"{self.path.with_name('preprocessor_config.json')}: the picture squashed to size, then its centre "
            "crop_size kept, which is not offered here; pass --crop-pct CROP_SIZE/SIZE (the centre of the shorter "
            "side, as timm crops) or --squash"
        )

    def notes(self) -> list[str]:
        """What the import changes of the model: its LayerNorms' eps (transformers' 1e-12) is ours, timm's."""
        if (eps := self.config.get("layer_norm_eps", LAYER_NORM_EPS)) == LAYER_NORM_EPS:
            return []
        return [f"its LayerNorms' eps {eps:g} is {LAYER_NORM_EPS:g} here, as in timm's"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument(
        "weights",
        type=nonempty_path,
        help="a timm, torchvision or transformers ViT's state dict, .safetensors or .pth (or a training "
        "checkpoint: timm's train.py's, say), or the folder of a Hugging Face Hub download "
        f"({' or '.join(HUB_WEIGHTS)} in it)",
    )
    parser.add_argument(
        "--num-heads",
        type=POSITIVE,
        help="attention heads per block, which no shape holds (default: what timm's config.json beside the "
        "weights says, by its model_args or its architecture's name)",
    )
    names = parser.add_mutually_exclusive_group()
    names.add_argument(
        "--classes",
        type=nonempty_path,
        help="a text file with one class name per line, in head order (default: config.json's label_names, "
        "with their label_descriptions)",
    )
    names.add_argument("--class-names", help="the class names, comma-separated, in head order")
    parser.add_argument(
        "--mean",
        type=float,
        nargs="+",
        help=f"per-channel mean of the inputs (default: config.json's, else ImageNet's {IMAGENET_MEAN})",
    )
    parser.add_argument(
        "--std",
        type=float,
        nargs="+",
        help=f"per-channel std of the inputs (default: config.json's, else ImageNet's {IMAGENET_STD})",
    )
    parser.add_argument(
        "--resize",
        choices=RESAMPLING,
        help=f"the filter that resizes uploads (default: config.json's interpolation, else {TIMM.resize} for "
        f"timm's weights, {TORCHVISION.resize} for torchvision's)",
    )
    crop = parser.add_mutually_exclusive_group()
    crop.add_argument(
        "--crop-pct",
        type=real(0.0, 1.0, above=True),
        help="the evaluation crop: the shorter side resized to the input size / this, and the centre kept (timm's "
        f"pretrained_cfg['crop_pct']; default: config.json's, else {TIMM.crop_pct:g} for timm's weights, as most "
        f"of its ViTs, {TORCHVISION.crop_pct:g} for torchvision's, whose transform resizes to 256 and keeps 224)",
    )
    crop.add_argument(
        "--squash", action="store_true", help="resize the whole picture to the square instead, as vit-train does"
    )
    parser.add_argument(
        "--name", type=model_name, help="the model's name, as vit-serve serves it (default: the output file's)"
    )
    parser.add_argument("--out", type=nonempty_path, required=True, help="the checkpoint to write (.safetensors)")
    return parser


@interrupted_says("vit-import", "nothing written")
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.weights = weights_file(args.weights)  # a Hugging Face Hub download's folder: the weights in it
        state, entry = read_state_dict(args.weights)
        source = source_of(state)
        state = renamed(state, source)
        state, folded = with_timm_options_folded(state)
        headless = "head.weight" not in state and "head.bias" not in state  # a backbone: timm's num_classes=0
        config_of = {TIMM: HubConfig, TRANSFORMERS: TransformersConfig}.get(source)
        hub = config_of.beside(args.weights) if config_of else None
        data = hub.data if hub else {}
        if hub:
            hub.check_model()
        num_heads = args.num_heads
        if num_heads is None and hub and "patch_embed.proj.weight" in state:
            num_heads = hub.num_heads(state["patch_embed.proj.weight"].shape[0])
        if num_heads is None:
            raise WeightsImportError(
                "--num-heads is needed: no shape holds it, and no config.json beside the weights does"
            )
        if args.classes:
            classes = class_lines(args.classes)
        elif args.class_names:
            classes = [name.strip() for name in args.class_names.split(",")]
        elif hub and (named := hub.classes()):
            classes = named
        else:
            raise WeightsImportError(
                "--classes or --class-names is needed: these weights have no head (a backbone: timm's num_classes=0); "
                "name the classes to fine-tune it for"
                if headless
                else f"--classes or --class-names is needed: {hub.path} has no {hub.classes_key}"
                if hub
                else "--classes or --class-names is needed: no config.json beside the weights names them"
            )
        model = import_weights(state, num_heads, source, len(classes) if headless else None)
        config = model.config
        if len(classes) != config.num_classes:
            given = "" if args.classes or args.class_names else f"{hub.path}: its {hub.classes_key} are "
            raise WeightsImportError(f"{given}{len(classes)} class names for a head of {config.num_classes} classes")
        if problem := class_names_problem(classes):
            raise WeightsImportError(problem)
        if config.in_channels not in (1, 3):
            raise WeightsImportError(f"{config.in_channels} input channels; 1 (gray) or 3 (RGB) are served")
        preprocess = PreprocessConfig(
            config.image_size,
            config.in_channels,
            tuple(args.mean or data.get("mean", source.mean)),
            tuple(args.std or data.get("std", source.std)),
            args.resize or data.get("interpolation", source.resize),
            None if args.squash else args.crop_pct or (hub.crop(source.crop_pct) if hub else source.crop_pct),
        )
        if preprocess.resize not in RESAMPLING:
            raise WeightsImportError(
                f"{hub.path if hub else 'the weights'}: interpolation {preprocess.resize!r}; pass --resize"
            )
        make_folder_for(args.out, "--out", reads=args.weights)
    except (WeightsImportError, CheckpointError, ValueError, OSError, RuntimeError) as error:
        raise SystemExit(f"vit-import: {error}") from None
    training = {
        "imported_from": {"path": str(args.weights), "sha256": file_sha256(args.weights), "format": source.name}
        | ({"entry": entry} if entry else {})
        | ({"folded": folded} if folded else {})
        | ({"head": "new"} if headless else {})
    }
    try:
        save_checkpoint(args.out, model, classes, preprocess, training | ({"name": args.name} if args.name else {}))
    except WriteError as error:
        raise SystemExit(f"vit-import: {error}") from None
    notes = (
        ([f"the moving average's weights ({entry}), as timm's loader takes them"] if entry in AVERAGED else [])
        + [FOLDED_NOTES[name] for name in folded]
        + ([NEW_HEAD_NOTE] if headless else [])
        + ([f"what the options left out, as {hub.path} says", *hub.notes()] if hub else [])
    )
    print(
        f"{args.out}: {source.whose} {config.depth} blocks of dim {config.dim}, {config.num_heads} heads, "
        f"{config.image_size} x {config.image_size} x {config.in_channels} inputs "
        f"({'squashed' if preprocess.crop_pct is None else f'centre crop {preprocess.crop_pct:g}'}), "
        f"{len(classes)} classes" + "".join(f"; {note}" for note in notes)
    )


if __name__ == "__main__":
    main()
