"""Rejections repeated at Serve's HTTP proxy, so a client looping on one costs no hop.

Behind Serve's Python proxy every request pays Ray's proxy-to-replica machinery, about 5 ms
of proxy CPU and 4 ms of ingress CPU, whatever the ingress answers. A client hammering with a
bad key, an exhausted balance or past its rate limit would cost that per request and cap
everyone's rejections near 200/s on 2 cores. Yet such an answer stays true for a while: the
ingress itself trusts its key cache and its 402 memo for 1 s, and a rate-limit rejection
holds until its retry time (buckets only refill at their fixed rate).

So the ingress says so. On a request that came through this middleware (``EDGE_HEADER`` on
the request), a rejection that ``hold_for`` allows carries ``HOLD_HEADER``: how many seconds
it holds, and which body fields it depended on besides the method, path and Authorization
header. ``EdgeRejections``, an ASGI middleware that Serve runs inside its HTTP proxy
(``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``, set in serve_config.yaml), strips that
header, and answers the same question with the same rejection until then: a fresh request
id, and ``x-imagegen-edge: hit`` so that an operator can tell. Late in a hold, one request
goes through to renew the answer while the others are still answered here, so an answer
that lapses never sends a burst of identical questions to the ingress at once.

What it never does: decide anything itself, hold an answer longer than ``HOLD_MAX_S``, admit
a request, or keep a key in clear (Authorization values are hashed). A replayed 429's
``Retry-After`` and ``x-ratelimit-*`` headers are the ingress's, up to ``HOLD_MAX_S`` old.
In throughput mode (HAProxy in front, no Serve proxy) Serve applies the same hook to each
ingress replica's own HTTP server, so this runs there, in front of Serve's request handling.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from serve_app.accounts.expiring import put_bounded
from serve_app.errors import (
    InsufficientFunds,
    InvalidAPIKey,
    MissingAPIKey,
    ModelNotPermitted,
    RateLimitExceeded,
)

logger = logging.getLogger("ray.serve")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

EDGE_HEADER = "x-imagegen-edge"  # request: came through EdgeRejections; response: "hit" on a replay
HOLD_HEADER = "x-imagegen-edge-hold"  # response: "<seconds>; fields=<a,b>", proxy-internal
HOLD_MAX_S = 1.0  # the ingress's own key cache and 402 memo: never staler than those
RENEW_AFTER = 0.75  # share of a hold after which one request renews the answer
PROXY_CALLBACK = "serve_app.edge:proxy_middlewares"  # RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH

_EDGE = EDGE_HEADER.encode()
_HOLD = HOLD_HEADER.encode()
_REQUEST_ID = b"x-request-id"
_DROPPED_ON_REPLAY = {_HOLD, _REQUEST_ID, b"content-length", b"date", b"server"}


# -- the ingress's side ------------------------------------------------------------------------
@dataclass(frozen=True)
class Hold:
    seconds: float
    fields: tuple[str, ...] = ()  # body fields the rejection depended on

    def header(self) -> str:
        return f"{self.seconds:.3f}; fields={','.join(self.fields)}"

    @classmethod
    def parse(cls, value: str) -> Hold | None:
        seconds, _, rest = value.partition(";")
        name, _, fields = rest.strip().partition("=")
        try:
            held = min(float(seconds), HOLD_MAX_S)
        except ValueError:
            return None
        if not held > 0 or name != "fields":
            return None
        return cls(held, tuple(field for field in fields.split(",") if field))


def hold_for(error: BaseException) -> Hold | None:
    """How long ``error`` stays the answer to the same question, and what the question is.

    A bad or missing key (401) depends on nothing in the body; a key not allowed a model (403)
    on the model; a balance too small (402) on the model's price times n; a rate limit (429)
    on n (the images bucket). Each holds at most ``HOLD_MAX_S``, a rate limit no longer than
    its own retry time. Anything else (a 400, a 5xx) is never repeated.
    """
    if isinstance(error, MissingAPIKey | InvalidAPIKey):
        return Hold(HOLD_MAX_S)
    if isinstance(error, ModelNotPermitted):
        return Hold(HOLD_MAX_S, ("model",))
    if isinstance(error, InsufficientFunds):
        return Hold(HOLD_MAX_S, ("model", "n"))
    if isinstance(error, RateLimitExceeded) and error.retry_after_s:
        return Hold(min(error.retry_after_s, HOLD_MAX_S), ("n",))
    return None


# -- the proxy's side --------------------------------------------------------------------------
@dataclass(frozen=True)
class _Replay:
    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    error: dict[str, Any]  # the error object; its request_id is replaced on every replay


class EdgeRejections:
    """ASGI middleware for Serve's HTTP proxy (see the module docstring)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = 10_000,
        max_body_bytes: int = 64 * 1024,
        report_every_s: float = 60.0,
    ) -> None:
        self.app = app
        self._clock = clock
        self._max_entries = max_entries
        self._max_body_bytes = max_body_bytes
        self._report_every_s = report_every_s
        # (asker, fields, values) -> (until, renew from, replay); asker = method, path, query,
        # key digest
        self._answers: dict[tuple, tuple[float, float, _Replay]] = {}
        # asker -> (until, {fields: until}): which body fields to read for this asker
        self._field_sets: dict[tuple, tuple[float, dict[tuple[str, ...], float]]] = {}
        self._renewing: set[tuple] = set()  # answers whose renewal is in flight
        self._repeated: Counter[int] = Counter()
        self._reported_at = clock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        authorization = request_id = None
        headers = []
        for name, value in scope["headers"]:
            if name == _EDGE:
                continue  # only this middleware says a request came through it
            if name == b"authorization":
                authorization = value
            elif name == _REQUEST_ID:
                request_id = value
            headers.append((name, value))
        headers.append((_EDGE, b"1"))
        scope = {**scope, "headers": headers}
        asker = (scope["method"], scope["path"], scope.get("query_string", b""), _digest(authorization))
        now = self._clock()

        question, replay = self._lookup((asker, (), ()), now)
        body = _Body(self._max_body_bytes)
        if question is None and self._wants_body(asker, now):
            receive = await body.read_ahead(receive)  # seen now: no tee below
            question, replay = self._lookup_by_fields(asker, body.json(), now)
        else:
            receive = body.tee(receive)
        if replay is not None:
            await self._send_replay(replay, request_id, send)
            return
        try:
            await self.app(scope, receive, self._capturing(send, asker, body, now, question))
        finally:
            self._renewing.discard(question)

    # -- lookups -------------------------------------------------------------------------------
    def _lookup(self, question: tuple, now: float) -> tuple[tuple | None, _Replay | None]:
        """(question, replay): a replay to send; or the question alone when this request is to
        renew its answer (see ``_capturing``); or (None, None) when nothing is known."""
        entry = self._answers.get(question)
        if entry is None:
            return None, None
        until, renew_from, replay = entry
        if now >= until:
            del self._answers[question]
            return None, None
        if now >= renew_from and question not in self._renewing:
            # Late in the hold, one request goes to the ingress while the others are still
            # answered here: the answer is renewed before it lapses, so the proxy never sends
            # a whole burst of identical questions to the ingress at once.
            self._renewing.add(question)
            return question, None
        return question, replay

    def _wants_body(self, asker: tuple, now: float) -> bool:
        entry = self._field_sets.get(asker)
        return entry is not None and entry[0] > now

    def _lookup_by_fields(self, asker: tuple, payload: Any, now: float) -> tuple[tuple | None, _Replay | None]:
        if not isinstance(payload, dict):
            return None, None
        for fields, until in self._field_sets[asker][1].items():
            if until > now:
                question, replay = self._lookup((asker, fields, _values(payload, fields)), now)
                if question is not None:
                    return question, replay
        return None, None

    # -- learning from the ingress's answers ---------------------------------------------------
    def _capturing(self, send: Send, asker: tuple, body: _Body, asked_at: float, renewing: tuple | None) -> Send:
        """``send``, learning from a rejection that says how long it holds. ``renewing``: the
        question whose answer this request renews; an answer that does not hold any more
        (a 200 after a top-up, say) is forgotten at once."""
        captured: dict[str, Any] = {}

        async def send_and_learn(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                hold = _take_hold(message) if message["status"] >= 400 else None
                if hold is not None:
                    captured.update(hold=hold, start=message, chunks=[])
                elif renewing is not None:
                    self._answers.pop(renewing, None)
            elif kind == "http.response.body" and captured:
                captured["chunks"].append(message.get("body", b""))
                if not message.get("more_body", False):
                    learned = self._learn(asker, body, asked_at, captured)
                    if renewing is not None and learned != renewing:
                        self._answers.pop(renewing, None)
                    captured.clear()
            await send(message)

        return send_and_learn

    def _learn(self, asker: tuple, body: _Body, asked_at: float, captured: dict[str, Any]) -> tuple | None:
        """Remember a rejection that holds; return its question (None if it cannot be kept)."""
        hold: Hold = captured["hold"]
        try:
            error = json.loads(b"".join(captured["chunks"]))["error"]
        except (ValueError, KeyError, TypeError):
            return None
        if not isinstance(error, dict):
            return None
        values: tuple = ()
        if hold.fields:
            payload = body.json()
            if not isinstance(payload, dict):
                return None  # the body was not seen whole: the question cannot be told apart
            values = _values(payload, hold.fields)
        start = captured["start"]
        headers = tuple((name, value) for name, value in start["headers"] if name.lower() not in _DROPPED_ON_REPLAY)
        until = asked_at + hold.seconds  # counted from before the ingress was asked
        renew_from = asked_at + hold.seconds * RENEW_AFTER
        question = (asker, hold.fields, values)
        replay = _Replay(start["status"], headers, error)
        put_bounded(self._answers, question, (until, renew_from, replay), asked_at, self._max_entries)
        if hold.fields:
            old_until, field_sets = self._field_sets.get(asker, (0.0, {}))
            field_sets = {**field_sets, hold.fields: max(until, field_sets.get(hold.fields, 0.0))}
            put_bounded(self._field_sets, asker, (max(until, old_until), field_sets), asked_at, self._max_entries)
        return question

    # -- answering -----------------------------------------------------------------------------
    async def _send_replay(self, replay: _Replay, client_request_id: bytes | None, send: Send) -> None:
        # Serve's proxy honours a client's x-request-id or makes one; so does a replay.
        request_id = client_request_id.decode("latin-1") if client_request_id else _new_request_id()
        # Compact, as the ingress's JSONResponse writes it.
        error = {**replay.error, "request_id": request_id}
        body = json.dumps({"error": error}, ensure_ascii=False, separators=(",", ":")).encode()
        headers = [
            *replay.headers,
            (b"content-length", str(len(body)).encode()),
            (_REQUEST_ID, request_id.encode("latin-1")),
            (_EDGE, b"hit"),
        ]
        await send({"type": "http.response.start", "status": replay.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        self._count(replay.status)

    def _count(self, status: int) -> None:
        self._repeated[status] += 1
        now = self._clock()
        if now - self._reported_at >= self._report_every_s:
            counts = ", ".join(f"{status}: {count}" for status, count in sorted(self._repeated.items()))
            logger.info(
                "repeated %d rejection(s) at the proxy in the last %d s (%s)",
                sum(self._repeated.values()),
                math.ceil(now - self._reported_at),
                counts,
            )
            self._repeated.clear()
            self._reported_at = now


class _Body:
    """The request body as the downstream app reads it (or as read ahead), up to a limit."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._chunks: list[bytes] = []
        self._size = 0
        self._complete = False
        self._too_big = False
        self._parsed: Any = None
        self._is_parsed = False

    def _see(self, message: Message) -> None:
        if message["type"] != "http.request" or self._complete:
            return
        chunk = message.get("body", b"")
        self._size += len(chunk)
        if self._size > self._limit:
            self._too_big = True
            self._chunks.clear()
        elif not self._too_big:
            self._chunks.append(chunk)
        self._complete = not message.get("more_body", False)

    def tee(self, receive: Receive) -> Receive:
        async def receive_and_see() -> Message:
            message = await receive()
            self._see(message)
            return message

        return receive_and_see

    async def read_ahead(self, receive: Receive) -> Receive:
        """Read the body up to the limit now; return a receive that hands it on first."""
        ahead: list[Message] = []
        while not self._complete and not self._too_big:
            message = await receive()
            ahead.append(message)
            self._see(message)
            if message["type"] != "http.request":
                break  # the client left

        async def receive_rest() -> Message:
            return ahead.pop(0) if ahead else await receive()

        return receive_rest

    def json(self) -> Any:
        """The body parsed as JSON, or None when it was not seen whole or is not JSON."""
        if not self._is_parsed:
            self._is_parsed = True
            if self._complete and not self._too_big:
                try:
                    self._parsed = json.loads(b"".join(self._chunks))
                except (ValueError, UnicodeDecodeError):
                    self._parsed = None
        return self._parsed


def _take_hold(start: Message) -> Hold | None:
    """Remove ``HOLD_HEADER`` from a response start message; return what it said."""
    hold = None
    kept = []
    for name, value in start["headers"]:
        if name.lower() == _HOLD:
            hold = Hold.parse(value.decode("latin-1"))
        else:
            kept.append((name, value))
    start["headers"] = kept
    return hold


def _values(payload: dict[str, Any], fields: tuple[str, ...]) -> tuple:
    return tuple(json.dumps(payload.get(field), sort_keys=True) for field in fields)


def _digest(authorization: bytes | None) -> bytes | None:
    return None if authorization is None else hashlib.sha256(authorization).digest()


def _new_request_id() -> str:
    # The same shape as Serve's own request ids (random, not secret).
    return str(uuid.UUID(int=random.getrandbits(128), version=4))


def proxy_middlewares() -> list:
    """Serve's ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` hook: the proxy's middlewares."""
    from starlette.middleware import Middleware

    return [Middleware(EdgeRejections)]


__all__ = [
    "EDGE_HEADER",
    "HOLD_HEADER",
    "HOLD_MAX_S",
    "PROXY_CALLBACK",
    "EdgeRejections",
    "Hold",
    "hold_for",
    "proxy_middlewares",
]
