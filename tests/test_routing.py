"""The router's answers when a model's replicas go away: fakes for the handle and Serve's state."""

from __future__ import annotations

import asyncio

import pytest

from serve_app.errors import GenerationTimeout, ModelUnavailable
from serve_app.routing import ModelRoute, ModelRouter
from serve_app.work import CallShape, GenerationJob


class Counts:
    """Running replicas per deployment, as the test says."""

    def __init__(self, running: int) -> None:
        self.running = running

    async def running_replicas(self) -> dict[str, int]:
        return {"model-m": self.running}


class Response:
    """A DeploymentResponse whose replica never answers (it is on a node that went away)."""

    def __init__(self) -> None:
        self.cancelled = False

    def __await__(self):
        return asyncio.get_running_loop().create_future().__await__()

    def cancel(self) -> None:
        self.cancelled = True


class Handle:
    def __init__(self) -> None:
        self.responses: list[Response] = []
        self.generate = self

    def remote(self, job) -> Response:
        self.responses.append(Response())
        return self.responses[-1]


def route(handle: Handle, timeout_s: float = 30.0, scales_from_zero: bool = False) -> ModelRoute:
    return ModelRoute("m", "model-m", handle, timeout_s, scales_from_zero)


def test_a_waiting_request_ends_in_503_when_the_last_replica_goes():
    async def scenario():
        handle, counts = Handle(), Counts(running=1)
        router = ModelRouter({"m": route(handle)}, counts, watch_every_s=0.05)
        waiting = asyncio.create_task(router.generate("m", [object(), object()]))
        await asyncio.sleep(0.2)
        assert not waiting.done()  # the replica is up: the request waits for it
        counts.running = 0
        with pytest.raises(ModelUnavailable) as raised:
            await asyncio.wait_for(waiting, timeout=2)
        assert raised.value.retry_after_s >= 1
        assert all(response.cancelled for response in handle.responses)

    asyncio.run(scenario())


def test_the_deadline_still_holds_while_replicas_are_up():
    async def scenario():
        handle = Handle()
        router = ModelRouter({"m": route(handle, timeout_s=0.3)}, Counts(running=1), watch_every_s=0.05)
        with pytest.raises(GenerationTimeout):
            await router.generate("m", [object()])

    asyncio.run(scenario())


def test_a_model_that_scales_from_zero_waits_for_its_cold_start():
    async def scenario():
        handle = Handle()
        router = ModelRouter({"m": route(handle, timeout_s=0.3, scales_from_zero=True)}, Counts(0), watch_every_s=0.05)
        with pytest.raises(GenerationTimeout):  # queued until the deadline, not refused
            await router.generate("m", [object()])

    asyncio.run(scenario())


def job() -> GenerationJob:
    shape = CallShape(width=64, height=64, steps=4, guidance=5.0, with_negative_prompt=False)
    return GenerationJob("r", "a cat", None, shape, (1,), partial_images=2)


class StreamingHandle:
    """A streaming handle whose replica yields nothing (it is on a node that went away)."""

    def __init__(self) -> None:
        self.generators: list[Generator] = []
        self.generate_stream = self

    def options(self, stream: bool) -> StreamingHandle:
        assert stream
        return self

    def remote(self, job) -> Generator:
        self.generators.append(Generator())
        return self.generators[-1]


class Generator:
    def __init__(self) -> None:
        self.cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        await asyncio.get_running_loop().create_future()

    def cancel(self) -> None:
        self.cancelled = True


def test_a_waiting_stream_ends_in_503_when_the_last_replica_goes():
    async def scenario():
        handle, counts = StreamingHandle(), Counts(running=1)
        router = ModelRouter({"m": route(handle)}, counts, watch_every_s=0.05)

        async def consume():
            return [item async for item in router.stream("m", [job(), job()])]

        waiting = asyncio.create_task(consume())
        await asyncio.sleep(0.2)
        assert not waiting.done()
        counts.running = 0
        with pytest.raises(ModelUnavailable):
            await asyncio.wait_for(waiting, timeout=2)
        assert len(handle.generators) == 2 and all(generator.cancelled for generator in handle.generators)

    asyncio.run(scenario())


def test_a_stream_keeps_the_deadline():
    async def scenario():
        router = ModelRouter({"m": route(StreamingHandle(), timeout_s=0.3)}, Counts(running=1), watch_every_s=0.05)
        with pytest.raises(GenerationTimeout):
            async for _ in router.stream("m", [job()]):
                pass

    asyncio.run(scenario())
