"""Per-key token buckets for requests/min and images/min, and the decisions they give.

Pure logic with an injected clock: ``TokenBucket`` and ``RateLimitBook`` never sleep, never
read the wall clock themselves and never do I/O, so tests drive them with a fake clock.
``LocalRateLimiter`` runs a book in this process (tests, single-process tools); the shared
one for all ingress replicas lives in a Ray actor (``serve_app.accounts.limiter_actor``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Protocol, runtime_checkable

from serve_app.errors import RateLimitExceeded

Clock = Callable[[], float]
WINDOW_S = 60.0  # limits are per minute


class TokenBucket:
    """``capacity`` tokens, refilled continuously at ``capacity / window_s`` per second."""

    __slots__ = ("_clock", "capacity", "tokens", "updated", "window_s")

    def __init__(self, capacity: int, *, window_s: float = WINDOW_S, clock: Clock = time.monotonic) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = float(capacity)
        self.window_s = window_s
        self._clock = clock
        self.tokens = float(capacity)
        self.updated = clock()

    @property
    def rate(self) -> float:
        return self.capacity / self.window_s

    def _refill(self) -> None:
        now = self._clock()
        if now > self.updated:  # a clock that steps back never mints tokens
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
            self.updated = now

    def resize(self, capacity: int) -> None:
        """A key's limit changed: keep the tokens it has, within the new capacity."""
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self._refill()
        self.capacity = float(capacity)
        self.tokens = min(self.tokens, self.capacity)

    def wait_s(self, amount: float = 1) -> float:
        """Seconds until ``amount`` tokens are available; ``inf`` if it exceeds capacity."""
        self._refill()
        if amount > self.capacity:
            return math.inf
        return max(0.0, (amount - self.tokens) / self.rate)

    def take(self, amount: float = 1) -> bool:
        """Take ``amount`` tokens if all are there; otherwise take nothing."""
        if self.wait_s(amount) > 0:
            return False
        self.tokens -= amount
        return True

    def remaining(self) -> int:
        self._refill()
        return int(self.tokens + 1e-9)

    def reset_s(self) -> float:
        """Seconds until the bucket is full again."""
        self._refill()
        return max(0.0, (self.capacity - self.tokens) / self.rate)

    def is_full(self) -> bool:
        return self.reset_s() == 0.0


