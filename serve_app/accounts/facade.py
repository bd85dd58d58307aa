"""``Accounts``: the async face of keys, credits and rate limits, for the ingress.

Per request, in this order::

    key = await accounts.authenticate(request.headers.get("authorization"))  # 401
    accounts.check_model(key, model_id)                                        # 403
    limits = await accounts.check_rate_limit(key, images=n)                    # 429
    #   (or: headers = await accounts.admit(key, n), the x-ratelimit-* headers only)
    reservation = await accounts.reserve(key, request_id, model_id, n, price)  # 402
    ... generate, deliver ...
    settlement = await accounts.settle(reservation, delivered)

(``serve_app.charge.Charge`` owns the last two steps for a request.)

Blocking database work runs on a small private thread pool, never on the event loop.
``settle`` is shielded from cancellation (a client disconnect cannot stop a refund), and a
``reserve`` cancelled while its transaction commits is refunded as soon as it lands.

One cache, of key records, for ``key_cache_ttl_s`` (1 s): a client hammering with a bad key
costs no database read, and a revocation takes effect within it (``reserve`` checks
revocation in its own transaction anyway). Floods of rejections beyond what that absorbs
belong to the gateway in front (README, "Operating").
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from serve_app.accounts.errors import IdempotencyKeyInUse, IdempotencyKeyReused, InsufficientCredits, KeyRevoked
from serve_app.accounts.keys import bearer_token, hash_key, looks_like_key
from serve_app.accounts.rate_limit import LocalRateLimiter, RateLimitDecision, RateLimiter
from serve_app.accounts.records import ApiKey, IdempotencyClaim, Replay, Reservation, Settlement, Usage
from serve_app.accounts.store import AccountStore, open_store
from serve_app.errors import IdempotencyConflict, InsufficientFunds, InvalidAPIKey, MissingAPIKey, ModelNotPermitted
from serve_app.periodic import run_periodically

T = TypeVar("T")
logger = logging.getLogger(__name__)

MISSING_KEY_MESSAGE = (
    "You didn't provide an API key. Send it in the Authorization header: 'Authorization: Bearer qbt_...'."
)
INVALID_KEY_MESSAGE = "Incorrect API key provided."
REVOKED_KEY_MESSAGE = "The API key provided has been revoked."
# A duplicate of a request still running is told to come back (the SDKs retry a 409 after
# Retry-After) rather than held open polling the database.
IDEMPOTENCY_RETRY_AFTER_S = 5


class Accounts:
    def __init__(
        self,
        store: AccountStore,
        *,
        default_rpm: int = 60,
        default_ipm: int = 120,
        rate_limiter: RateLimiter | None = None,
        key_cache_ttl_s: float = 1.0,
        max_workers: int = 4,
        clock: Callable[[], float] = time.monotonic,
        owner: str | None = None,
    ) -> None:
        """``rate_limiter`` None: a per-process ``LocalRateLimiter`` (right for one process
        only; in Serve pass ``RayRateLimiter()``, or use ``from_config``)."""
        self.store = store
        self.default_rpm = default_rpm
        self.default_ipm = default_ipm
        self.rate_limiter: RateLimiter = rate_limiter or LocalRateLimiter()
        self._ttl = key_cache_ttl_s
        self._clock = clock
        self._cache: dict[str, tuple[float, ApiKey | None]] = {}
        self._cache_max = 10_000
        # This ingress replica: its reservations are refunded by the others if it dies.
        self.owner = owner
        self._stale_sweeper: asyncio.Task[None] | None = None
        self._orphan_sweeper: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="accounts-db")

    @classmethod
    def from_config(cls, config: Any, *, rate_limiter: RateLimiter | None = None, **kwargs: Any) -> Accounts:
        """From an ``AccountsConfig``. Without ``rate_limiter``: the shared Ray actor when
        running inside Ray (every Serve replica), a local one otherwise."""
        if rate_limiter is None:
            rate_limiter = _default_rate_limiter(config.resolved_database_url())
        return cls(
            open_store(config.resolved_database_url()),
            default_rpm=config.default_requests_per_minute,
            default_ipm=config.default_images_per_minute,
            rate_limiter=rate_limiter,
            **kwargs,
        )

    def __repr__(self) -> str:
        return f"Accounts({self.store!r})"

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    # -- 401 -------------------------------------------------------------------------
    async def authenticate(self, authorization: str | None) -> ApiKey:
        """The key of an ``Authorization: Bearer qbt_...`` header value.

        Raises MissingAPIKey (no bearer token) or InvalidAPIKey (unknown or revoked). The
        lookup is cached for ``key_cache_ttl_s`` (1 s): a revocation takes effect within
        that, and ``reserve`` checks revocation in its own transaction anyway. Unknown keys
        are cached too, so a client retrying a wrong key costs no database round trip; a
        new key is random, so nobody can have tried it before it was created.
        """
        token = bearer_token(authorization)
        if token is None:
            raise MissingAPIKey(MISSING_KEY_MESSAGE)
        if not looks_like_key(token):
            raise InvalidAPIKey(INVALID_KEY_MESSAGE)
        digest = hash_key(token)
        now = self._clock()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            key = cached[1]
        else:
            key = await self._run(self.store.key_by_hash, digest)
            self._remember(digest, key, now)
        if key is None or key.revoked:
            raise InvalidAPIKey(INVALID_KEY_MESSAGE)
        return key

    def _remember(self, digest: str, key: ApiKey | None, now: float) -> None:
        """Cache a lookup. A full cache first drops its expired entries, then everything if
        that was not enough: a client spraying random keys costs lookups, never memory."""
        if len(self._cache) >= self._cache_max:
            for stale in [d for d, (expires, _) in self._cache.items() if expires <= now]:
                del self._cache[stale]
            if len(self._cache) >= self._cache_max:
                self._cache.clear()
        self._cache[digest] = (now + self._ttl, key)

    # -- 403 -------------------------------------------------------------------------
    @staticmethod
    def check_model(key: ApiKey, model_id: str) -> None:
        if not key.may_use(model_id):
            raise ModelNotPermitted(f"This API key is not allowed to use the model '{model_id}'.", param="model")

    # -- 429 -------------------------------------------------------------------------
    def limits_for(self, key: ApiKey) -> tuple[int, int]:
        """(requests per minute, images per minute) for this key."""
        return key.rpm or self.default_rpm, key.ipm or self.default_ipm

    async def check_rate_limit(self, key: ApiKey, images: int = 1) -> RateLimitDecision:
        """Admit the request (consuming 1 request and ``images`` image tokens) and return
        the decision for the ``x-ratelimit-*`` headers, or raise RateLimitExceeded (with
        ``retry_after_s`` and those headers) having consumed nothing."""
        rpm, ipm = self.limits_for(key)
        decision = await self.rate_limiter.check(key.id, rpm, ipm, images)
        decision.raise_if_rejected()
        return decision

    async def admit(self, key: ApiKey, images: int = 1) -> dict[str, str]:
        """``check_rate_limit`` returning just the ``x-ratelimit-*`` headers."""
        return (await self.check_rate_limit(key, images)).headers()

    # -- 402 and billing -------------------------------------------------------------
    async def reserve(
        self,
        key: ApiKey,
        request_id: str,
        model_id: str,
        images: int,
        price_units: int,
        claim: IdempotencyClaim | None = None,
    ) -> Reservation | Replay:
        """Hold ``images x price_units`` or raise InsufficientFunds (InvalidAPIKey if the key
        was revoked since it authenticated): the store's domain errors, as the client sees
        them. Nothing is held when it raises. With ``claim``: the Idempotency-Key is claimed
        with the hold, a ``Replay`` of its charged first outcome comes back instead, or an
        IdempotencyConflict (reused for another request / first attempt still running).

        Shielded: a caller cancelled while the transaction commits (the client left) gets
        its hold refunded, and its claim released with it, as soon as it lands."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(
            self._executor,
            functools.partial(self.store.reserve, key.id, request_id, model_id, images, price_units, self.owner, claim),
        )
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(self._refund_orphan)
            raise
        except InsufficientCredits as exc:
            raise InsufficientFunds(str(exc)) from None
        except KeyRevoked:
            raise InvalidAPIKey(REVOKED_KEY_MESSAGE) from None
        except IdempotencyKeyReused:
            raise IdempotencyConflict(
                "This Idempotency-Key was already used for a different request; use a new key for a new request.",
                param="Idempotency-Key",
            ) from None
        except IdempotencyKeyInUse:
            raise IdempotencyConflict(
                "A request with this Idempotency-Key is still running; retry it later to get its outcome.",
                param="Idempotency-Key",
                code="idempotency_key_in_use",
                retry_after_s=IDEMPOTENCY_RETRY_AFTER_S,
            ) from None

    def _refund_orphan(self, future: asyncio.Future[Reservation | Replay]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        reservation = future.result()
        if not isinstance(reservation, Reservation):
            return
        logger.info("request %s cancelled while reserving: refunding", reservation.request_id)
        try:
            self._executor.submit(self.store.settle, reservation.id, 0)
        except RuntimeError:  # shutting down: settle here rather than leave credits held
            self.store.settle(reservation.id, 0)

    async def settle(self, reservation: Reservation, delivered: int, outcome: bytes | None = None) -> Settlement:
        """Charge ``delivered`` images and refund the rest, storing ``outcome`` for the
        reservation's Idempotency-Key replays in the same transaction (``store.settle``).
        Idempotent, and it completes even if the calling task is cancelled meanwhile."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, self.store.settle, reservation.id, delivered, outcome)
        return await asyncio.shield(future)

    async def release_stale(self, older_than_s: float) -> list[Settlement]:
        """Refund every reservation open longer than ``older_than_s``: one whose request
        died with its replica. Safe from several replicas at once (settling is idempotent)."""
        released = await self._run(self.store.release_stale, older_than_s)
        if released:
            logger.warning("refunded %d reservation(s) left open over %g s", len(released), older_than_s)
        return released

    async def _maintain(self, older_than_s: float, idempotency_window_s: float | None) -> None:
        await self.release_stale(older_than_s)
        if idempotency_window_s is not None:
            await self.forget_idempotency(idempotency_window_s)

    def start_stale_sweeper(
        self, older_than_s: float, every_s: float, idempotency_window_s: float | None = None
    ) -> asyncio.Task[None]:
        """Run ``release_stale`` (and forget Idempotency-Key outcomes past their window) now
        and every ``every_s`` as a task of the running loop, once; ``close()`` stops it."""
        if self._stale_sweeper is None or self._stale_sweeper.done():
            work = functools.partial(self._maintain, older_than_s, idempotency_window_s)
            self._stale_sweeper = asyncio.get_running_loop().create_task(
                run_periodically(work, every_s, "releasing stale reservations"), name="Accounts.stale_sweeper"
            )
        return self._stale_sweeper

    async def release_orphaned(self, live_owners: Callable[[], set[str]]) -> list[Settlement]:
        """Refund the open reservations of ingress replicas that are gone (not in
        ``live_owners()``, asked only when another replica holds any): their requests
        died with them and can no longer deliver. Only replicas of this one's own deployment
        are judged (an owner is ``<app>:<deployment>:<replica>``); other applications on the
        same database judge theirs."""
        if self.owner is None:
            return []
        siblings = self.owner.rsplit(":", 1)[0] + ":"
        others = {o for o in await self._run(self.store.open_owners) if o.startswith(siblings)} - {self.owner}
        if not others:
            return []
        dead = others - await asyncio.to_thread(live_owners)
        if not dead:
            return []
        released = await self._run(self.store.release_orphaned, dead)
        if released:
            logger.warning("refunded %d reservation(s) of %d ingress replica(s) that died", len(released), len(dead))
        return released

    def start_orphan_sweeper(self, live_owners: Callable[[], set[str]], every_s: float) -> asyncio.Task[None]:
        """Run ``release_orphaned`` now and every ``every_s``, once per process."""
        if self._orphan_sweeper is None or self._orphan_sweeper.done():
            work = functools.partial(self.release_orphaned, live_owners)
            self._orphan_sweeper = asyncio.get_running_loop().create_task(
                run_periodically(work, every_s, "refunding reservations of dead replicas"),
                name="Accounts.orphan_sweeper",
            )
        return self._orphan_sweeper

    # -- Idempotency-Key -------------------------------------------------------------
    async def forget_idempotency(self, older_than_s: float) -> int:
        return await self._run(self.store.forget_idempotency, older_than_s)

    async def usage(self, key: ApiKey) -> Usage:
        return await self._run(self.store.usage, key.id)

    def close(self) -> None:
        for sweeper in (self._stale_sweeper, self._orphan_sweeper):
            if sweeper is not None:
                sweeper.cancel()
        self._executor.shutdown(wait=True)
        self.store.close()


def build_accounts(config: Any, *, rate_limiter: RateLimiter | None = None, owner: str | None = None) -> Accounts:
    """The ingress replica's ``Accounts`` for an ``AppConfig`` that ``build_app`` already
    anchored: its ``accounts.database_url`` is final (the env override and the base
    directory were applied on the driver), so it is used as is, not re-read from this
    process's environment."""
    accounts = config.accounts
    return Accounts(
        open_store(accounts.database_url),
        default_rpm=accounts.default_requests_per_minute,
        default_ipm=accounts.default_images_per_minute,
        rate_limiter=rate_limiter or _default_rate_limiter(accounts.database_url),
        owner=owner,
    )


def _default_rate_limiter(database_url: str) -> RateLimiter:
    try:
        import ray

        if ray.is_initialized():
            from serve_app.accounts.limiter_actor import ACTOR_NAME, RayRateLimiter

            # Buckets are keyed by key id, which is only unique within one database:
            # applications on other databases in the same cluster get their own actor.
            database_tag = hashlib.sha256(database_url.encode()).hexdigest()[:12]
            return RayRateLimiter(name=f"{ACTOR_NAME}-{database_tag}", database_url=database_url)
    except ImportError:  # pragma: no cover - ray is a dependency
        pass
    return LocalRateLimiter()


__all__ = ["INVALID_KEY_MESSAGE", "MISSING_KEY_MESSAGE", "Accounts", "build_accounts"]
