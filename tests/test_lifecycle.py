"""The request lifecycle under cancellation injected at every await of its money path.

Each case runs one request (with an Idempotency-Key) as the ingress does, stops it at one
await (the rate limit, the reservation's transaction, decoding, generation, the send of the
answer, the settlement's transaction), cancels the task there as Serve does when the client
goes away, lets the stopped operation finish, then checks what a client and the ledger see:

- nothing stays reserved, and the ledger is sound;
- the key paid exactly for the images whose send returned;
- a retry with the same Idempotency-Key replays a charged outcome (no second charge) when
  images were handed over, and otherwise runs anew and is charged once.

No timed sleeps decide anything: gates hold each await until the test has cancelled it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

import pytest

from serve_app.accounts import Accounts, LocalRateLimiter, open_store
from serve_app.charge import hand_over
from serve_app.image_input import Decoder
from serve_app.serving import ImageGenerationService
from tests.fakes import FakeRouter, FakeStore, serve
from tests.test_serving import CONFIG, balance, make_key

PRICE = 1.5  # CONFIG's price per image
N = 3


class Gate:
    """Where the request stops: ``reached`` once it is there, ``opened`` lets it go on."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self.opened = threading.Event()  # also waited on by database threads
        self.passed = threading.Event()  # the held operation finished
        self._loop = asyncio.get_running_loop()

    def reach(self) -> None:  # from any thread
        self._loop.call_soon_threadsafe(self.reached.set)

    async def hold(self) -> None:
        self.reach()
        while not self.opened.is_set():
            await asyncio.sleep(0.001)

    def hold_thread(self) -> None:
        self.reach()
        self.opened.wait(10)


class GatedRouter(FakeRouter):
    """Stops before the image of index ``at`` is yielded."""

    def __init__(self, gate: Gate | None, at: int) -> None:
        super().__init__()
        self.gate, self.at = gate, at

    async def stream(self, model_id, jobs):
        index = 0
        async for item in super().stream(model_id, jobs):
            if self.gate is not None and index == self.at:
                await self.gate.hold()
            index += 1
            yield item


class GatedDecoder(Decoder):
    def __init__(self, gate: Gate | None) -> None:
        super().__init__(1)
        self.gate = gate

    async def run(self, fn, /, *args, **kwargs):
        if self.gate is not None:
            await self.gate.hold()
        return await super().run(fn, *args, **kwargs)


def _gate_store_method(store, name: str, gate: Gate) -> None:
    """The store's blocking method waits in its database thread: the transaction lands
    after the request was cancelled, as a slow commit does."""
    real = getattr(store, name)

    def gated(*args, **kwargs):
        gate.hold_thread()
        try:
            return real(*args, **kwargs)
        finally:
            gate.passed.set()

    setattr(store, name, gated)


def _gate_rate_limit(accounts: Accounts, gate: Gate) -> None:
    real = accounts.rate_limiter.check

    async def gated(*args, **kwargs):
        await gate.hold()
        return await real(*args, **kwargs)

    accounts.rate_limiter.check = gated


POINTS = [
    "admit",
    "reserve",
    "decode",
    "before-first-image",
    "between-images",
    "send-of-the-answer",
    "settle",
]


@pytest.fixture
def accounts(tmp_path):
    store = open_store(f"sqlite:///{tmp_path}/ledger.db")
    accounts = Accounts(store, default_rpm=1000, default_ipm=1000, rate_limiter=LocalRateLimiter())
    yield accounts
    accounts.close()


async def _settled(accounts: Accounts, secret: str) -> None:
    """Until background refunds of the cancelled attempt have landed (bounded)."""
    key = await accounts.authenticate(f"Bearer {secret}")
    for _ in range(2000):
        if (await accounts.usage(key)).reserved_units == 0:
            return
        await asyncio.sleep(0.005)
    raise AssertionError("a reservation stayed open")


@pytest.mark.parametrize("point", POINTS)
def test_cancelled_at_any_await_pays_exactly_for_what_was_handed_over(accounts, point):
    secret = make_key(accounts, 10)
    with_image = point == "decode"  # decoding happens for an input image only

    async def main():
        gate = Gate()
        in_generation = point in ("before-first-image", "between-images")
        router = GatedRouter(gate if in_generation else None, at=0 if point == "before-first-image" else 1)
        decoder = GatedDecoder(gate if point == "decode" else None)
        if point == "admit":
            _gate_rate_limit(accounts, gate)
        if point in ("reserve", "settle"):
            _gate_store_method(accounts.store, point, gate)
        store = FakeStore()
        svc = ImageGenerationService(CONFIG, router, accounts, store=store, decoder=decoder)
        sent: list[bytes] = []
        send_gate = gate if point == "send-of-the-answer" else None
        task = asyncio.create_task(_attempt(svc, secret, sent, send_gate, with_image))
        await gate.reached.wait()
        task.cancel()  # the client went away, here
        await asyncio.sleep(0)
        gate.opened.set()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if point in ("reserve", "settle"):  # its transaction lands after the cancellation
            await asyncio.to_thread(gate.passed.wait, 10)
        await _settled(accounts, secret)
        # A JSON answer is one chunk: the client got its images when that send returned.
        delivered = N if sent else 0
        assert delivered == (N if point == "settle" else 0)
        assert await balance(accounts, secret) == 10 - PRICE * delivered

        # The retry the README advises: the same key, the same request.
        retry_sent: list[bytes] = []
        retry = await _attempt(
            ImageGenerationService(CONFIG, FakeRouter(), accounts, store=store), secret, retry_sent, None, with_image
        )
        if delivered:
            assert retry.headers.get("idempotent-replayed") == "true" and retry_sent == sent
        else:
            assert "idempotent-replayed" not in retry.headers
        assert await balance(accounts, secret) == 10 - PRICE * N  # charged once, never twice
        assert accounts.store.inconsistencies() == []

    asyncio.run(main())