@dataclass(frozen=True)
class RateLimitDecision:
    allowed: bool
    retry_after_s: float  # 0 when allowed
    limit_requests: int
    remaining_requests: int
    reset_requests_s: float
    limit_images: int
    remaining_images: int
    reset_images_s: float
    images: int = 1  # what was asked for
    degraded: bool = False  # the shared limiter was unreachable and the request was let through

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def unlimited(cls, rpm: int, ipm: int, images: int) -> RateLimitDecision:
        """Fail-open decision, used when the shared limiter cannot be reached."""
        return cls(True, 0.0, rpm, rpm, 0.0, ipm, ipm, 0.0, images, degraded=True)

    def headers(self) -> dict[str, str]:
        return rate_limit_headers(self)

    def raise_if_rejected(self) -> None:
        if self.allowed:
            return
        if self.images > self.limit_images:
            message = (
                f"Request too large: {self.images} images exceed this key's limit of "
                f"{self.limit_images} images per minute. Ask for fewer images per request."
            )
        else:
            which = []
            if self.remaining_requests < 1:
                which.append(f"requests per minute (limit {self.limit_requests})")
            if self.remaining_images < self.images:
                which.append(f"images per minute (limit {self.limit_images}, requested {self.images})")
            message = (
                f"Rate limit reached for {' and '.join(which) or 'this key'}. "
                f"Please try again in {format_duration(self.retry_after_s)}."
            )
        raise RateLimitExceeded(message, retry_after_s=self.retry_after_s, headers=self.headers())


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: ``"20ms"``, ``"1.5s"``, ``"6m0s"``."""
    if not seconds or seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    if seconds < 60:
        return f"{math.ceil(seconds * 1000) / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s"


def retry_after_header(seconds: float) -> str:
    """``Retry-After`` is whole seconds; never 0 for a rejection."""
    return str(max(1, math.ceil(seconds)))


def rate_limit_headers(decision: RateLimitDecision) -> dict[str, str]:
    """The OpenAI-style ``x-ratelimit-*`` headers, for every response (admitted or not).

    ``Retry-After`` is not included: the error mapper sets it from ``retry_after_s`` (use
    ``retry_after_header``).
    """
    return {
        "x-ratelimit-limit-requests": str(decision.limit_requests),
        "x-ratelimit-remaining-requests": str(decision.remaining_requests),
        "x-ratelimit-reset-requests": format_duration(decision.reset_requests_s),
        "x-ratelimit-limit-images": str(decision.limit_images),
        "x-ratelimit-remaining-images": str(decision.remaining_images),
        "x-ratelimit-reset-images": format_duration(decision.reset_images_s),
    }


class _KeyBuckets:
    __slots__ = ("images", "requests")

    def __init__(self, rpm: int, ipm: int, clock: Clock) -> None:
        self.requests = TokenBucket(rpm, clock=clock)
        self.images = TokenBucket(ipm, clock=clock)


class RateLimitBook:
    """The buckets of every key. Not thread-safe: one owner (an event loop or an actor)."""

    def __init__(self, *, clock: Clock = time.monotonic, sweep_every: int = 1024) -> None:
        self._clock = clock
        self._keys: dict[int, _KeyBuckets] = {}
        self._sweep_every = sweep_every
        self._checks = 0

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key_id: int) -> bool:
        return key_id in self._keys

    def restore(self, key_id: int, rpm: int, ipm: int, admissions: list[tuple[float, int]]) -> None:
        """Rebuild a key's buckets from what it was admitted for in the last window:
        ``(seconds ago, images)`` pairs. A bucket is full one window after its last take
        whatever it held before, so replaying that window from full gives at most the
        tokens the lost book had: a restart never grants a key a fresh allowance."""
        buckets = self._keys[key_id] = _KeyBuckets(rpm, ipm, self._clock)
        now = self._clock()
        recent = sorted(((-ago, images) for ago, images in admissions if 0 <= ago <= WINDOW_S))
        for bucket, cost in ((buckets.requests, lambda images: 1), (buckets.images, lambda images: images)):
            tokens, at = bucket.capacity, -bucket.window_s
            for when, images in recent:
                tokens = max(0.0, min(bucket.capacity, tokens + (when - at) * bucket.rate) - cost(images))
                at = when
            bucket.tokens, bucket.updated = tokens, now + at

    def check(self, key_id: int, rpm: int, ipm: int, images: int = 1) -> RateLimitDecision:
        """Admit (taking 1 request and ``images`` image tokens) or reject (taking nothing)."""
        if images < 1:
            raise ValueError("images must be at least 1")
        self._checks += 1
        if self._checks % self._sweep_every == 0:
            self.sweep()
        buckets = self._keys.get(key_id)
        if buckets is None:
            buckets = self._keys[key_id] = _KeyBuckets(rpm, ipm, self._clock)
        else:
            if buckets.requests.capacity != rpm:
                buckets.requests.resize(rpm)
            if buckets.images.capacity != ipm:
                buckets.images.resize(ipm)
        wait = max(buckets.requests.wait_s(1), buckets.images.wait_s(images))
        allowed = wait == 0.0
        if allowed:
            buckets.requests.take(1)
            buckets.images.take(images)
        elif math.isinf(wait):
            wait = WINDOW_S  # can never fit: a whole window is the honest "later"
        return RateLimitDecision(
            allowed=allowed,
            retry_after_s=0.0 if allowed else wait,
            limit_requests=rpm,
            remaining_requests=buckets.requests.remaining(),
            reset_requests_s=buckets.requests.reset_s(),
            limit_images=ipm,
            remaining_images=buckets.images.remaining(),
            reset_images_s=buckets.images.reset_s(),
            images=images,
        )

    def forget(self, key_id: int) -> None:
        self._keys.pop(key_id, None)

    def sweep(self) -> int:
        """Drop full buckets: a fresh bucket is identical. Returns how many were dropped."""
        idle = [k for k, b in self._keys.items() if b.requests.is_full() and b.images.is_full()]
        for key_id in idle:
            del self._keys[key_id]
        return len(idle)


@runtime_checkable
class RateLimiter(Protocol):
    async def check(self, key_id: int, rpm: int, ipm: int, images: int = 1) -> RateLimitDecision: ...


class LocalRateLimiter:
    """A book in this process: correct for one process only (tests, one replica)."""

    def __init__(self, *, clock: Clock = time.monotonic) -> None:
        self.book = RateLimitBook(clock=clock)

    async def check(self, key_id: int, rpm: int, ipm: int, images: int = 1) -> RateLimitDecision:
        return self.book.check(key_id, rpm, ipm, images)


__all__ = [
    "LocalRateLimiter",
    "RateLimitBook",
    "RateLimitDecision",
    "RateLimiter",
    "TokenBucket",
    "format_duration",
    "rate_limit_headers",
    "retry_after_header",
]
