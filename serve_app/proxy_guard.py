"""An ASGI middleware for Serve's HTTP proxy: what reaches Serve is well formed, and what
Serve itself answers is in our error shape.

Serve's proxy reads some request headers before any code of ours runs, and answers some
failures itself:

- it decodes ``x-request-id`` (and its other routing headers) as UTF-8, so one undecodable
  byte answered every route, ``/health`` included, with a plain-text 500;
- when the ingress replica dies mid-request it returns without answering, and the server
  answers ``500 Internal Server Error`` as plain text, with no request id, which no OpenAI
  SDK can read as an error;
- it takes per-request hints from request headers, meant for a trusted load balancer in
  front of it: ``x-request-disconnect-disabled: ?1`` makes it run (and charge) a request
  whose client has gone, and ``x-request-timeout-seconds`` replaces the operator's
  ``request_timeout_s`` (``0`` turns it off; ``0.3`` gets Serve's plain-text 408).

``ProxyGuard`` runs inside the proxy (Serve's ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``
hook, set in the Serve configs' ``controller_options``; in throughput mode Serve applies the
same hook to each ingress replica's own HTTP server). Serve wraps its ASGI app in the hook's
middlewares, outermost last (``ray.serve._private.http_util._apply_middlewares``), so this
one sees the request before Serve's request-id middleware and before the proxy (or the
replica's direct-ingress server) reads any header (``proxy.py`` ``send_request_to_replica``,
``replica.py`` ``_direct_ingress_asgi``, Ray 2.60). It drops the hint headers above, request
header values that are not UTF-8 and an ``x-request-id`` that is not a short plain token
(Serve then makes a fresh one), and turns a plain-text error that Serve produced into the
documented JSON error with the request id. It decides nothing about a request and keeps
nothing between them. (Serve's own request-id middleware runs inside it, so it sees, and
echoes on the response, the ``x-request-id`` this one left.)
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from serve_app.errors import GenerationTimeout, InternalError, UpstreamError
from serve_app.http_errors import SAFE_REQUEST_ID as SAFE_REQUEST_ID_PATTERN
from serve_app.http_errors import error_response

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PROXY_CALLBACK = "serve_app.proxy_guard:proxy_middlewares"
REQUEST_ID_HEADER = b"x-request-id"
# The ingress's rule (serve_app.http_errors), on the raw header bytes.
SAFE_REQUEST_ID = re.compile(SAFE_REQUEST_ID_PATTERN.encode())
# Serve's per-request hints (ray.serve._private.constants SERVE_HTTP_REQUEST_TIMEOUT_S_HEADER,
# SERVE_HTTP_REQUEST_DISCONNECT_DISABLED_HEADER): for a trusted balancer, never a client.
# Serve matches them lower-case, as the ASGI server delivers every header name.
HINT_HEADERS = frozenset({b"x-request-timeout-seconds", b"x-request-disconnect-disabled"})


class ProxyGuard:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        headers = [(name, value) for name, value in scope.get("headers", []) if _acceptable(name, value)]
        if not any(name.lower() == REQUEST_ID_HEADER for name, _ in headers):
            headers.append((REQUEST_ID_HEADER, f"req_{uuid.uuid4().hex}".encode()))
        scope["headers"] = headers
        shaper = _ErrorShaper(scope, send)
        try:
            await self.app(scope, receive, shaper)
        except Exception:
            # Serve's proxy raised before answering: the server would answer a plain-text
            # 500. Answer in our shape instead, then let it log.
            if not shaper.started:
                await shaper.send_json_error(500)
            raise
        if not shaper.started:
            # Serve's proxy returned without answering (the ingress replica died under the
            # request): the server would send a plain-text 500.
            await shaper.send_json_error(502)


def _acceptable(name: bytes, value: bytes) -> bool:
    if name.lower() in HINT_HEADERS:
        return False
    if name.lower() == REQUEST_ID_HEADER:
        return SAFE_REQUEST_ID.fullmatch(value) is not None
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class _ErrorShaper:
    """Passes a response through, except a plain-text 5xx (Serve's own), which it replaces."""

    def __init__(self, scope: Scope, send: Send) -> None:
        self._scope = scope
        self._send = send
        self._held: Message | None = None
        self.started = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            if _is_plain_server_error(message):
                self._held = message  # wait for the body; ours replaces it
                return
        if self._held is not None and message["type"] == "http.response.body":
            if message.get("more_body"):
                return
            await self.send_json_error(self._held["status"], self._held.get("headers", []))
            self._held = None
            return
        await self._send(message)

    async def send_json_error(self, status: int, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.started = True
        request_id = _header(self._scope.get("headers", []), REQUEST_ID_HEADER)
        error: InternalError | UpstreamError | GenerationTimeout
        if status == 408:  # Serve's request_timeout_s: it cancelled the request, which refunds it
            error = GenerationTimeout("The request outran the server's deadline; it was not charged. Retry it.")
        elif status in (502, 503, 504):
            error = UpstreamError("The server could not complete the request; it was not charged. Retry it.")
        else:
            error = InternalError("The server had an error while processing your request.")
        error.status_code = status
        response = error_response(error, request_id or "unknown")
        headers = [(k, v) for k, v in headers or [] if k.lower() not in (b"content-type", b"content-length")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(response.body)).encode())]
        await self._send({"type": "http.response.start", "status": status, "headers": headers})
        await self._send({"type": "http.response.body", "body": response.body})


def _is_plain_server_error(message: Message) -> bool:
    """A plain-text 5xx, or 408 (Serve's answer when ``request_timeout_s`` runs out): ours
    are JSON."""
    status = message.get("status", 200)
    if status < 500 and status != 408:
        return False
    content_type = _header(message.get("headers", []), b"content-type") or ""
    return content_type.startswith("text/plain")


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def proxy_middlewares() -> list[Any]:
    """What ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` names: Serve's proxy calls it at start."""
    from starlette.middleware import Middleware

    return [Middleware(ProxyGuard)]
