"""Streaming logic without Ray: the service's event stream against a fake streaming router
(billing per ``completed`` event handed over, refunds, the error event), the wire shape
against openai-python's own event types, and the preview schedule and relay."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json

import numpy as np
import pytest
from openai.types import ImageEditStreamEvent, ImageGenStreamEvent
from PIL import Image
from pydantic import TypeAdapter
from starlette.requests import ClientDisconnect

from deployments.grouping import group_jobs
from deployments.previews import CallPreviews, PreviewRelay, preview_steps
from serve_app.accounts import Accounts, LocalRateLimiter, open_store
from serve_app.errors import InvalidRequest, UpstreamError
from serve_app.serving import EditUpload, ImageGenerationService
from serve_app.work import CallShape, GeneratedImage, GenerationJob, PreviewImage, StreamedImage
from serve_app.charge import hand_over
from tests.fakes import FakeRouter, answer, serve
from tests.test_serving import CONFIG, balance, make_key


@pytest.fixture
def accounts(tmp_path):
    store = open_store(f"sqlite:///{tmp_path}/ledger.db")
    accounts = Accounts(store, default_rpm=1000, default_ipm=1000, rate_limiter=LocalRateLimiter())
    yield accounts
    accounts.close()


FakeStreamingRouter = FakeRouter


def parse(raw: bytes) -> tuple[str, dict]:
    lines = raw.decode().strip().split("\n")
    assert lines[0].startswith("event: ") and lines[1].startswith("data: ") and len(lines) == 2
    return lines[0][len("event: ") :], json.loads(lines[1][len("data: ") :])


async def stream(svc, key, endpoint="generate", close_after=None, **fields):
    """Serve a stream as the ingress does; the client goes away after ``close_after`` events
    (the next send fails, as uvicorn's does once the socket is closed)."""
    body = {"model": "m", "prompt": "apple", "stream": True, **fields}
    served = await serve(svc, key, body, request_id="req_s", base_url=None)
    events = []

    async def send(raw: bytes) -> None:
        if close_after is not None and len(events) == close_after:
            raise OSError("the client is gone")
        events.append(parse(raw))

    with contextlib.suppress(OSError):
        await hand_over(served, send)
    return served, events


def test_events_are_openais_and_every_completed_image_is_charged(accounts):
    key = make_key(accounts, 10)
    svc = ImageGenerationService(CONFIG, FakeStreamingRouter(), accounts)
    served, events = asyncio.run(stream(svc, key, n=3, seed=5, partial_images=2))
    assert served.headers["x-credits-reserved"] == "4.5"
    adapter = TypeAdapter(ImageGenStreamEvent)
    for name, data in events:
        event = adapter.validate_python(data)  # openai-python's own types, strictly
        assert name == event.type
    kinds = [(data["type"].split(".")[1], data["image_index"]) for _, data in events]
    assert kinds == [("partial_image", 0), ("partial_image", 0), ("completed", 0), ("partial_image", 1),
                     ("partial_image", 1), ("completed", 1), ("partial_image", 2), ("partial_image", 2),
                     ("completed", 2)]  # fmt: skip
    completed = [data for _, data in events if data["type"] == "image_generation.completed"]
    assert [c["seed"] for c in completed] == [5, 6, 7]
    assert [c["credits_charged"] for c in completed] == ["1.5", "3", "4.5"]
    assert completed[-1]["credits_remaining"] == "5.5"
    assert asyncio.run(balance(accounts, key)) == 5.5


def test_edit_events_validate_as_openais_edit_events(accounts):

    key = make_key(accounts, 10)
    svc = ImageGenerationService(CONFIG, FakeStreamingRouter(), accounts)
    png = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(png, format="PNG")
    upload = EditUpload(
        fields={"model": "m", "prompt": "p", "stream": "true", "partial_images": "1"}, images=[png.getvalue()]
    )

    async def run():
        served = await serve(svc, key, upload, endpoint="edit", request_id="req_e", base_url=None)
        return [parse(raw) for raw in await answer(served)]

    events = asyncio.run(run())
    adapter = TypeAdapter(ImageEditStreamEvent)
    assert [adapter.validate_python(data).type for _, data in events] == [
        "image_edit.partial_image",
        "image_edit.completed",
    ]


def test_a_client_that_leaves_pays_only_for_completed_events_handed_over(accounts):
    key = make_key(accounts, 10)
    svc = ImageGenerationService(CONFIG, FakeStreamingRouter(), accounts)
    # n=3, one preview each: events are p0 c0 p1 c1 ...; leave after c0 and p1.
    _, events = asyncio.run(stream(svc, key, n=3, seed=1, partial_images=1, close_after=3))
    assert [data["type"] for _, data in events][-1] == "image_generation.partial_image"
    assert asyncio.run(balance(accounts, key)) == 10 - 1.5


def test_a_failure_after_the_first_byte_is_an_error_event_and_refunds_the_rest(accounts):
    key = make_key(accounts, 10)
    svc = ImageGenerationService(CONFIG, FakeStreamingRouter(fail_after=3), accounts)
    _, events = asyncio.run(stream(svc, key, n=2, seed=1, partial_images=1))
    assert [name for name, _ in events] == [
        "image_generation.partial_image",
        "image_generation.completed",
        "image_generation.partial_image",
        "error",
    ]
    error = events[-1][1]
    assert error["type"] == "error"
    assert error["error"] == {
        "message": "The model 'm' failed to generate the image.",
        "type": "server_error",
        "code": "upstream_error",
        "param": None,
        "request_id": "req_s",
    }
    assert asyncio.run(balance(accounts, key)) == 10 - 1.5


def test_a_stream_cannot_carry_an_idempotency_key(accounts):
    key = make_key(accounts, 10)
    svc = ImageGenerationService(CONFIG, FakeStreamingRouter(), accounts)
    body = {"model": "m", "prompt": "apple", "stream": True}
    with pytest.raises(InvalidRequest) as caught:
        asyncio.run(serve(svc, key, body, request_id="r", base_url=None, idempotency_key="k1"))
    assert caught.value.param == "Idempotency-Key"
    assert asyncio.run(balance(accounts, key)) == 10


@pytest.mark.parametrize(
    "total, partial, expected",
    [(8, 3, (1, 3, 5)), (12, 3, (2, 5, 8)), (4, 3, (0, 1, 2)), (2, 3, (0, 1)), (1, 2, (0,)), (8, 0, ()), (8, 1, (3,))],
)
def test_preview_steps_are_evenly_spaced(total, partial, expected):
    assert preview_steps(total, partial) == expected


class FakeRGB:
    def to_pixels(self, latents):
        return np.asarray(latents)[:, 0:1].repeat(3, axis=1).transpose(0, 2, 3, 1).astype(np.uint8)


class FakeFamily:
    def preview_latents(self, pipe, latents, height, width):
        return latents


class FakePipe:
    num_timesteps = 4


def test_the_relay_previews_only_the_rows_that_asked_at_their_steps():
    shape = CallShape(width=64, height=64, steps=4, guidance=5.0, with_negative_prompt=False)
    quiet = GenerationJob("r1", "a", None, shape, (1, 2))
    watched = GenerationJob("r2", "b", None, shape, (7, 8), partial_images=1)
    unregistered = GenerationJob("r3", "c", None, shape, (9,), partial_images=2)
    relay = PreviewRelay(FakeRGB(), FakeFamily())
    got = []
    relay.register(quiet, lambda *args: got.append(("quiet", *args)))
    relay.register(watched, lambda *args: got.append(("watched", *args)))
    jobs = [quiet, watched, unregistered]
    call = group_jobs(jobs)[0]
    assert relay.for_call([quiet], group_jobs([quiet])[0]) is None  # nothing to preview: no callback
    callback = relay.for_call(jobs, call)
    assert isinstance(callback, CallPreviews)
    latents = np.arange(5, dtype=np.float32).reshape(5, 1, 1, 1) * np.ones((5, 4, 2, 2), np.float32)
    for step in range(4):
        assert callback(FakePipe(), step, None, {"latents": latents}) == {}
    # watched's images are rows 2 and 3; one preview each, after step index 1 (step 2 of 4).
    assert [
        (who, index, partial, int(pixels[0, 0, 0]), step, total) for who, index, partial, pixels, step, total in got
    ] == [
        ("watched", 0, 0, 2, 2, 4),
        ("watched", 1, 0, 3, 2, 4),
    ]
    relay.unregister(watched)
    assert relay.for_call(jobs, call) is None


def test_a_flagged_image_gets_no_completed_event_and_no_charge(accounts):
    key = make_key(accounts, 10)
    svc = ImageGenerationService(CONFIG, FakeStreamingRouter(flag_seeds={6}), accounts)
    _, events = asyncio.run(stream(svc, key, n=3, seed=5))
    assert [data["seed"] for _, data in events] == [5, 7]
    assert asyncio.run(balance(accounts, key)) == 10 - 3

    svc = ImageGenerationService(CONFIG, FakeStreamingRouter(flag_seeds={1}), accounts)
    _, events = asyncio.run(stream(svc, key, n=1, seed=1))
    assert [name for name, _ in events] == ["error"] and events[0][1]["error"]["code"] == "content_policy_violation"
    assert asyncio.run(balance(accounts, key)) == 10 - 3


async def _never_sent(message):
    raise OSError("the client is gone")  # uvicorn's send, once the socket is closed


async def _stuck_send(message):
    await asyncio.sleep(3600)  # a client that reads nothing


async def _disconnected():
    return {"type": "http.disconnect"}


@pytest.mark.parametrize(
    "spec_version, send",
    [("2.4", _never_sent), ("2.0", _stuck_send)],
    ids=["send-fails-at-response-start", "disconnect-cancels-before-the-first-event"],
)
def test_a_stream_that_never_started_refunds_everything(accounts, spec_version, send):
    """The client leaves before the first event: the events generator never runs; the
    response settles as it ends, refunding all of it."""
    from serve_app.ingress import ChargedResponse

    key = make_key(accounts, 10)
    svc = ImageGenerationService(CONFIG, FakeStreamingRouter(), accounts)

    async def run():
        body = {"model": "m", "prompt": "apple", "stream": True, "n": 2}
        served = await serve(svc, key, body, request_id="req_gone", base_url=None)
        assert await balance(accounts, key) == 10 - 3  # held
        response = ChargedResponse(served)
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": spec_version}}
        with contextlib.suppress(ClientDisconnect):  # the server's to log
            await asyncio.wait_for(response(scope, _disconnected, send), timeout=5)
        api_key = await accounts.authenticate(f"Bearer {key}")
        return await balance(accounts, key), (await accounts.usage(api_key)).reserved_units

    assert asyncio.run(run()) == (10, 0)


def test_a_stream_settles_once_when_it_and_its_response_end(accounts):
    from serve_app.ingress import ChargedResponse

    key = make_key(accounts, 10)
    svc = ImageGenerationService(CONFIG, FakeStreamingRouter(), accounts)
    sent = []

    async def send(message):
        sent.append(message)

    async def run():
        body = {"model": "m", "prompt": "apple", "stream": True, "n": 2, "seed": 1}
        served = await serve(svc, key, body, request_id="req_both", base_url=None)
        response = ChargedResponse(served)
        await response({"type": "http", "asgi": {"spec_version": "2.4"}}, _disconnected, send)
        return await balance(accounts, key)

    assert asyncio.run(run()) == 10 - 3
    assert sum(b"image_generation.completed" in m.get("body", b"") for m in sent) == 2
