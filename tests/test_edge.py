"""The proxy middleware that repeats the ingress's recent rejections (serve_app.edge), driven
over ASGI the way Serve's proxy calls it, in front of a fake ingress that counts its calls."""

from __future__ import annotations

import asyncio
import functools
import json

import httpx
import pytest

from serve_app.edge import EDGE_HEADER, HOLD_HEADER, HOLD_MAX_S, EdgeRejections, Hold, hold_for
from serve_app.errors import (
    InsufficientFunds,
    InvalidAPIKey,
    InvalidRequest,
    MissingAPIKey,
    ModelNotPermitted,
    RateLimitExceeded,
    UpstreamError,
)
from serve_app.http_errors import error_response


def run_async(test):
    """Run an async test on its own event loop (the suite needs no asyncio plugin)."""

    @functools.wraps(test)
    def run(*args, **kwargs):
        return asyncio.run(test(*args, **kwargs))

    return run


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeIngress:
    """Answers from a table: Authorization value -> exception (or 200), as the real ingress
    would through ``error_response``; records what it was sent."""

    def __init__(self, errors: dict[str | None, Exception]) -> None:
        self.errors = errors
        self.calls: list[dict] = []
        self.gate: asyncio.Event | None = None  # when set: answer only once it opens

    async def __call__(self, scope, receive, send) -> None:
        headers = {name.decode(): value.decode() for name, value in scope["headers"]}
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.calls.append({"headers": headers, "raw_headers": list(scope["headers"]), "body": body})
        if self.gate is not None:
            await self.gate.wait()
        error = self.errors.get(headers.get("authorization"))
        request_id = headers.get("x-request-id", f"req-{len(self.calls)}")
        if error is None:
            response = httpx.Response(200, json={"created": 1, "data": []})
            raw_headers = [(b"content-type", b"application/json")]
            status, content = 200, response.content
        else:
            rendered = error_response(error, request_id, behind_edge=EDGE_HEADER in headers)
            raw_headers = [(k, v) for k, v in rendered.raw_headers if k != b"content-length"]
            status, content = rendered.status_code, rendered.body
        # Serve's proxy adds the request id on the way out, as here.
        raw_headers.append((b"x-request-id", request_id.encode()))
        raw_headers.append((b"content-length", str(len(content)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": content})


def client_for(edge: EdgeRejections) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=edge), base_url="http://edge")


def generation(prompt: str = "a cat", *, model: str = "tiny-sdxl", n: int = 1) -> dict:
    return {"model": model, "prompt": prompt, "n": n}


BAD = "Bearer qbt_" + "b" * 43
BROKE = "Bearer qbt_" + "c" * 43
GOOD = "Bearer qbt_" + "g" * 43


@pytest.fixture
def setup():
    clock = FakeClock()
    ingress = FakeIngress(
        {
            BAD: InvalidAPIKey("Incorrect API key provided."),
            BROKE: InsufficientFunds("Insufficient credits."),
        }
    )
    return clock, ingress, EdgeRejections(ingress, clock=clock)


async def post(client: httpx.AsyncClient, auth: str | None, body: dict, **headers: str) -> httpx.Response:
    if auth is not None:
        headers["authorization"] = auth
    return await client.post("/v1/images/generations", json=body, headers=headers)


@run_async
async def test_a_bad_key_is_answered_at_the_proxy_until_its_hold_ends(setup):
    clock, ingress, edge = setup
    async with client_for(edge) as client:
        first = await post(client, BAD, generation("one"))
        assert first.status_code == 401 and len(ingress.calls) == 1
        assert HOLD_HEADER not in first.headers  # proxy-internal: never reaches the client
        assert first.headers.get(EDGE_HEADER) is None

        clock.now += HOLD_MAX_S / 2
        again = await post(client, BAD, generation("another prompt, same key"))
        assert len(ingress.calls) == 1  # not forwarded
        assert again.status_code == 401 and again.headers[EDGE_HEADER] == "hit"
        error = again.json()["error"]
        assert error["code"] == "invalid_api_key" and error["type"] == "authentication_error"
        # A fresh request id, the same in body and header, and the body's length is right.
        assert error["request_id"] == again.headers["x-request-id"] != first.json()["error"]["request_id"]
        assert int(again.headers["content-length"]) == len(again.content)
        # Byte for byte what the ingress wrote, but for the request id.
        first_id = first.json()["error"]["request_id"]
        assert again.content == first.content.replace(first_id.encode(), error["request_id"].encode())
        # The client's own request id is honoured, as Serve's proxy does.
        mine = await post(client, BAD, generation(), **{"x-request-id": "client-chosen"})
        assert mine.json()["error"]["request_id"] == mine.headers["x-request-id"] == "client-chosen"

        clock.now += HOLD_MAX_S / 2 + 0.01  # past the hold: the ingress is asked again
        assert (await post(client, BAD, generation())).status_code == 401
        assert len(ingress.calls) == 2


@run_async
async def test_an_answer_is_renewed_late_in_its_hold_by_one_request(setup):
    clock, ingress, edge = setup
    async with client_for(edge) as client:
        await post(client, BAD, generation())
        clock.now += HOLD_MAX_S * 0.8  # late in the hold: this one renews the answer
        renewal = await post(client, BAD, generation())
        assert len(ingress.calls) == 2 and EDGE_HEADER not in renewal.headers
        clock.now += HOLD_MAX_S * 0.5  # past the first answer's end, within the renewed one's
        assert (await post(client, BAD, generation())).headers[EDGE_HEADER] == "hit"
        assert len(ingress.calls) == 2

        # While a renewal is in flight, the same question is still answered here.
        clock.now += HOLD_MAX_S * 0.3
        ingress.gate = asyncio.Event()
        renewing = asyncio.create_task(post(client, BAD, generation()))
        while len(ingress.calls) < 3:
            await asyncio.sleep(0.001)
        meanwhile = await asyncio.gather(*(post(client, BAD, generation()) for _ in range(5)))
        assert [response.headers.get(EDGE_HEADER) for response in meanwhile] == ["hit"] * 5
        ingress.gate.set()
        assert (await renewing).status_code == 401 and len(ingress.calls) == 3
        ingress.gate = None

        # A renewal that finds the answer changed (the key is good now) forgets it at once.
        clock.now += HOLD_MAX_S * 0.8
        del ingress.errors[BAD]
        assert (await post(client, BAD, generation())).status_code == 200
        assert (await post(client, BAD, generation())).status_code == 200
        assert len(ingress.calls) == 5


@run_async
async def test_other_keys_paths_and_admitted_requests_are_untouched(setup):
    clock, ingress, edge = setup
    async with client_for(edge) as client:
        await post(client, BAD, generation())
        assert (await post(client, GOOD, generation())).status_code == 200
        assert (await post(client, None, generation())).status_code == 200  # no key: not the bad key's answer
        assert (await client.get("/v1/models", headers={"authorization": BAD})).status_code == 401  # other path
        assert (await post(client, GOOD, generation())).status_code == 200  # a 200 is never repeated
        assert len(ingress.calls) == 5
        # Every forwarded request is marked as coming through the proxy middleware, and the
        # body reaches the ingress intact.
        assert all(call["headers"][EDGE_HEADER] == "1" for call in ingress.calls)
        assert json.loads(ingress.calls[1]["body"]) == generation()


@run_async
async def test_a_client_cannot_claim_to_be_the_proxy(setup):
    clock, ingress, edge = setup
    async with client_for(edge) as client:
        await post(client, GOOD, generation(), **{EDGE_HEADER: "forged"})
    assert [value for name, value in ingress.calls[0]["raw_headers"] if name == EDGE_HEADER.encode()] == [b"1"]


@run_async
async def test_a_402_is_repeated_only_for_the_same_model_and_n(setup):
    clock, ingress, edge = setup
    async with client_for(edge) as client:
        assert (await post(client, BROKE, generation("first", n=2))).status_code == 402
        repeated = await post(client, BROKE, generation("a different prompt", n=2))
        assert repeated.status_code == 402 and repeated.headers[EDGE_HEADER] == "hit"
        assert len(ingress.calls) == 1
        # A different n or model is a different question: the ingress answers it, and gets
        # the whole body.
        await post(client, BROKE, generation(n=1))
        await post(client, BROKE, generation(model="tiny-qwen-image", n=2))
        assert len(ingress.calls) == 3
        assert json.loads(ingress.calls[2]["body"]) == generation(model="tiny-qwen-image", n=2)
        # Not JSON: cannot be told apart, so it is forwarded whole.
        response = await client.post("/v1/images/generations", content=b"{not json", headers={"authorization": BROKE})
        assert response.status_code == 402 and EDGE_HEADER not in response.headers
        assert ingress.calls[3]["body"] == b"{not json"


@run_async
async def test_a_429_holds_no_longer_than_its_retry_time():
    clock = FakeClock()
    limited = RateLimitExceeded("Rate limit reached.", retry_after_s=0.25, headers={"x-ratelimit-limit-requests": "1"})
    ingress = FakeIngress({GOOD: limited})
    edge = EdgeRejections(ingress, clock=clock)
    async with client_for(edge) as client:
        first = await post(client, GOOD, generation())
        assert first.status_code == 429 and first.headers["retry-after"] == "1"
        clock.now += 0.1
        repeated = await post(client, GOOD, generation("again"))
        assert repeated.headers[EDGE_HEADER] == "hit"
        assert repeated.headers["retry-after"] == "1" and repeated.headers["x-ratelimit-limit-requests"] == "1"
        clock.now += 0.16  # 0.26 s after the first was asked: the bucket may have a token now
        await post(client, GOOD, generation("and again"))
        assert len(ingress.calls) == 2


@run_async
async def test_a_body_sent_in_chunks_reaches_the_ingress_whole_when_read_ahead(setup):
    clock, ingress, edge = setup
    async with client_for(edge) as client:
        await post(client, BROKE, generation(n=3))  # now the proxy reads this key's bodies first
    body = json.dumps(generation("chunked", n=4)).encode()
    chunks = [body[:10], body[10:25], body[25:]]
    messages = [{"type": "http.request", "body": c, "more_body": i < 2} for i, c in enumerate(chunks)]
    sent: list[dict] = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/images/generations",
        "query_string": b"",
        "headers": [(b"authorization", BROKE.encode()), (b"content-type", b"application/json")],
    }
    await edge(scope, receive, send)
    assert ingress.calls[-1]["body"] == body
    assert sent[0]["status"] == 402


