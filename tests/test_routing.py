"""The router's one generation path, ``ModelRouter.stream``: what it yields, and its answers
when a model's replicas fail or go away. Fakes for the streaming handle and Serve's state."""

from __future__ import annotations

import asyncio
from contextlib import aclosing

import pytest

from serve_app.errors import GenerationTimeout, InvalidRequest, ModelUnavailable, UpstreamError
from serve_app.routing import ModelRoute, ModelRouter
from serve_app.work import CallShape, GeneratedImage, GenerationJob, PreviewImage, StreamedImage


class Counts:
    """Running replicas per deployment, as the test says."""

    def __init__(self, running: int) -> None:
        self.running = running
        self.asked = 0

    async def running_replicas(self) -> dict[str, int]:
        self.asked += 1
        return {"model-m": self.running}


class Generator:
    """A replica's ``generate_stream`` as the streaming handle returns it: yields ``chunks``
    (each a tuple of items, as the replica yields them), then raises ``error`` or, with
    ``hang``, waits forever (its replica is on a node that went away)."""

    def __init__(self, chunks=(), error: BaseException | None = None, hang: bool = False) -> None:
        self.chunks = list(chunks)
        self.error = error
        self.hang = hang
        self.cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        await asyncio.sleep(0)
        if self.chunks:
            return self.chunks.pop(0)
        if self.error is not None:
            raise self.error
        if self.hang:
            await asyncio.get_running_loop().create_future()
        raise StopAsyncIteration

    def cancel(self) -> None:
        self.cancelled = True


class StreamingHandle:
    """``handle.options(stream=True).generate_stream.remote(job)``; ``replies`` makes the
    generator of each call (hanging ones by default)."""

    def __init__(self, replies=None) -> None:
        self.generators: list[Generator] = []
        self.replies = list(replies or [])
        self.generate_stream = self

    def options(self, stream: bool) -> StreamingHandle:
        assert stream
        return self

    def remote(self, job) -> Generator:
        self.generators.append(self.replies.pop(0) if self.replies else Generator(hang=True))
        return self.generators[-1]


def route(handle, timeout_s: float = 30.0, scales_from_zero: bool = False) -> ModelRoute:
    return ModelRoute("m", "model-m", handle, timeout_s, scales_from_zero)


def job(n: int = 1, partial_images: int = 0) -> GenerationJob:
    shape = CallShape(width=64, height=64, steps=4, guidance=5.0, with_negative_prompt=False)
    return GenerationJob("r", "a cat", None, shape, tuple(range(n)), partial_images=partial_images)


def final(index: int, seed: int) -> StreamedImage:
    return StreamedImage(index, GeneratedImage(b"png", seed, "png", 64, 64))


def preview(index: int, partial: int) -> PreviewImage:
    return PreviewImage(index, partial, b"p", partial + 1, 4)


async def drain(router: ModelRouter, jobs) -> list:
    return [item async for item in router.stream("m", jobs)]


def test_a_json_request_drains_the_stream_and_gets_each_final_image_once_indexed_across_jobs():
    async def scenario():
        first = Generator([(final(0, 10),), (final(1, 11), final(2, 12))])
        second = Generator([(final(0, 20), final(1, 21))])
        handle = StreamingHandle([first, second])
        router = ModelRouter({"m": route(handle)}, Counts(running=1), watch_every_s=0.05)
        items = await drain(router, [job(3), job(2)])
        assert not first.cancelled and not second.cancelled  # finished: nothing to cancel
        return items

    items = asyncio.run(scenario())
    assert all(isinstance(item, StreamedImage) for item in items)
    assert sorted((item.image_index, item.image.seed) for item in items) == [
        (0, 10), (1, 11), (2, 12), (3, 20), (4, 21)
    ]


def test_previews_come_before_their_image_and_are_indexed_across_jobs():
    async def scenario():
        handle = StreamingHandle([
            Generator([(preview(0, 0),), (preview(0, 1), final(0, 1))]),
            Generator([(preview(0, 0), final(0, 2))]),
        ])
        router = ModelRouter({"m": route(handle)}, Counts(running=1), watch_every_s=0.05)
        return await drain(router, [job(1, partial_images=2), job(1, partial_images=1)])

    items = asyncio.run(scenario())
    by_image = {index: [type(item).__name__ for item in items if item.image_index == index] for index in (0, 1)}
    assert by_image == {0: ["PreviewImage", "PreviewImage", "StreamedImage"], 1: ["PreviewImage", "StreamedImage"]}


