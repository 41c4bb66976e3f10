"""The serving options that rebuild the model's forward pass still classify like the plain model."""

import logging
import threading
import warnings

import numpy as np
import pytest
import torch

from app.config import Settings
from app.inference import InferenceEngine
from model.checkpoint import load_checkpoint
from model.device import autocast
from model.preprocess import normalize
from tests.support.backend import answers_to_a_lone_input
from tests.support.client import explain, run
from tests.support.images import image_bytes

IMAGES = 1000
# bf16 keeps 7 bits of mantissa: a softmax output moves in its second decimal. How far it moves depends on the
# CPU's kernels (AVX2, AVX512-BF16 or AMX sum their products in other orders): on 10,000 test images the 99th
# percentile of the largest move was 0.010 to 0.011 on each of the three, and the largest 0.039 to 0.047. One image
# of the first 1,000 moved 0.0235 with AMX, 0.0188 without: a bound on the largest move alone held on some CPUs.
BF16_TOLERANCE = 5e-2  # no probability moves further
BF16_TYPICAL = 1.5e-2  # 99 % of the images' probabilities move less


def test_int8_quantized_engine_gives_close_probabilities(small_checkpoint):
    torch.manual_seed(0)
    images = [torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8) for _ in range(4)]
    plain = InferenceEngine(Settings(checkpoint=small_checkpoint, device="cpu")).predict_batch(images)
    int8 = InferenceEngine(Settings(checkpoint=small_checkpoint, device="cpu", quantize="int8")).predict_batch(images)
    assert np.allclose(plain, int8, atol=0.02)
    assert not np.array_equal(plain, int8)  # the quantized layers really ran


def test_a_compiled_engine_on_the_cpu_gives_the_eager_probabilities(small_checkpoint):
    # VIT_COMPILE on the CPU: Inductor's C++ kernels, built at warm-up with the machine's compiler
    torch.manual_seed(0)
    images = [torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8) for _ in range(5)]
    eager = InferenceEngine(Settings(checkpoint=small_checkpoint, device="cpu")).predict_batch(images)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = InferenceEngine(Settings(checkpoint=small_checkpoint, device="cpu", compile=True))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # it really was compiled
    assert np.allclose(compiled.predict_batch(images), eager, atol=1e-5)


def test_an_int8_server_says_so_in_model_and_its_start_up_line_without_torchs_deprecation_warning(
    small_checkpoint, caplog
):
    with warnings.catch_warnings(record=True) as raised, caplog.at_level(logging.INFO, logger="app"):
        warnings.simplefilter("always")
        int8 = run(lambda client: client.get("/model"), checkpoint=small_checkpoint, quantize="int8").json()
    plain = run(lambda client: client.get("/model"), checkpoint=small_checkpoint).json()
    assert (int8["precision"], int8["quantize"]) == ("fp32", "int8")
    assert (plain["precision"], plain["quantize"]) == ("fp32", "none")
    assert "in fp32 with int8 linear layers" in caplog.text
    assert not [warning for warning in raised if "deprecated" in str(warning.message)]


def test_bf16_on_the_cpu_classifies_like_fp32_within_its_tolerance(shipped_checkpoint, fashion_test):
    images = list(fashion_test.images[:IMAGES])
    fp32 = torch.tensor(InferenceEngine(Settings(device="cpu")).predict_batch(images))
    bf16 = torch.tensor(InferenceEngine(Settings(device="cpu", precision="bf16")).predict_batch(images))
    moved = (bf16 - fp32).abs().amax(1)  # each image's largest move
    assert moved.max() <= BF16_TOLERANCE and moved.quantile(0.99) <= BF16_TYPICAL
    assert not torch.equal(bf16, fp32)  # the matrix products really ran in bf16
    # The top-1 agrees wherever fp32's two best classes are further apart than the tolerance could swap.
    best_two = fp32.topk(2).values
    clear = best_two[:, 0] - best_two[:, 1] > 2 * BF16_TOLERANCE
    assert clear.sum() >= 0.95 * IMAGES
    assert torch.equal(bf16.argmax(1)[clear], fp32.argmax(1)[clear])


