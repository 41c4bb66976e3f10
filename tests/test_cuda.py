"""The CUDA path, run for real: the engine against the CPU, /attention, the real server, and training.

Skipped where torch sees no GPU (CI has none); bench/gpu_check.sh runs it on a GPU machine.
"""

import itertools
import subprocess
import sys

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from torch.profiler import ProfilerActivity

from app.config import Settings
from app.cuda_graphs import CudaGraphForward
from app.inference import InferenceEngine
from model.checkpoint import load_checkpoint
from model.device import fits_on_device
from model.graphed_step import WARM_UP_STEPS, GraphedStep
from model.policy_feed import PolicyFeed
from model.preprocess import normalize
from model.run_state import load_state
from model.train import Trainer, read_metrics
from model.train import main as train_main
from model.train_options import parse_args
from tests.support.backend import answers_to_a_lone_input
from tests.support.client import explain, maps_alone_and_together, run
from tests.support.images import image_bytes
from tests.support.models import save_small_checkpoint, save_teacher_checkpoint
from tests.support.server import free_port, running_server

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device on this machine")

IMAGES = 1000
# Largest difference from the CPU's fp32 probabilities: fp32 differs only in summation order; fp16 keeps
# 10 bits of mantissa and bf16 7, so their softmax outputs may move by a few units in the third decimal.
TOLERANCE = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 2e-2}
METHODS = ["raw", "last", "rollout", "gradient", "threshold"]
TINY_RUN = ["--model", "nano", "--train-limit", "512", "--test-limit", "256", "--batch-size", "128"]
RUNS_COMPARED = ["eager", "graphed", "pieces"]


def probabilities(engine: InferenceEngine, images: list[torch.Tensor]) -> torch.Tensor:
    rows = itertools.chain.from_iterable(engine.predict_batch(images[i : i + 250]) for i in range(0, len(images), 250))
    return torch.tensor(list(rows))


@pytest.fixture(scope="module")
def test_images(fashion_test) -> list[torch.Tensor]:
    return list(fashion_test.images[:IMAGES])


@pytest.fixture(scope="module")
def cpu_probabilities(shipped_checkpoint, test_images) -> torch.Tensor:
    threads = torch.get_num_threads()
    try:
        return probabilities(InferenceEngine(Settings(device="cpu")), test_images)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_the_engine_on_cuda_classifies_like_the_cpu(precision, test_images, cpu_probabilities):
    engine = InferenceEngine(Settings(device="cuda", precision=precision))
    assert engine.device.type == "cuda" and next(engine.model.parameters()).is_cuda
    assert isinstance(engine.forward, CudaGraphForward)  # the default on CUDA
    on_cuda = probabilities(engine, test_images)
    tolerance = TOLERANCE[precision]
    print(f"{precision}: largest difference {(on_cuda - cpu_probabilities).abs().max():.2e}")
    assert (on_cuda - cpu_probabilities).abs().max() <= tolerance
    if precision == "fp32":
        assert torch.equal(on_cuda.argmax(1), cpu_probabilities.argmax(1))
        return
    # In half precision the top-1 agrees wherever the CPU's two best classes are further apart than the
    # tolerance could swap.
    best_two = cpu_probabilities.topk(2).values
    clear = best_two[:, 0] - best_two[:, 1] > 2 * tolerance
    assert clear.sum() >= 0.98 * IMAGES
    assert torch.equal(on_cuda.argmax(1)[clear], cpu_probabilities.argmax(1)[clear])


@pytest.mark.parametrize(("compiled", "tolerance"), [(False, 1e-5), (True, 1e-4)], ids=["eager", "compiled"])
def test_cuda_graphs_give_the_eager_probabilities_at_every_batch_size(compiled, tolerance, test_images):
    """Graphs of the model's own kernels, or of torch.compile's fused ones (summed in another order)."""
    eager = InferenceEngine(Settings(device="cuda", max_batch_size=32, cuda_graphs=False))
    graphs = InferenceEngine(Settings(device="cuda", max_batch_size=32, cuda_graphs=True, compile=compiled))
    assert sorted(graphs.forward.sizes) == [1, 2, 4, 8, 16, 32]
    for count in (1, 3, 32, 40):  # captured, padded to 4, captured, and past the largest graph
        expected = torch.tensor(eager.predict_batch(test_images[:count]))
        replayed = torch.tensor(graphs.predict_batch(test_images[:count]))
        assert (replayed - expected).abs().max() <= tolerance, count


