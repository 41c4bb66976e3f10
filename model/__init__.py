"""The Vision Transformer, its checkpoints, data and training."""

from pathlib import Path

# Here rather than in model.checkpoint so that reading it (the service's settings do) does not import torch.
DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "weights" / "vit-tiny-fashion-mnist.safetensors"
