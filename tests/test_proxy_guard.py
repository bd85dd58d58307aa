"""serve_app.proxy_guard in front of a fake app, over ASGI (what Serve's proxy runs it on)."""

from __future__ import annotations

import asyncio
import json

from serve_app.proxy_guard import ProxyGuard


def run(app, headers):
    seen = {}
    sent = []

    async def inner(scope, receive, send):
        seen["headers"] = list(scope["headers"])
        await app(scope, receive, send)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/health", "headers": headers}
    asyncio.run(ProxyGuard(inner)(scope, receive, send))
    return seen["headers"], sent


def answer(status, content_type, body):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", content_type)]})
        await send({"type": "http.response.body", "body": body})

    return app


def test_undecodable_values_and_unsafe_request_ids_never_reach_serve():
    headers, _ = run(
        answer(200, b"application/json", b"{}"),
        [
            (b"x-request-id", b"\xff\xfebad"),
            (b"x-other", b"caf\xe9"),
            (b"accept", b"*/*"),
        ],
    )
    names = dict(headers)
    assert b"x-other" not in names and names[b"accept"] == b"*/*"
    assert names[b"x-request-id"].startswith(b"req_") and len(names[b"x-request-id"]) == 36
    kept, _ = run(answer(200, b"application/json", b"{}"), [(b"x-request-id", b"trace-42")])
    assert dict(kept)[b"x-request-id"] == b"trace-42"
    long, _ = run(answer(200, b"application/json", b"{}"), [(b"x-request-id", b"a" * 8192)])
    assert dict(long)[b"x-request-id"].startswith(b"req_")


def test_serves_plain_text_errors_become_the_documented_json_error():
    _, sent = run(answer(500, b"text/plain; charset=utf-8", b"Internal Server Error"), [(b"x-request-id", b"r-1")])
    start, body = sent
    assert start["status"] == 500 and (b"content-type", b"application/json") in start["headers"]
    error = json.loads(body["body"])["error"]
    assert (error["code"], error["type"], error["request_id"]) == ("internal_error", "server_error", "r-1")
    _, sent = run(answer(503, b"text/plain", b"no replica"), [(b"x-request-id", b"r-2")])
    assert json.loads(sent[1]["body"])["error"]["code"] == "upstream_error"


def test_other_responses_pass_through_untouched():
    ours = json.dumps({"error": {"code": "internal_error"}}).encode()
    for status, content_type, body in [
        (200, b"image/png", b"\x89PNG"),
        (500, b"application/json", ours),
        (404, b"text/plain", b"nope"),
    ]:
        _, sent = run(answer(status, content_type, body), [])
        assert sent[0]["status"] == status and sent[1]["body"] == body


def test_a_proxy_that_raises_before_answering_gets_our_json_500():
    async def dies(scope, receive, send):
        raise RuntimeError("the replica died")

    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b""}

    scope = {"type": "http", "headers": [(b"x-request-id", b"r-3")]}
    try:
        asyncio.run(ProxyGuard(dies)(scope, receive, send))
    except RuntimeError:
        pass
    assert sent[0]["status"] == 500
    assert json.loads(sent[1]["body"])["error"]["request_id"] == "r-3"


def test_a_proxy_that_returns_without_answering_gets_our_json_502():
    async def silent(scope, receive, send):
        return None

    _, sent = run(silent, [(b"x-request-id", b"r-4")])
    assert sent[0]["status"] == 502
    error = json.loads(sent[1]["body"])["error"]
    assert (error["code"], error["request_id"]) == ("upstream_error", "r-4")


HINTS = [
    (b"x-request-disconnect-disabled", b"?1"),
    (b"X-Request-Timeout-Seconds", b"0"),
    (b"x-request-timeout-seconds", b"0.3"),
]


def test_serves_per_request_hints_never_come_from_a_client():
    # Serve's proxy (and a direct-ingress replica) would otherwise run a request whose client
    # left, and bill it, or replace the operator's request_timeout_s (0: none at all).
    from ray.serve._private.http_util import parse_disconnect_disabled_header, parse_request_timeout_header

    headers, _ = run(answer(200, b"application/json", b"{}"), [*HINTS, (b"accept", b"*/*")])
    names = [name.lower() for name, _ in headers]
    assert b"x-request-disconnect-disabled" not in names and b"x-request-timeout-seconds" not in names
    assert (b"accept", b"*/*") in headers
    # What Serve itself makes of what is left: the operator's timeout, disconnects watched.
    assert parse_request_timeout_header(dict(headers), 30.0) == 30.0
    assert parse_disconnect_disabled_header(dict(headers)) is False


def test_serve_applies_the_guard_before_its_proxy_reads_any_header():
    # The wrapping Serve does with the callback's middlewares (Ray 2.60's own function): the
    # proxy app, innermost, sees the request only after ProxyGuard has cleaned it.
    from ray.serve._private.http_util import _apply_middlewares

    from serve_app.proxy_guard import proxy_middlewares

    seen = {}

    async def proxy(scope, receive, send):
        seen["headers"] = list(scope["headers"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        pass

    app = _apply_middlewares(proxy, proxy_middlewares())
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/images/generations",
        "headers": [*HINTS, (b"x-request-id", b"\xff")],
    }
    asyncio.run(app(scope, receive, send))
    names = [name.lower() for name, _ in seen["headers"]]
    assert b"x-request-disconnect-disabled" not in names and b"x-request-timeout-seconds" not in names
    (request_id,) = [value for name, value in seen["headers"] if name == b"x-request-id"]
    assert request_id.startswith(b"req_")


def test_serves_plain_text_408_becomes_the_documented_json_error():
    # Serve answers a request that outran the operator's request_timeout_s itself, in plain text.
    _, sent = run(
        answer(408, b"text/plain; charset=utf-8", b"Request r-5 timed out after 0.3s."), [(b"x-request-id", b"r-5")]
    )
    start, body = sent
    assert start["status"] == 408 and (b"content-type", b"application/json") in start["headers"]
    error = json.loads(body["body"])["error"]
    assert (error["code"], error["type"], error["request_id"]) == ("timeout", "server_error", "r-5")
    assert "not charged" in error["message"]