def kernel_and_graph_launches(engine: InferenceEngine, images: list[torch.Tensor]) -> tuple[int, int]:
    """The kernels and graphs that one /predict batch launches, counted from the CUDA runtime calls profiled."""
    engine.predict_batch(images)  # warm
    with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profile:
        engine.predict_batch(images)
    names = [event.name for event in profile.events()]
    return sum("LaunchKernel" in name for name in names), sum("GraphLaunch" in name for name in names)


def test_a_graphed_batch_launches_no_kernel_outside_its_graph(test_images):
    """Normalisation and softmax are captured with the forward pass: a batch costs its copies and one launch."""
    eager = kernel_and_graph_launches(InferenceEngine(Settings(device="cuda", cuda_graphs=False)), test_images[:3])
    graphed = kernel_and_graph_launches(InferenceEngine(Settings(device="cuda")), test_images[:3])
    print(f"kernel and graph launches: eager {eager}, graphed {graphed}")
    assert eager[0] > 20 and eager[1] == 0, "the profiler should see the eager model's kernels one by one"
    assert graphed == (0, 1)


def test_normalised_floats_on_a_graphed_engine_run_eagerly_and_agree_with_their_pixels(test_images):
    engine = InferenceEngine(Settings(device="cuda"))
    pixels = test_images[:5]
    normalised = [normalize(image, engine.checkpoint.preprocess) for image in pixels]
    from_floats = torch.tensor(engine.predict_batch(normalised))
    assert (from_floats - torch.tensor(engine.predict_batch(pixels))).abs().max() <= 1e-5


def test_a_lone_input_run_on_the_event_loop_replays_the_graph_the_inference_thread_replays(fashion_test):
    pixels = fashion_test.images[0].numpy()
    settings = Settings(device="cuda")
    threaded = answers_to_a_lone_input(settings, pixels)  # CUDA's default, until a GPU has measured the other
    inline = answers_to_a_lone_input(settings.model_copy(update={"inline_lone_batches": True}), pixels)
    assert threaded[2].startswith("inference") and inline[2] != threaded[2]
    assert threaded[0] == inline[0]
    assert np.allclose(threaded[1].values, inline[1].values, atol=1e-6)


def test_every_attention_method_and_view_on_cuda(fashion_test):
    boot = image_bytes(fashion_test.images[0, 0].numpy())
    cases = [*itertools.product(METHODS, ["overlay", "heatmap"]), ("raw", "grid")]  # the grid shows raw attention

    async def scenario(client):
        pictures = [await explain(client, boot, method=method, view=view) for method, view in cases]
        chosen = await explain(client, boot, method="gradient", target=7, format="json")
        return pictures, chosen, (await client.get("/model")).json()

    pictures, chosen, model = run(scenario, device="cuda")
    assert model["device"] == "cuda"
    for (method, view), response in zip(cases, pictures, strict=True):
        assert response.status_code == 200, (method, view, response.text)
        assert response.headers["content-type"] == "image/png"
    assert chosen.status_code == 200 and chosen.json()["target"]["index"] == 7
    assert chosen.json()["predicted"]["index"] == 9


@pytest.mark.parametrize("method", ["rollout", "gradient"])
def test_a_map_on_cuda_is_the_same_alone_and_in_a_batch(method, fashion_test):
    images = [image_bytes(fashion_test.images[i, 0].numpy()) for i in range(8)]

    async def scenario(client):
        return await maps_alone_and_together(client, images, method)

    alone, together, stats = run(scenario, device="cuda", max_batch_size=8, max_wait_ms=50)
    assert stats["max_batch_size_seen"] > 1
    for single, batched in zip(alone, together, strict=True):
        assert np.ravel(batched) == pytest.approx(np.ravel(single), abs=1e-4)


@pytest.mark.parametrize("device, app", [("cuda", "app.main:create_app"), ("auto", None)])
def test_the_real_server_serves_from_the_gpu(device, app, fashion_test):
    # auto goes through vit-serve (app=None), which also picks its worker count by asking the driver.
    with running_server({"VIT_DEVICE": device}, app=app) as server:
        files = [("file", (f"{i}.png", image_bytes(fashion_test.images[i, 0].numpy()), "image/png")) for i in range(4)]
        response = httpx.post(f"{server.base_url}/predict", files=files, timeout=30)
        model = httpx.get(f"{server.base_url}/model", timeout=10).json()
    assert response.status_code == 200
    assert [r["predictions"][0]["index"] for r in response.json()["results"]] == fashion_test.labels[:4].tolist()
    assert model["device"] == "cuda"


