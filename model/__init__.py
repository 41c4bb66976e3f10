"""The Vision Transformer, its checkpoints, data and training."""

from pathlib import Path

# The shipped checkpoint is package data, so that every install finds it here, editable or not. Defined here
# rather than in model.checkpoint so that reading it (the service's settings do) does not import torch.
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "weights" / "vit-tiny-fashion-mnist.safetensors"
