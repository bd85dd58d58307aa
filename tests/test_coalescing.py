"""BatchCoalescer: jobs that queue while the pipeline is busy become one full batch."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from deployments.coalescing import BatchCoalescer


class FakePipeline:
    """Records the batches it runs; each job is (name, images); the outcome is the name."""

    def __init__(self, seconds_per_batch: float = 0.05, fail_on: str | None = None) -> None:
        self.batches: list[list[str]] = []
        self.seconds = seconds_per_batch
        self.fail_on = fail_on
        self.started = threading.Event()

    def run(self, jobs):
        self.started.set()
        names = [name for name, _ in jobs]
        self.batches.append(names)
        threading.Event().wait(self.seconds)
        if self.fail_on in names:
            raise RuntimeError("pipeline failed")
        return [f"done:{name}" for name in names]


def make(pipeline: FakePipeline, max_images: int = 8) -> BatchCoalescer:
    coalescer = BatchCoalescer(
        run_batch=pipeline.run,
        executor=ThreadPoolExecutor(max_workers=1),
        size_of=lambda job: job[1],
        max_images=lambda: max_images,
        on_batch=lambda images: coalescer.batch_sizes.append(images),
    )
    coalescer.batch_sizes = []
    return coalescer


def test_an_idle_pipeline_starts_at_once_and_later_arrivals_are_merged():
    pipeline = FakePipeline()
    coalescer = make(pipeline)

    async def scenario():
        first = coalescer.submit(("a", 1))
        await asyncio.to_thread(pipeline.started.wait)  # "a" runs alone
        later = [coalescer.submit((name, 1)) for name in "bcdef"]  # five small batches
        later += [coalescer.submit(("g", 2))]
        return await asyncio.gather(first, *later)

    results = asyncio.run(scenario())
    assert results == ["done:a", "done:b", "done:c", "done:d", "done:e", "done:f", "done:g"]
    assert pipeline.batches == [["a"], ["b", "c", "d", "e", "f", "g"]]
    assert coalescer.batch_sizes == [1, 7]


def test_merging_stops_at_max_images_and_keeps_order():
    pipeline = FakePipeline()
    coalescer = make(pipeline, max_images=4)

    async def scenario():
        blocker = coalescer.submit(("x", 1))
        await asyncio.to_thread(pipeline.started.wait)
        futures = [coalescer.submit(job) for job in [("a", 2), ("b", 1), ("c", 2), ("d", 1), ("e", 4)]]
        await asyncio.gather(blocker, *futures)

    asyncio.run(scenario())
    assert pipeline.batches == [["x"], ["a", "b"], ["c", "d"], ["e"]]


def test_a_job_larger_than_the_limit_still_runs_alone():
    # The limit can be lowered at runtime below a job that was split under the old one.
    pipeline = FakePipeline(seconds_per_batch=0)
    coalescer = make(pipeline, max_images=2)

    async def scenario():
        return await asyncio.gather(coalescer.submit(("big", 5)), coalescer.submit(("small", 1)))

    assert asyncio.run(scenario()) == ["done:big", "done:small"]
    assert pipeline.batches == [["big"], ["small"]]


def test_a_failing_batch_fails_only_its_own_jobs():
    pipeline = FakePipeline(fail_on="b")
    coalescer = make(pipeline, max_images=2)

    async def scenario():
        blocker = coalescer.submit(("x", 1))
        await asyncio.to_thread(pipeline.started.wait)
        futures = [coalescer.submit((name, 1)) for name in "abcd"]
        return await asyncio.gather(blocker, *futures, return_exceptions=True)

    results = asyncio.run(scenario())
    assert results[0] == "done:x"
    assert [type(r) for r in results[1:3]] == [RuntimeError, RuntimeError]  # a and b shared a batch
    assert results[3:] == ["done:c", "done:d"]


def test_a_cancelled_job_gets_no_pipeline_time():
    pipeline = FakePipeline()
    coalescer = make(pipeline)

    async def scenario():
        blocker = coalescer.submit(("x", 1))
        await asyncio.to_thread(pipeline.started.wait)
        gone = coalescer.submit(("gone", 1))
        kept = coalescer.submit(("kept", 1))
        gone.cancel()
        await asyncio.gather(blocker, kept)
        with pytest.raises(asyncio.CancelledError):
            await gone

    asyncio.run(scenario())
    assert pipeline.batches == [["x"], ["kept"]]


def test_a_failing_metric_does_not_stop_the_pipeline():
    pipeline = FakePipeline(seconds_per_batch=0)

    def broken_metric(images):
        raise RuntimeError("metrics backend is down")

    coalescer = BatchCoalescer(
        run_batch=pipeline.run,
        executor=ThreadPoolExecutor(max_workers=1),
        size_of=lambda job: job[1],
        max_images=lambda: 8,
        on_batch=broken_metric,
    )

    async def scenario():
        return await asyncio.gather(coalescer.submit(("a", 1)), coalescer.submit(("b", 1)))

    assert asyncio.run(scenario()) == ["done:a", "done:b"]


def test_an_abandoned_job_still_queued_never_runs():
    """A job whose stream ended while it waited (``is_abandoned``, deployments/abandonment.py)
    is dropped from the queue unrun, its future cancelled; the jobs around it run as before."""
    pipeline = FakePipeline()
    abandoned: set[str] = set()
    coalescer = BatchCoalescer(
        run_batch=pipeline.run,
        executor=ThreadPoolExecutor(max_workers=1),
        size_of=lambda job: job[1],
        max_images=lambda: 8,
        is_abandoned=lambda job: job[0] in abandoned,
    )

    async def scenario():
        blocker = coalescer.submit(("x", 1))
        await asyncio.to_thread(pipeline.started.wait)
        gone = coalescer.submit(("gone", 2))
        kept = coalescer.submit(("kept", 1))
        abandoned.add("gone")  # its caller went away; nobody cancelled the future itself
        assert await asyncio.gather(blocker, kept) == ["done:x", "done:kept"]
        assert gone.cancelled()

    asyncio.run(scenario())
    assert pipeline.batches == [["x"], ["kept"]]
