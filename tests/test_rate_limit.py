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


def test_restored_buckets_hold_what_the_last_minute_took(clock):
    book = RateLimitBook(clock=clock)
    # 2 requests of 3 images, 40 s and 10 s ago, on limits of 2 requests and 10 images a minute:
    # requests: 2 -> 1 (40 s ago), + 30 s x 2/60 -> 2 (capped) - 1 = 1 (10 s ago), + 10 s -> 1.33
    book.restore(1, 2, 10, [(40.0, 3), (10.0, 3), (75.0, 5)])  # 75 s ago: outside the window
    decision = book.check(1, 2, 10, images=1)
    assert decision.allowed and decision.remaining_requests == 0
    # images: 10 -> 7, refilled to 10 (capped) -> 7, + 10 s x 10/60 -> 8.67, - 1 -> 7.67
    assert decision.remaining_images == 7
    assert not book.check(1, 2, 10, images=1).allowed
    # nothing in the window: a full bucket, as for a key never seen
    book.restore(2, 3, 10, [])
    assert book.check(2, 3, 10, images=10).allowed
    assert 1 in book and 3 not in book


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


def test_rate_limits_survive_the_actor_being_killed(ray_session, tmp_path):
    """Ray restarts the killed actor; the keys' buckets come back from the ledger."""
    import ray

    from serve_app.accounts import issue_key, open_store
    from serve_app.accounts.limiter_actor import NAMESPACE, RayRateLimiter, kill_rate_limiter_actor

    name = "imagegen_rate_limiter_restart_test"
    url = f"sqlite:///{tmp_path / 'accounts.db'}"
    store = open_store(url)
    key = issue_key(store, "alice", credits_units=100).record
    other = issue_key(store, "bob", credits_units=100).record

    async def admitted(limiter, key_id: int) -> bool:
        decision = await limiter.check(key_id, rpm=3, ipm=100, images=1)
        if decision.allowed:  # as the ingress does next
            store.settle(store.reserve(key_id, "r", "m1", 1, 1).id, 1)
        return decision.allowed

    async def main():
        limiter = RayRateLimiter(name, detached=False, database_url=url)
        assert [await admitted(limiter, key.id) for _ in range(4)] == [True, True, True, False]
        actor = ray.get_actor(name, namespace=NAMESPACE)
        pid = await actor.__ray_call__.remote(lambda self: __import__("os").getpid())
        ray.kill(actor, no_restart=False)  # a crash: Ray restarts it, memory lost
        # ray.kill is asynchronous: wait until a call lands in the restarted process.
        new_pid, deadline = pid, time.monotonic() + 60
        while new_pid == pid:
            assert time.monotonic() < deadline, "the actor was not restarted"
            try:
                new_pid = await actor.__ray_call__.remote(lambda self: __import__("os").getpid())
            except ray.exceptions.RayActorError:
                pass
            if new_pid == pid:
                await asyncio.sleep(0.1)
        after = await limiter.check(key.id, rpm=3, ipm=100, images=1)
        assert not after.allowed and not after.degraded and after.retry_after_s > 0
        assert await admitted(limiter, other.id)  # a key without history starts full

    try:
        asyncio.run(main())
    finally:
        kill_rate_limiter_actor(name)
        store.close()