def _png_data_uri() -> str:
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 10)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


async def _attempt(svc, secret, sent, send_gate, with_image):
    fields = {"model": "m", "prompt": "apple", "n": N, "seed": 3}
    if with_image:
        fields.update(image=_png_data_uri(), strength=1.0)
    served = await serve(svc, secret, fields, idempotency_key="order-7")

    async def send(data: bytes) -> None:
        if send_gate is not None:
            await send_gate.hold()
        sent.append(data)

    await hand_over(served, send)
    return served


# -- Replays: admitted, permission-checked, and served from stored images ----------------------


def _issue(accounts, name, **options):
    from serve_app.accounts import issue_key
    from serve_app.config import CREDIT_UNITS

    return issue_key(accounts.store, name, credits_units=10 * CREDIT_UNITS, **options).secret


def test_a_replay_counts_against_the_request_limit(tmp_path):
    from serve_app.errors import RateLimitExceeded

    accounts = Accounts(open_store(f"sqlite:///{tmp_path}/l.db"), rate_limiter=LocalRateLimiter())
    secret = _issue(accounts, "one-a-minute", rpm=1)
    svc = ImageGenerationService(CONFIG, FakeRouter(), accounts, store=FakeStore())

    async def main():
        body = {"model": "m", "prompt": "apple"}
        await _answered(await serve(svc, secret, body, idempotency_key="k"))
        with pytest.raises(RateLimitExceeded):
            await serve(svc, secret, body, idempotency_key="k")

    asyncio.run(main())
    accounts.close()


def test_a_replay_rechecks_the_keys_current_safety_permission(accounts):
    from serve_app.errors import PermissionDenied

    secret = _issue(accounts, "trusted", may_disable_safety_checker=True)
    svc = ImageGenerationService(CONFIG, FakeRouter(), accounts, store=FakeStore())
    body = {"model": "m", "prompt": "apple", "disable_safety_checker": True}

    async def main():
        await _answered(await serve(svc, secret, body, idempotency_key="k"))
        accounts.store.set_safety_permission("trusted", False)
        await asyncio.sleep(accounts._ttl)  # the key cache's TTL: the revocation is seen
        with pytest.raises(PermissionDenied):
            await serve(svc, secret, body, idempotency_key="k")

    asyncio.run(main())


@pytest.mark.parametrize("response_format", ["b64_json", "url"])
def test_an_outcome_refers_to_stored_images_and_a_replay_loads_or_signs_them(accounts, response_format):
    import sqlalchemy as sa

    from serve_app.accounts.schema import idempotency

    secret = _issue(accounts, "k")
    store = FakeStore()
    svc = ImageGenerationService(CONFIG, FakeRouter(), accounts, store=store)
    body = {"model": "m", "prompt": "apple", "n": 2, "seed": 40, "response_format": response_format}

    async def main():
        first = await _answered(await serve(svc, secret, body, idempotency_key="k"))
        replay = await _answered(await serve(svc, secret, body, idempotency_key="k"))
        return first, replay

    first, replay = asyncio.run(main())
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.body.model_dump() == first.body.model_dump()
    with accounts.store.engine.connect() as conn:
        outcome = conn.execute(sa.select(idempotency.c.outcome)).scalar_one()
    assert b"img40" not in outcome and b"aW1nNDA" not in outcome  # neither the bytes nor their base64
    assert len(store.stored) == 2  # the images, once

    if response_format == "url":
        return  # a URL is signed without reading the image (a gone one answers 404 at its URL)
    del store.stored[next(iter(store.stored))]  # retention removed an image: no broken replay
    from serve_app.errors import IdempotencyConflict

    with pytest.raises(IdempotencyConflict) as caught:
        asyncio.run(serve(svc, secret, body, idempotency_key="k"))
    assert caught.value.code == "idempotency_key_expired"


async def _answered(served):
    from tests.fakes import answer

    await answer(served)
    return served


# -- The ingress's response: what goes on the wire, and what it charges -----------------------


@pytest.mark.parametrize("send_fails", [False, True])
def test_a_json_answer_is_one_body_message_and_is_charged_only_once_sent(accounts, send_fails):
    from starlette.requests import ClientDisconnect

    from serve_app.ingress import ChargedResponse

    secret = make_key(accounts, 10)
    svc = ImageGenerationService(CONFIG, FakeRouter(), accounts)
    messages = []

    async def send(message):
        if send_fails and message["type"] == "http.response.body":
            raise OSError("the client is gone")
        messages.append(message)

    async def receive():
        return {"type": "http.disconnect"}

    async def main():
        served = await serve(svc, secret, {"model": "m", "prompt": "apple", "n": 2})
        with contextlib.suppress(ClientDisconnect):
            await ChargedResponse(served)({"type": "http", "asgi": {"spec_version": "2.0"}}, receive, send)
        return await balance(accounts, secret)

    paid = asyncio.run(main())
    if send_fails:
        assert paid == 10  # refunded: the body never left
    else:
        assert [m["type"] for m in messages] == ["http.response.start", "http.response.body"]
        assert messages[1]["more_body"] is False
        assert paid == 10 - 2 * PRICE
    assert accounts.store.inconsistencies() == []