def test_one_epoch_on_cuda_then_resume(tmp_path):
    out = tmp_path / "run"
    on_cuda = [*TINY_RUN, "--device", "cuda", "--ema-decay", "0.99", "--out-dir", str(out)]
    train_main([*on_cuda, "--epochs", "1"])
    train_main([*on_cuda, "--epochs", "2", "--resume"])
    checkpoint = load_checkpoint(out / "model.safetensors")
    assert checkpoint.training["epochs"] == 2 and checkpoint.training["device"] == torch.cuda.get_device_name(0)
    assert (out / "metrics.jsonl").read_text().count('"epoch"') == 2


def test_a_state_saved_on_the_cpu_resumes_on_cuda_fused_and_graphed(tmp_path):
    out = tmp_path / "run"
    run = [*TINY_RUN, "--out-dir", str(out)]
    train_main([*run, "--device", "cpu", "--epochs", "1"])
    train_main([*run, "--device", "cuda", "--cuda-graphs", "--epochs", "2", "--resume"])
    state = load_state(out / "state.pt", torch.device("cpu"))
    assert state["epoch"] == 1 and all(group["fused"] for group in state["optimizer"]["param_groups"])
    assert (out / "metrics.jsonl").read_text().count('"epoch"') == 2


@pytest.mark.parametrize("policy", [[], ["--augment", "trivialaugment"]], ids=["plain", "policy"])
def test_training_images_kept_in_host_memory_train_as_those_on_the_gpu(policy, tmp_path, monkeypatch, capsys):
    torch.cuda.empty_cache()  # what torch's cache holds counts as free too
    free, cuda = torch.cuda.mem_get_info()[0], torch.device("cuda")
    assert fits_on_device(int(0.4 * free), cuda) and not fits_on_device(int(0.6 * free), cuda)
    pinned_asked, result = [], PolicyFeed.result

    def recorded(feed, epoch, pinned=False):
        pinned_asked.append(pinned)
        return result(feed, epoch, pinned)

    monkeypatch.setattr(PolicyFeed, "result", recorded)
    run = [*TINY_RUN, "--device", "cuda", "--epochs", "2", "--warmup-epochs", "1", *policy]
    train_main([*run, "--out-dir", str(tmp_path / "device")])
    monkeypatch.setattr("model.train.fits_on_device", lambda nbytes, device: False)
    train_main([*run, "--out-dir", str(tmp_path / "host")])
    assert "they stay in host memory" in capsys.readouterr().err
    # An epoch's augmented images are pinned for their one copy to the GPU, not where they stay on the host.
    assert pinned_asked == ([True, True, False, False] if policy else [])
    on_device, on_host = (load_state(tmp_path / name / "state.pt", torch.device("cpu")) for name in ("device", "host"))
    for name, weights in on_device["model"].items():  # the same batches; a GPU's backward may add in another order
        torch.testing.assert_close(on_host["model"][name], weights, rtol=0, atol=1e-3)