def test_nothing_is_sent_to_a_model_without_a_running_replica():
    async def scenario():
        handle, counts = StreamingHandle(), Counts(running=0)
        router = ModelRouter({"m": route(handle)}, counts, watch_every_s=0.05)
        stream = router.stream("m", [job()])
        assert counts.asked == 0 and not handle.generators  # an async generator: lazy
        with pytest.raises(ModelUnavailable) as raised:
            await drain(router, [job()])
        assert raised.value.retry_after_s >= 1
        assert not handle.generators
        await stream.aclose()

    asyncio.run(scenario())


def test_a_waiting_request_ends_in_503_when_the_last_replica_goes():
    async def scenario():
        handle, counts = StreamingHandle(), Counts(running=1)
        router = ModelRouter({"m": route(handle)}, counts, watch_every_s=0.05)
        waiting = asyncio.create_task(drain(router, [job(), job()]))
        await asyncio.sleep(0.2)
        assert not waiting.done()  # the replica is up: the request waits for it
        counts.running = 0
        with pytest.raises(ModelUnavailable) as raised:
            await asyncio.wait_for(waiting, timeout=2)
        assert raised.value.retry_after_s >= 1
        assert len(handle.generators) == 2 and all(generator.cancelled for generator in handle.generators)

    asyncio.run(scenario())


def test_the_deadline_still_holds_while_replicas_are_up():
    async def scenario():
        handle = StreamingHandle([Generator([(final(0, 0),)], hang=True)])
        router = ModelRouter({"m": route(handle, timeout_s=0.3)}, Counts(running=1), watch_every_s=0.05)
        seen = []
        with pytest.raises(GenerationTimeout):
            async for item in router.stream("m", [job(2)]):
                seen.append(item)
        assert len(seen) == 1  # what came before the deadline was yielded
        assert handle.generators[0].cancelled

    asyncio.run(scenario())


def test_a_model_that_scales_from_zero_waits_for_its_cold_start():
    async def scenario():
        handle = StreamingHandle()
        router = ModelRouter({"m": route(handle, timeout_s=0.3, scales_from_zero=True)}, Counts(0), watch_every_s=0.05)
        with pytest.raises(GenerationTimeout):  # queued until the deadline, not refused
            await drain(router, [job()])
        assert len(handle.generators) == 1

    asyncio.run(scenario())


def test_a_failing_replica_is_a_502_and_the_other_jobs_are_cancelled():
    async def scenario():
        broken = Generator(error=RuntimeError("CUDA error: an illegal memory access at 0x7f3a"))
        handle = StreamingHandle([broken, Generator(hang=True)])
        router = ModelRouter({"m": route(handle)}, Counts(running=1), watch_every_s=0.05)
        with pytest.raises(UpstreamError) as raised:
            await drain(router, [job(), job()])
        assert "0x7f3a" not in raised.value.message
        assert all(generator.cancelled for generator in handle.generators)

    asyncio.run(scenario())


def test_an_api_error_from_the_replica_passes_as_it_is():
    async def scenario():
        handle = StreamingHandle([Generator(error=InvalidRequest("bad size", param="size"))])
        router = ModelRouter({"m": route(handle)}, Counts(running=1), watch_every_s=0.05)
        with pytest.raises(InvalidRequest):
            await drain(router, [job()])

    asyncio.run(scenario())


def test_garbage_from_the_replica_is_a_502():
    async def scenario():
        handle = StreamingHandle([Generator([("not an image",)], hang=True)])
        router = ModelRouter({"m": route(handle)}, Counts(running=1), watch_every_s=0.05)
        with pytest.raises(UpstreamError):
            await drain(router, [job()])
        assert handle.generators[0].cancelled

    asyncio.run(scenario())


def test_a_consumer_that_goes_away_cancels_the_replica_calls():
    async def scenario():
        handle = StreamingHandle([Generator([(final(0, 0),)], hang=True), Generator(hang=True)])
        router = ModelRouter({"m": route(handle)}, Counts(running=1), watch_every_s=0.05)
        # Closed after the first item (a client that left mid-stream).
        async with aclosing(router.stream("m", [job(2), job()])) as stream:
            async for _ in stream:
                break
        assert all(generator.cancelled for generator in handle.generators)

        # Cancelled while it waits for the next item (a JSON request whose client left).
        handle = StreamingHandle([Generator(hang=True)])
        router = ModelRouter({"m": route(handle)}, Counts(running=1), watch_every_s=0.05)
        waiting = asyncio.create_task(drain(router, [job()]))
        await asyncio.sleep(0.1)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert handle.generators[0].cancelled

    asyncio.run(scenario())