@run_async
async def test_a_client_disconnect_still_reaches_the_ingress_after_a_read_ahead(setup):
    """The ingress refunds a request whose client left: it must see ``http.disconnect``."""
    clock, ingress, edge = setup
    async with client_for(edge) as client:
        await post(client, BROKE, generation(n=3))  # this key's bodies are now read first
    body = json.dumps(generation(n=1)).encode()
    messages = [{"type": "http.request", "body": body, "more_body": False}, {"type": "http.disconnect"}]
    seen: list[dict] = []

    async def receive():
        return messages.pop(0)

    async def ingress_that_waits_for_its_client(scope, receive, send):
        seen.append(await receive())
        seen.append(await receive())  # what Serve's ingress watches while it generates

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/images/generations",
        "query_string": b"",
        "headers": [(b"authorization", BROKE.encode())],
    }
    edge.app = ingress_that_waits_for_its_client
    await edge(scope, receive, lambda message: None)
    assert seen == [{"type": "http.request", "body": body, "more_body": False}, {"type": "http.disconnect"}]


def test_which_rejections_hold_and_for_what():
    assert hold_for(MissingAPIKey("x")) == Hold(HOLD_MAX_S)
    assert hold_for(InvalidAPIKey("x")) == Hold(HOLD_MAX_S)
    assert hold_for(ModelNotPermitted("x")) == Hold(HOLD_MAX_S, ("model",))
    assert hold_for(InsufficientFunds("x")) == Hold(HOLD_MAX_S, ("model", "n"))
    assert hold_for(RateLimitExceeded("x", retry_after_s=0.3)) == Hold(0.3, ("n",))
    assert hold_for(RateLimitExceeded("x", retry_after_s=42)) == Hold(HOLD_MAX_S, ("n",))
    for never in (InvalidRequest("x", param="n"), UpstreamError("x"), RuntimeError("a bug")):
        assert hold_for(never) is None
    # The wire form round-trips, and a hold is never read longer than HOLD_MAX_S.
    assert Hold.parse(Hold(0.5, ("model", "n")).header()) == Hold(0.5, ("model", "n"))
    assert Hold.parse("30; fields=") == Hold(HOLD_MAX_S)
    assert Hold.parse("nonsense") is None and Hold.parse("0; fields=") is None


def test_the_hold_header_is_only_sent_through_the_proxy_middleware():
    assert HOLD_HEADER not in error_response(InvalidAPIKey("x"), "r1").headers
    assert error_response(InvalidAPIKey("x"), "r1", behind_edge=True).headers[HOLD_HEADER] == "1.000; fields="
    assert HOLD_HEADER not in error_response(InvalidRequest("x"), "r1", behind_edge=True).headers
    assert HOLD_HEADER not in error_response(RuntimeError("a bug"), "r1", behind_edge=True).headers
