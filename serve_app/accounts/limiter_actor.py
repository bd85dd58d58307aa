"""The rate-limit book shared by every ingress replica: one named, detached Ray actor.

Every replica calls ``RayRateLimiter().check(...)``; the first one creates the actor
(``get_if_exists=True``), the others attach to it. It is detached so that it outlives the
replica that happened to create it; its buckets therefore also survive a redeploy. It asks
for no CPU, and all its methods are async, so it runs one check at a time on its event
loop (a check is a few microseconds of arithmetic).

Its buckets live in memory, and survive the actor's death all the same: Ray restarts it
(``max_restarts=-1``), and for one window after it starts, a key it has not seen yet gets
its buckets rebuilt from the reservations of the last minute in the accounts database
(``RateLimitBook.restore``): every request that was admitted and went on to generate holds
one. No write per request, no snapshot to keep: only requests admitted and then refused
for credits are not counted.

If the actor cannot be reached, checks fail open (admitted, ``degraded=True``, logged):
a rate limiter outage must not take the API down. Credits are never affected by this.
"""

from __future__ import annotations

import asyncio
import logging
import time

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from serve_app.accounts.rate_limit import WINDOW_S, RateLimitBook, RateLimitDecision

ACTOR_NAME = "imagegen_rate_limiter"
NAMESPACE = "serve"

logger = logging.getLogger(__name__)


@ray.remote(num_cpus=0, max_restarts=-1)
class RateLimiterActor:
    def __init__(self, database_url: str | None = None) -> None:
        """``database_url``: the accounts database whose reservations rebuild the buckets
        after a (re)start; None: start empty."""
        self._book = RateLimitBook(clock=time.monotonic)
        self._database_url = database_url
        self._store = None
        # Keys first seen before this may have been admitted by a previous incarnation.
        self._restore_until = time.monotonic() + WINDOW_S
        self._restoring = asyncio.Lock()

    async def check(self, key_id: int, rpm: int, ipm: int, images: int = 1) -> dict:
        # A plain dict crosses the boundary: no class needs unpickling on the caller.
        return (await self.check_many([(key_id, rpm, ipm, images)]))[0]

    async def check_many(self, checks: list[tuple[int, int, int, int]]) -> list[dict]:
        """Several ``(key_id, rpm, ipm, images)`` checks, applied in order."""
        if self._database_url is not None and time.monotonic() < self._restore_until:
            async with self._restoring:  # one batch at a time while a lookup may await
                await self._restore([c for c in checks if c[0] not in self._book])
                return [self._book.check(*args).as_dict() for args in checks]
        return [self._book.check(*args).as_dict() for args in checks]

    async def _restore(self, unseen: list[tuple[int, int, int, int]]) -> None:
        if not unseen:
            return
        try:
            history = await asyncio.to_thread(self._admissions, sorted({c[0] for c in unseen}))
        except Exception as exc:  # noqa: BLE001 - start those keys full rather than fail checks
            logger.warning("could not rebuild rate limits from the ledger (%s)", type(exc).__name__)
            return
        for key_id, rpm, ipm, _ in unseen:
            if key_id not in self._book:
                self._book.restore(key_id, rpm, ipm, history.get(key_id, []))

    def _admissions(self, key_ids: list[int]) -> dict[int, list[tuple[float, int]]]:
        if self._store is None:
            from serve_app.accounts.store import open_store

            self._store = open_store(self._database_url)
        return self._store.recent_admissions(key_ids, WINDOW_S)

    async def forget(self, key_id: int) -> None:
        self._book.forget(key_id)

    async def size(self) -> int:
        return len(self._book)


def get_rate_limiter_actor(
    name: str = ACTOR_NAME, namespace: str = NAMESPACE, *, detached: bool = True, database_url: str | None = None
):
    """The shared actor's handle, creating it if no actor of that name exists yet."""
    options = {"name": name, "namespace": namespace, "get_if_exists": True}
    if detached:
        options["lifetime"] = "detached"
    return RateLimiterActor.options(**options).remote(database_url)


def kill_rate_limiter_actor(name: str = ACTOR_NAME, namespace: str = NAMESPACE) -> bool:
    """Remove the shared actor (tests, teardown). Returns whether there was one."""
    try:
        handle = ray.get_actor(name, namespace=namespace)
    except ValueError:
        return False
    ray.kill(handle, no_restart=True)
    return True


class RayRateLimiter:
    """``RateLimiter`` over the shared actor. Create one per replica; it attaches lazily.

    Checks are coalesced: while one call to the actor is in flight, checks that arrive
    queue up and go together in the next call (``check_many``), so a busy replica makes
    one actor round trip per batch rather than one per request. The actor still applies
    them one by one, in arrival order.
    """

    def __init__(
        self,
        name: str = ACTOR_NAME,
        namespace: str = NAMESPACE,
        *,
        detached: bool = True,
        timeout_s: float = 2.0,
        max_batch: int = 256,
        database_url: str | None = None,
    ) -> None:
        self._name = name
        self._database_url = database_url
        self._namespace = namespace
        self._detached = detached
        self._timeout_s = timeout_s
        self._max_batch = max_batch
        self._handle = None
        self._pending: list[tuple[tuple[int, int, int, int], asyncio.Future]] = []
        self._flusher: asyncio.Task | None = None

    async def _actor(self, *, fresh: bool = False):
        if self._handle is None or fresh:
            # get_if_exists is a blocking GCS round trip: keep it off the event loop.
            self._handle = await asyncio.to_thread(
                get_rate_limiter_actor,
                self._name,
                self._namespace,
                detached=self._detached,
                database_url=self._database_url,
            )
        return self._handle

    async def check(self, key_id: int, rpm: int, ipm: int, images: int = 1) -> RateLimitDecision:
        if images < 1 or rpm < 1 or ipm < 1:
            raise ValueError("images, rpm and ipm must be at least 1")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append(((key_id, rpm, ipm, images), future))
        if self._flusher is None or self._flusher.done() or self._flusher.get_loop() is not loop:
            self._flusher = loop.create_task(self._flush())
        return RateLimitDecision(**await future)

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[: self._max_batch], self._pending[self._max_batch :]
            results = await self._send([args for args, _ in batch])
            for (_, future), result in zip(batch, results):
                if not future.done():  # the caller may have gone away
                    future.set_result(result)

    async def _send(self, checks: list[tuple[int, int, int, int]]) -> list[dict]:
        for attempt in (1, 2):
            try:
                actor = await self._actor(fresh=attempt == 2)
                return await asyncio.wait_for(actor.check_many.remote(checks), timeout=self._timeout_s)
            except RayActorError:
                if attempt == 1:
                    continue  # the actor died (and was not restarted): attach to a new one
                logger.warning("rate limiter actor unavailable; admitting without a limit")
            except (asyncio.TimeoutError, GetTimeoutError):
                logger.warning("rate limiter actor timed out; admitting without a limit")
                break
            except Exception as exc:  # noqa: BLE001 - fail open, but say why
                logger.warning("rate limiter failed (%s); admitting without a limit", type(exc).__name__)
                break
        return [RateLimitDecision.unlimited(rpm, ipm, images).as_dict() for _, rpm, ipm, images in checks]


__all__ = [
    "ACTOR_NAME",
    "NAMESPACE",
    "RateLimiterActor",
    "RayRateLimiter",
    "get_rate_limiter_actor",
    "kill_rate_limiter_actor",
]
