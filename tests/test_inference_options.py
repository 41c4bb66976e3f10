"""The serving options that rebuild the model's forward pass still classify like the plain model."""

import numpy as np
import pytest
import torch

from app.config import Settings
from app.inference import InferenceEngine


def test_int8_quantized_engine_gives_close_probabilities(small_checkpoint):
    torch.manual_seed(0)
    images = [torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8) for _ in range(4)]
    plain = InferenceEngine(Settings(checkpoint=small_checkpoint, device="cpu")).predict_batch(images)
    int8 = InferenceEngine(Settings(checkpoint=small_checkpoint, device="cpu", quantize="int8")).predict_batch(images)
    assert np.allclose(plain, int8, atol=0.02)
    assert not np.array_equal(plain, int8)  # the quantized layers really ran


def test_options_for_another_device_stop_start_up_with_the_reason(small_checkpoint):
    with pytest.raises(ValueError, match="VIT_CUDA_GRAPHS runs on CUDA only"):
        InferenceEngine(Settings(checkpoint=small_checkpoint, device="cpu", cuda_graphs=True))
