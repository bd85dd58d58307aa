"""The batch lane of BatchCoalescer: batch jobs only fill the slots interactive jobs leave."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

from deployments.coalescing import BatchCoalescer
from serve_app.lane import INTERACTIVE, batch_lane
from tests.test_coalescing import FakePipeline


def make(pipeline: FakePipeline, max_images: int = 8, grace_s: float = 0.0) -> BatchCoalescer:
    """Jobs are (name, images, shape); a name starting with "b" is a batch line."""
    return BatchCoalescer(
        batch_grace_s=lambda: grace_s,
        run_batch=pipeline.run_named,
        executor=ThreadPoolExecutor(max_workers=1),
        size_of=lambda job: job[1],
        max_images=lambda: max_images,
        is_batch=lambda job: job[0].startswith("b"),
        shape_of=lambda job: job[2],
    )


class Pipeline(FakePipeline):
    def run_named(self, jobs):
        return self.run([(name, images) for name, images, _ in jobs])


def test_interactive_jobs_go_first_and_batch_jobs_top_up_their_call():
    pipeline = Pipeline()
    coalescer = make(pipeline, max_images=4)

    async def scenario():
        running = coalescer.submit(("b0", 4, "64"))  # the pipeline is busy with batch work
        await asyncio.to_thread(pipeline.started.wait)
        queued = [coalescer.submit(job) for job in [("b1", 2, "64"), ("b2", 1, "128"), ("b3", 1, "64")]]
        queued += [coalescer.submit(("i1", 1, "64")), coalescer.submit(("i2", 1, "64"))]
        return await asyncio.gather(running, *queued)

    asyncio.run(scenario())
    # i1 and i2 arrived last but run next; the room left in their call (2 images) takes the
    # oldest batch job of their shape that fits; b2 (another shape) is never added to their batch.
    assert pipeline.batches == [["b0"], ["i1", "i2", "b1"], ["b2", "b3"]]


def test_an_interactive_job_waits_at_most_the_batch_running_when_it_arrives():
    pipeline = Pipeline(seconds_per_batch=0.05)
    coalescer = make(pipeline, max_images=2)

    async def scenario():
        lines = [coalescer.submit((f"b{n}", 2, "64")) for n in range(10)]
        await asyncio.to_thread(pipeline.started.wait)
        interactive = coalescer.submit(("i", 1, "64"))
        await interactive
        return pipeline.batches.index(["i"]) if ["i"] in pipeline.batches else None, lines

    position, _ = asyncio.run(_finish(scenario))
    assert position == 1  # right after the batch that ran when it arrived (b0 fills the call)


def test_after_an_interactive_call_the_next_interactive_job_goes_before_batch_work_alone():
    """Closed-loop clients are on their way back when a call ends: batch work alone waits
    ``batch_grace_s`` for them instead of making each one wait for a batch-only call."""
    pipeline = Pipeline(seconds_per_batch=0)
    coalescer = make(pipeline, max_images=1, grace_s=1.0)  # i2 comes back well within it

    async def scenario():
        await coalescer.submit(("i1", 1, "64"))
        line = coalescer.submit(("b1", 1, "64"))  # queued at once: without the grace, it runs now
        await asyncio.sleep(0)  # let the pipeline pick (it must keep waiting)
        await coalescer.submit(("i2", 1, "64"))  # the client is back
        await line

    asyncio.run(scenario())
    assert pipeline.batches == [["i1"], ["i2"], ["b1"]]


def test_batch_work_alone_runs_once_the_grace_has_passed():
    pipeline = Pipeline(seconds_per_batch=0)
    coalescer = make(pipeline, max_images=1, grace_s=0.01)

    async def scenario():
        await coalescer.submit(("i1", 1, "64"))
        await coalescer.submit(("b1", 1, "64"))  # nobody interactive comes: it runs

    asyncio.run(asyncio.wait_for(scenario(), 5))
    assert pipeline.batches == [["i1"], ["b1"]]


async def _finish(scenario):
    position, lines = await scenario()
    await asyncio.gather(*lines)
    return position, lines


def test_batch_jobs_run_when_no_interactive_work_waits():
    pipeline = Pipeline(seconds_per_batch=0)
    coalescer = make(pipeline, max_images=4)

    async def scenario():
        return await asyncio.gather(*(coalescer.submit((f"b{n}", 2, "64")) for n in range(4)))

    assert asyncio.run(scenario()) == [f"done:b{n}" for n in range(4)]
    assert pipeline.batches == [["b0", "b1"], ["b2", "b3"]]


def test_without_lanes_every_job_is_interactive():
    pipeline = Pipeline(seconds_per_batch=0)
    coalescer = BatchCoalescer(
        run_batch=pipeline.run_named,
        executor=ThreadPoolExecutor(max_workers=1),
        size_of=lambda job: job[1],
        max_images=lambda: 8,
    )

    async def scenario():
        return await asyncio.gather(coalescer.submit(("b1", 1, "x")), coalescer.submit(("i1", 1, "y")))

    assert asyncio.run(scenario()) == ["done:b1", "done:i1"]
    assert pipeline.batches == [["b1", "i1"]]


def test_lane_prices():
    assert INTERACTIVE.price_units(1_000_000) == 1_000_000 and INTERACTIVE.rate_limited
    lane = batch_lane(Decimal("0.5"))
    assert lane.priority == "batch" and not lane.rate_limited
    assert lane.price_units(1_000_000) == 500_000
    assert lane.price_units(3) == 2  # half a unit rounds up
    assert batch_lane(Decimal(0)).price_units(1_000_000) == 0
