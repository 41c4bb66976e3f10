"""The serving options that rebuild the model's forward pass still classify like the plain model."""

import numpy as np
import pytest
import torch

from app.config import Settings
from app.inference import InferenceEngine
from model.preprocess import normalize


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


def test_the_engine_takes_uint8_pixels_normalised_floats_or_both_in_one_batch(small_checkpoint):
    engine = InferenceEngine(Settings(checkpoint=small_checkpoint, device="cpu"))
    torch.manual_seed(0)
    pixels = [torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8) for _ in range(3)]
    normalised = [normalize(image, engine.checkpoint.preprocess) for image in pixels]
    with torch.inference_mode():
        expected = engine.model(torch.stack(normalised)).softmax(dim=-1)
    for inputs in (pixels, normalised, [pixels[0], normalised[1], pixels[2]]):
        assert torch.allclose(torch.tensor(engine.predict_batch(inputs)), expected, atol=1e-6)
    arrays = [image.numpy() for image in pixels]  # as a front end of the model process sends them
    assert torch.allclose(torch.tensor(engine.predict_batch(arrays)), expected, atol=1e-6)
