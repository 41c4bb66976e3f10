import asyncio
import logging
import threading
import time

import pytest
import torch

from app.batcher import BatchError, DynamicBatcher, InferenceThread, QueueFullError, ShuttingDownError


class CountingModel:
    """Doubles its input and records every batch it was given, and on which thread."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.batch_sizes: list[int] = []
        self.threads: set[str] = set()
        self.delay_s = delay_s
        self.release = threading.Event()
        self.release.set()

    def __call__(self, items: list[torch.Tensor]) -> list[float]:
        self.release.wait(5)
        self.batch_sizes.append(len(items))
        self.threads.add(threading.current_thread().name)
        return (torch.stack(items) * 2).tolist()


async def running(model, thread: InferenceThread | None = None, **options) -> DynamicBatcher:
    settings = {"max_batch_size": 8, "max_wait_ms": 50, "queue_size": 64} | options
    batcher = DynamicBatcher(model, thread=thread or InferenceThread(), **settings)
    batcher.start()
    return batcher


def test_concurrent_requests_share_batches_and_each_gets_its_own_row():
    async def scenario():
        model = CountingModel()
        batcher = await running(model)
        results = await asyncio.gather(*(batcher.submit(torch.tensor(float(i)), 5) for i in range(16)))
        await batcher.stop()
        return model, batcher, results

    model, batcher, results = asyncio.run(scenario())
    assert results == [2.0 * i for i in range(16)]
    assert max(model.batch_sizes) > 1 and sum(model.batch_sizes) == 16
    assert batcher.stats.requests == 16 and batcher.stats.to_dict()["max_batch_size_seen"] == max(model.batch_sizes)
    assert len(model.threads) == 1 and "inference" in model.threads.pop()


def test_with_inline_lone_batches_a_lone_input_on_an_idle_thread_runs_on_the_event_loop():
    async def scenario():
        model = CountingModel()
        batcher = await running(model, InferenceThread(inline_lone_batches=True), max_wait_ms=0)
        result = await batcher.submit(torch.tensor(3.0), 5)
        await batcher.stop()
        return model, result

    model, result = asyncio.run(scenario())
    assert result == 6.0 and model.threads == {threading.current_thread().name}


def test_with_inline_lone_batches_larger_batches_and_inputs_that_find_the_thread_busy_still_run_on_it():
    async def scenario():
        thread = InferenceThread(inline_lone_batches=True)
        first, second = CountingModel(), CountingModel()
        first.release.clear()  # its batch of two holds the inference thread
        pair = await running(first, thread, max_wait_ms=50)  # two batchers on one thread, as a backend has
        lone = await running(second, thread, max_wait_ms=0)
        held = asyncio.gather(*(pair.submit(torch.tensor(float(i)), 5) for i in range(2)))
        await asyncio.sleep(0.2)
        waiting = asyncio.ensure_future(lone.submit(torch.tensor(5.0), 5))
        await asyncio.sleep(0.05)
        assert not waiting.done() and second.batch_sizes == []  # queued behind the busy thread, not run beside it
        first.release.set()
        results = await held, await waiting
        await pair.stop()
        await lone.stop()
        return first, second, results

    first, second, results = asyncio.run(scenario())
    assert results == ([0.0, 2.0], 10.0) and first.batch_sizes == [2]
    assert first.threads == second.threads == {"inference_0"}


def test_a_lone_request_runs_after_max_wait_not_never():
    async def scenario():
        batcher = await running(CountingModel(), max_wait_ms=5)
        result = await batcher.submit(torch.tensor(1.0), 2)
        await batcher.stop()
        return result

    assert asyncio.run(scenario()) == 2.0


def test_full_queue_refuses_at_once():
    async def scenario():
        model = CountingModel()
        model.release.clear()  # hold the inference thread so the queue fills up
        batcher = await running(model, max_batch_size=1, max_wait_ms=0, queue_size=2)
        first = asyncio.ensure_future(batcher.submit(torch.tensor(0.0), 5))
        await asyncio.sleep(0.05)  # the collector takes it and blocks in the model
        queued = [asyncio.ensure_future(batcher.submit(torch.tensor(1.0), 5)) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFullError):
            await batcher.submit(torch.tensor(2.0), 5)
        model.release.set()
        results = await asyncio.gather(first, *queued)
        await batcher.stop()
        return results

    assert asyncio.run(scenario()) == [0.0, 2.0, 2.0]


def test_requests_past_their_deadline_are_dropped_before_running():
    async def scenario():
        model = CountingModel()
        model.release.clear()
        batcher = await running(model, max_batch_size=4, max_wait_ms=0)
        blocker = asyncio.ensure_future(batcher.submit(torch.tensor(0.0), 5))
        await asyncio.sleep(0.05)
        with pytest.raises(asyncio.TimeoutError):
            await batcher.submit(torch.tensor(1.0), 0.05)
        model.release.set()
        await blocker
        await batcher.submit(torch.tensor(3.0), 5)
        await batcher.stop()
        return model, batcher

    model, batcher = asyncio.run(scenario())
    assert model.batch_sizes == [1, 1]  # the expired request never reached the model
    assert batcher.stats.dropped == 1


def test_an_enqueued_input_is_told_its_deadline_passed_and_a_cancelled_one_is_dropped_silently():
    async def scenario():
        model = CountingModel()
        model.release.clear()
        batcher = await running(model, max_batch_size=4, max_wait_ms=0)
        blocker = batcher.enqueue(torch.tensor(0.0), 5)
        await asyncio.sleep(0.05)  # running, held in the model
        late, cancelled, kept = (
            batcher.enqueue(torch.tensor(value), timeout) for value, timeout in ((1.0, 0.05), (2.0, 5), (3.0, 5))
        )
        cancelled.cancel()
        await asyncio.sleep(0.1)  # late's deadline passes while it waits: no timer fires for it
        assert not late.done()
        model.release.set()
        results = await asyncio.gather(blocker, late, kept, return_exceptions=True)
        await batcher.stop()
        return model, batcher, results

    model, batcher, (blocker, late, kept) = asyncio.run(scenario())
    assert (blocker, kept) == (0.0, 6.0) and isinstance(late, TimeoutError)
    assert model.batch_sizes == [1, 1] and batcher.stats.dropped == 2


def test_every_request_of_a_failed_batch_gets_the_error():
    def broken(items):
        raise RuntimeError("out of memory")

    async def scenario():
        batcher = await running(broken)
        outcomes = await asyncio.gather(
            *(batcher.submit(torch.tensor(1.0), 5) for _ in range(3)), return_exceptions=True
        )
        await batcher.stop()
        return outcomes

    outcomes = asyncio.run(scenario())
    assert all(isinstance(outcome, RuntimeError) and "out of memory" in str(outcome) for outcome in outcomes)


def test_a_batch_with_too_few_results_fails_its_requests_at_once_and_the_next_one_succeeds(caplog):
    calls = []

    def loses_a_row(items):
        calls.append(len(items))
        rows = (torch.stack(items) * 2).tolist()
        return rows[:-1] if len(calls) == 1 else rows

    async def scenario():
        batcher = await running(loses_a_row, max_wait_ms=50)
        outcomes = await asyncio.gather(
            *(batcher.submit(torch.tensor(1.0), 5) for _ in range(3)), return_exceptions=True
        )
        after = await batcher.submit(torch.tensor(4.0), 5)
        await batcher.stop()
        return outcomes, after, batcher.stats

    started = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="app.batcher"):
        outcomes, after, stats = asyncio.run(scenario())
    assert time.monotonic() - started < 2  # failed at once, not after the 5 s timeout
    assert calls[0] == 3
    assert all(
        isinstance(outcome, BatchError) and "returned 2 results for 3 inputs" in str(outcome) for outcome in outcomes
    )
    assert after == 8.0
    assert stats.failed_batches == 1 and stats.requests == 1  # the short batch is not counted as served
    assert len(caplog.records) == 1 and caplog.records[0].exc_info is not None


class BrokenObserver:
    def batch_ran(self, name, queue_seconds, compute_seconds, queue_depth):
        raise ValueError("metrics backend is down")


def test_an_observer_that_raises_is_logged_once_a_batch_and_the_batcher_keeps_serving(caplog):
    async def scenario():
        batcher = DynamicBatcher(CountingModel(), 8, 0, 64, InferenceThread(), observer=BrokenObserver())
        batcher.start()
        first = await batcher.submit(torch.tensor(1.0), 5)
        second = await batcher.submit(torch.tensor(2.0), 5)
        await batcher.stop()
        return first, second

    with caplog.at_level(logging.ERROR, logger="app.batcher"):
        assert asyncio.run(scenario()) == (2.0, 4.0)  # results are delivered before the hook runs
    assert len(caplog.records) == 2  # once per batch
    assert all("metrics backend is down" in record.exc_text for record in caplog.records)


def test_stop_fails_the_running_batch_and_the_queued_requests():
    async def scenario():
        model = CountingModel()
        model.release.clear()  # the first batch stays on the inference thread
        batcher = await running(model, max_batch_size=1, max_wait_ms=0)
        running_now = asyncio.ensure_future(batcher.submit(torch.tensor(0.0), 5))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(batcher.submit(torch.tensor(1.0), 5))
        await asyncio.sleep(0)
        await batcher.stop()
        model.release.set()
        return await asyncio.gather(running_now, queued, return_exceptions=True)

    outcomes = asyncio.run(scenario())
    assert all(isinstance(outcome, ShuttingDownError) for outcome in outcomes), outcomes