# The model card's runs were compiled; a step replayed from a CUDA graph must not wait on the host either,
# nor one that learns from a ViT teacher, as tiny-distill-small-150 in bench/recipe_runs.py does.
@pytest.mark.parametrize(
    "fast, save_teacher",
    [
        (["--compile"], save_teacher_checkpoint),
        (["--cuda-graphs", "--train-limit", "1024"], save_teacher_checkpoint),
        (["--compile", "--cuda-graphs", "--train-limit", "1024"], save_small_checkpoint),
    ],
    ids=["compiled", "graphed", "compiled-and-graphed-with-a-vit-teacher"],
)
def test_a_step_with_every_recipe_option_never_waits_on_the_host(fast, save_teacher, tmp_path):
    teacher = save_teacher(tmp_path / "teacher.safetensors")
    recipe = ["--augment", "trivialaugment", "--mixup", "0.8", "--cutmix", "1.0", "--repeated-aug", "2", *fast]
    recipe += ["--teacher", str(teacher)]
    trainer = Trainer(parse_args([*TINY_RUN, *recipe, "--device", "cuda", "--out-dir", str(tmp_path)]), [])
    graphed = "--cuda-graphs" in fast
    try:
        indices, choices = trainer.epoch_plan(0)
        images, rows = trainer.epoch_images(0, indices)  # through the policy's CPU workers, then one copy
        images = images[rows]
        labels, choices = trainer.train_labels[indices.cuda()], choices.cuda()
        batches = list(zip(images.split(128), labels.split(128), choices.split(128), strict=True))
        # Compiling, loading every kernel once and capturing the graph may wait on the host; steps may not.
        ready = WARM_UP_STEPS + 1 if graphed else 1
        for batch in batches[:ready]:
            trainer.train_batch(*batch)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any device-to-host wait in a step raises
        try:
            for step, batch in enumerate(batches[ready:]):
                trainer.set_learning_rate(step)
                loss, hits = trainer.train_batch(*batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    finally:
        trainer.close()
    assert len(batches) - ready >= 2 and (getattr(trainer.step, "graph", None) is not None) == graphed
    assert loss.is_cuda and torch.isfinite(loss) and 0 <= hits <= 128


def test_a_graphed_step_runs_once_per_call_on_each_new_input_and_draws_from_the_reseeded_generator():
    total = torch.zeros((), device="cuda")

    def step(inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        noise = torch.rand(3, device="cuda")
        total.add_(inputs.sum() * targets)  # a step's effect on the state it trains
        return noise, total * 1

    graphed = GraphedStep(step, warm_up_steps=2)
    values = [float(i) for i in range(1, 7)]
    noises = []
    for value in values:
        noise, seen = graphed(torch.full((4,), value, device="cuda"), torch.tensor(2.0, device="cuda"))
        noises.append(noise.clone())
    assert graphed.graph is not None
    assert total.item() == seen.item() == 8 * sum(values)  # every call ran exactly one step, on its own input
    assert len({tuple(noise.tolist()) for noise in noises}) == len(values)  # new numbers at every replay
    replayed = []
    for _ in range(2):
        torch.manual_seed(7)
        replayed.append(graphed(torch.ones(4, device="cuda"), torch.tensor(1.0, device="cuda"))[0].clone())
    torch.testing.assert_close(replayed[0], replayed[1], rtol=0, atol=0)


def test_a_graphed_run_trains_as_the_eager_one_does_and_resumes(tmp_path):
    # Three epochs of four steps: three eager warm-up steps, the capture, and replays whose learning rate
    # falls along the cosine from its peak. No stochastic depth: both runs draw the same numbers only without it.
    run = [*TINY_RUN, "--device", "cuda", "--epochs", "3", "--warmup-epochs", "1", "--drop-path", "0"]
    run += ["--mixup", "0.8", "--cutmix", "1.0", "--ema-decay", "0.99"]
    train_main([*run, "--out-dir", str(tmp_path / "eager")])
    train_main([*run, "--cuda-graphs", "--out-dir", str(tmp_path / "graphed")])
    train_main([*run, "--cuda-graphs", "--out-dir", str(tmp_path / "pieces"), "--stop-after", "0"])  # one epoch
    train_main([*run, "--cuda-graphs", "--out-dir", str(tmp_path / "pieces"), "--resume"])
    eager, graphed, pieces = (load_state(tmp_path / name / "state.pt", torch.device("cpu")) for name in RUNS_COMPARED)
    assert eager["epoch"] == graphed["epoch"] == pieces["epoch"] == 2
    for key in ("model", "ema"):  # the weights, and their EMA updated after each replay
        weights = [state[key] if key == "model" else state[key]["model"] for state in (eager, graphed, pieces)]
        for name in weights[0]:
            # A learning rate frozen at its value when captured would move some weights by up to about 7e-3.
            torch.testing.assert_close(weights[1][name], weights[0][name], rtol=0, atol=1e-3)
            torch.testing.assert_close(weights[2][name], weights[1][name], rtol=0, atol=1e-3)
    losses = [
        [record["train_loss"] for record in read_metrics(tmp_path / name / "metrics.jsonl")] for name in RUNS_COMPARED
    ]
    assert losses[0] == pytest.approx(losses[1], rel=1e-3) and losses[1] == pytest.approx(losses[2], rel=1e-3)


@pytest.mark.parametrize("dataset", ["fashion-mnist", "imagefolder"])
def test_torchrun_trains_over_nccl(tmp_path, dataset):
    out, data = tmp_path / "run", []
    if dataset == "imagefolder":  # decoded through the process group (Distributed.decode), gathered on the GPU
        for label, grey in (("ant", 60), ("bee", 190)):
            (tmp_path / "images" / label).mkdir(parents=True)
            for i in range(20):
                Image.new("L", (12, 12), grey + i).save(tmp_path / "images" / label / f"{i}.png")
        data = ["--dataset", "imagefolder", "--data-dir", str(tmp_path / "images"), "--image-size", "16"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={free_port()}"]
    command = [*launcher, "-m", "model.train", *TINY_RUN, *data, "--device", "cuda", "--epochs", "1"]
    command += ["--out-dir", str(out)]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    training = load_checkpoint(out / "model.safetensors").training
    assert training["processes"] == 1 and training["backend"] == "nccl"
