"""Token buckets with a fake clock, the decisions and headers, and the shared Ray actor."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from serve_app.accounts.rate_limit import (
    LocalRateLimiter,
    RateLimitBook,
    RateLimitDecision,
    TokenBucket,
    format_duration,
    rate_limit_headers,
    retry_after_header,
)
from serve_app.errors import RateLimitExceeded


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock():
    return FakeClock()


def test_bucket_starts_full_and_refills_continuously(clock):
    bucket = TokenBucket(60, clock=clock)  # one token per second
    assert bucket.remaining() == 60
    assert all(bucket.take() for _ in range(60))
    assert not bucket.take()
    assert bucket.wait_s(1) == pytest.approx(1.0)
    assert bucket.wait_s(3) == pytest.approx(3.0)
    clock.advance(0.5)
    assert not bucket.take()
    clock.advance(0.5)
    assert bucket.take()
    clock.advance(1000)
    assert bucket.remaining() == 60  # never above capacity
    assert bucket.reset_s() == 0.0


def test_bucket_take_is_all_or_nothing(clock):
    bucket = TokenBucket(10, clock=clock)
    assert bucket.take(8)
    assert not bucket.take(3)
    assert bucket.remaining() == 2
    assert math.isinf(bucket.wait_s(11))
    assert bucket.reset_s() == pytest.approx(8 * 6.0)


def test_clock_stepping_back_mints_nothing(clock):
    bucket = TokenBucket(2, clock=clock)
    bucket.take(2)
    clock.advance(-50)
    assert bucket.remaining() == 0
    clock.advance(50 + 30)
    assert bucket.remaining() == 1


def test_resize_keeps_tokens_within_the_new_capacity(clock):
    bucket = TokenBucket(10, clock=clock)
    bucket.take(2)
    bucket.resize(5)
    assert bucket.remaining() == 5
    bucket.resize(50)
    assert bucket.remaining() == 5
    assert bucket.rate == pytest.approx(50 / 60)


def test_book_admits_consuming_both_and_rejects_consuming_nothing(clock):
    book = RateLimitBook(clock=clock)
    first = book.check(1, rpm=3, ipm=4, images=3)
    assert first.allowed and first.retry_after_s == 0
    assert (first.remaining_requests, first.remaining_images) == (2, 1)
    rejected = book.check(1, rpm=3, ipm=4, images=2)  # requests left, images not
    assert not rejected.allowed
    assert rejected.retry_after_s == pytest.approx(15.0)  # 1 image token per 15 s
    assert (rejected.remaining_requests, rejected.remaining_images) == (2, 1)
    assert book.check(1, rpm=3, ipm=4, images=1).allowed
    assert book.check(1, rpm=3, ipm=4, images=0 + 1).allowed is False  # images exhausted
    assert book.check(2, rpm=3, ipm=4, images=1).allowed  # keys are independent
    clock.advance(15)
    assert book.check(1, rpm=3, ipm=4, images=1).allowed


def test_book_request_limit_and_retry_after(clock):
    book = RateLimitBook(clock=clock)
    for _ in range(2):
        assert book.check(7, rpm=2, ipm=100).allowed
    rejected = book.check(7, rpm=2, ipm=100)
    assert not rejected.allowed and rejected.retry_after_s == pytest.approx(30.0)
    assert rejected.reset_requests_s == pytest.approx(60.0)
    clock.advance(29.9)
    assert not book.check(7, rpm=2, ipm=100).allowed
    clock.advance(0.1)
    assert book.check(7, rpm=2, ipm=100).allowed


def test_more_images_than_the_limit_never_fit(clock):
    decision = RateLimitBook(clock=clock).check(1, rpm=10, ipm=4, images=5)
    assert not decision.allowed and decision.retry_after_s == 60.0
    with pytest.raises(RateLimitExceeded, match="exceed this key's limit of 4 images"):
        decision.raise_if_rejected()


def test_changed_limits_apply_to_existing_buckets(clock):
    book = RateLimitBook(clock=clock)
    book.check(1, rpm=10, ipm=10)
    decision = book.check(1, rpm=2, ipm=10)
    assert decision.allowed and decision.limit_requests == 2 and decision.remaining_requests == 1
    assert book.check(1, rpm=2, ipm=10).allowed
    assert not book.check(1, rpm=2, ipm=10).allowed


def test_sweep_drops_only_full_buckets(clock):
    book = RateLimitBook(clock=clock)
    book.check(1, rpm=60, ipm=60)
    book.check(2, rpm=60, ipm=60)
    clock.advance(1.0)
    book.check(2, rpm=60, ipm=60)
    assert book.sweep() == 1 and len(book) == 1


def test_headers_and_the_exception(clock):
    book = RateLimitBook(clock=clock)
    ok = book.check(1, rpm=60, ipm=120, images=4)
    assert rate_limit_headers(ok) == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-limit-images": "120",
        "x-ratelimit-remaining-images": "116",
        "x-ratelimit-reset-images": "2s",
    }
    ok.raise_if_rejected()  # admitted: no exception
    for _ in range(59):
        book.check(1, rpm=60, ipm=120, images=1)
    rejected = book.check(1, rpm=60, ipm=120, images=1)
    with pytest.raises(RateLimitExceeded) as info:
        rejected.raise_if_rejected()
    error = info.value
    assert error.status_code == 429 and error.code == "rate_limit_exceeded"
    assert error.retry_after_s == pytest.approx(1.0)
    assert error.headers["x-ratelimit-remaining-requests"] == "0"
    assert "requests per minute (limit 60)" in error.message
    assert retry_after_header(error.retry_after_s) == "1"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.0004, "1ms"),
        (0.02, "20ms"),
        (1, "1s"),
        (1.5, "1.5s"),
        (59.9991, "60s"),
        (60, "1m0s"),
        (361.2, "6m2s"),
    ],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_retry_after_is_whole_seconds_at_least_one():
    assert [retry_after_header(s) for s in (0.01, 1.0, 1.2, 30)] == ["1", "1", "2", "30"]


def test_local_limiter_and_decision_round_trip(clock):
    limiter = LocalRateLimiter(clock=clock)
    decision = asyncio.run(limiter.check(1, 1, 1, 1))
    assert decision.allowed
    assert RateLimitDecision(**decision.as_dict()) == decision
    assert not asyncio.run(limiter.check(1, 1, 1, 1)).allowed


# -- the shared actor: one small test ------------------------------------------------------
async def wait_until_gone(name: str, timeout_s: float = 30.0) -> None:
    import ray

    from serve_app.accounts.limiter_actor import NAMESPACE

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"actor {name} is still alive")


class CountingLimiter:
    """A LocalRateLimiter that counts the questions it is asked."""

    def __init__(self, clock) -> None:
        self.local = LocalRateLimiter(clock=clock)
        self.asked = 0

    async def check(self, key_id, rpm, ipm, images=1):
        self.asked += 1
        return await self.local.check(key_id, rpm, ipm, images)


def test_ray_actor_is_shared_between_clients(ray_session):
    from serve_app.accounts.limiter_actor import RayRateLimiter, kill_rate_limiter_actor

    name = "imagegen_rate_limiter_test"

    async def main():
        # two replicas' clients attach to the same named actor
        a, b = RayRateLimiter(name, detached=False), RayRateLimiter(name, detached=False)
        assert (await a.check(1, rpm=2, ipm=10, images=1)).allowed
        assert (await b.check(1, rpm=2, ipm=10, images=1)).allowed
        third = await a.check(1, rpm=2, ipm=10, images=1)
        assert not third.allowed and not third.degraded and third.retry_after_s > 0
        # concurrent checks are coalesced into batches and still counted one by one
        decisions = await asyncio.gather(*(c.check(2, rpm=5, ipm=100, images=1) for c in (a, b) * 10))
        assert sum(d.allowed for d in decisions) == 5
        # the actor dies: the client attaches to a fresh one (state lost, requests go on)
        kill_rate_limiter_actor(name)
        await wait_until_gone(name)  # ray.kill is asynchronous
        again = await b.check(1, rpm=2, ipm=10, images=1)
        assert again.allowed and not again.degraded

    try:
        asyncio.run(main())
    finally:
        kill_rate_limiter_actor(name)