def test_a_bf16_engine_casts_its_weights_once_and_computes_what_autocast_over_fp32_weights_does(
    shipped_checkpoint, fashion_test
):
    engine = InferenceEngine(Settings(device="cpu", precision="bf16"))
    plain = load_checkpoint(shipped_checkpoint).model.eval()
    assert engine.model.head.weight.dtype == torch.bfloat16 and engine.model.norm.weight.dtype == torch.float32
    images = fashion_test.images[:64]
    with torch.inference_mode(), autocast(torch.device("cpu"), "bf16"):
        expected = plain(normalize(images, engine.checkpoint.preprocess)).float().softmax(dim=-1)
    assert torch.equal(torch.tensor(engine.predict_batch(list(images))), expected)


@pytest.mark.parametrize("method", ["rollout", "gradient"])
def test_bf16_attention_maps_on_the_cpu_match_fp32(method, shipped_checkpoint, fashion_test):
    boot = image_bytes(fashion_test.images[0, 0].numpy())

    async def scenario(client):
        return await explain(client, boot, method=method, format="json")

    fp32, bf16 = (run(scenario, device="cpu", precision=precision) for precision in ("fp32", "bf16"))
    assert fp32.status_code == bf16.status_code == 200, bf16.text
    predicted = [response.json()["predicted"] for response in (fp32, bf16)]
    assert predicted[1]["index"] == predicted[0]["index"]
    assert predicted[1]["probability"] == pytest.approx(predicted[0]["probability"], abs=BF16_TOLERANCE)
    assert predicted[1]["probability"] != predicted[0]["probability"]  # the attention pass really ran in bf16
    maps = [np.array(response.json()["map"]) for response in (fp32, bf16)]
    assert maps[1].shape == maps[0].shape
    assert np.corrcoef(maps[0].ravel(), maps[1].ravel())[0, 1] > 0.999


def test_bf16_on_a_cpu_without_bf16_instructions_starts_with_a_warning(small_checkpoint, monkeypatch, caplog):
    monkeypatch.setattr("app.inference.cpu_computes_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="app.inference"):
        InferenceEngine(Settings(checkpoint=small_checkpoint, device="cpu", precision="bf16"))
    assert "VIT_PRECISION=bf16 on a CPU without bf16 instructions" in caplog.text


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"cuda_graphs": True}, "VIT_CUDA_GRAPHS runs on CUDA only"),
        ({"precision": "fp16"}, "VIT_PRECISION=fp16 runs on CUDA only"),
        ({"quantize": "int8", "precision": "bf16"}, "VIT_QUANTIZE=int8 runs with VIT_PRECISION=fp32 only"),
    ],
    ids=["cuda graphs", "fp16", "int8 in bf16"],
)
def test_options_that_the_cpu_cannot_run_stop_start_up_with_the_reason(options, reason, small_checkpoint):
    with pytest.raises(ValueError, match=reason):
        InferenceEngine(Settings(checkpoint=small_checkpoint, device="cpu", **options))


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


@pytest.fixture
def torch_threads():
    """Engines set torch's process-wide thread count; put back what the test found."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_a_lone_input_on_one_cpu_thread_runs_on_the_event_loop_and_gets_what_the_thread_gives(
    small_checkpoint, torch_threads
):
    pixels = np.random.default_rng(0).integers(0, 256, (1, 28, 28), dtype=np.uint8)
    settings = Settings(checkpoint=small_checkpoint, device="cpu", torch_threads=1)
    inline = answers_to_a_lone_input(settings, pixels)  # the default with one torch thread
    threaded = answers_to_a_lone_input(settings.model_copy(update={"inline_lone_batches": False}), pixels)
    assert threaded[2].startswith("inference") and inline[2] == threading.current_thread().name
    assert threaded[0] == inline[0]
    assert np.array_equal(threaded[1].values, inline[1].values)  # a gradient map: autograd on the event loop too


def test_with_several_torch_threads_a_lone_input_stays_on_the_inference_thread_unless_asked(
    small_checkpoint, torch_threads
):
    pixels = np.random.default_rng(0).integers(0, 256, (1, 28, 28), dtype=np.uint8)
    settings = Settings(checkpoint=small_checkpoint, device="cpu", torch_threads=2)
    assert answers_to_a_lone_input(settings, pixels)[2].startswith("inference")  # no second OpenMP team
    asked = settings.model_copy(update={"inline_lone_batches": True})
    assert answers_to_a_lone_input(asked, pixels)[2] == threading.current_thread().name
