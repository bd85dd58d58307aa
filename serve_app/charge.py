"""A request's money, from its reservation to its one settlement, and the one way a charged
answer leaves the service.

``Charge`` is made from the reservation and from then on owns it: it counts the images
handed over, and settles exactly once, however the request ends (delivered, failed, or
cancelled at any await). ``hand_over`` is the only code that sends a charged answer, JSON
or events alike: it counts each chunk's images once the chunk's send has returned, and
settles in its ``finally``, shielded from the cancellation that a client going away
brings. A reservation whose ingress process dies is refunded by the sweepers, and its
Idempotency-Key claim ends with it (``AccountStore.settle``).

A chunk counts once its send returns: a response fully handed to the socket but never read
by the client is charged (the server cannot tell), and that is the one exception by design.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio

from serve_app.accounts.records import Reservation, Settlement
from serve_app.metrics import NoMetrics, ServiceMetrics

logger = logging.getLogger("ray.serve")


class SettlingAccounts(Protocol):
    async def settle(self, reservation: Reservation, delivered: int, outcome: bytes | None = None) -> Settlement: ...


class Charge:
    def __init__(
        self,
        accounts: SettlingAccounts,
        reservation: Reservation,
        request_id: str,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self.reservation = reservation
        self._accounts = accounts
        self._request_id = request_id
        self._metrics = metrics or NoMetrics()
        self.delivered = 0
        # What an Idempotency-Key replay answers, stored with the charge (None: no key).
        self.outcome: bytes | None = None
        self._settling: asyncio.Future[Settlement] | None = None

    def handed_over(self, images: int) -> None:
        self.delivered += images

    def settlement_if(self, delivered: int) -> Settlement:
        """What settling ``delivered`` images will do (for headers and events sent before it)."""
        return self.reservation.settlement_if(delivered)

    @property
    def settled(self) -> bool:
        return self._settling is not None

    async def settle(self) -> Settlement:
        """Charge what was handed over and refund the rest, once: a later call returns the
        first settlement. The database work completes even if the caller is cancelled."""
        if self._settling is None:
            self._settling = asyncio.ensure_future(self._settle(self.delivered))
        return await asyncio.shield(self._settling)

    async def refund(self) -> Settlement:
        """Nothing was handed over (the request failed before its answer): settle as such."""
        self.delivered = 0
        return await self.settle()

    async def _settle(self, delivered: int) -> Settlement:
        reservation = self.reservation
        settlement = await self._accounts.settle(reservation, delivered, self.outcome if delivered else None)
        self._metrics.settled(
            reservation.model, settlement.delivered, settlement.charged_units, settlement.refunded_units
        )
        logger.info(
            "request %s settled: model=%s images=%d/%d charged_units=%d refunded_units=%d",
            self._request_id,
            reservation.model,
            settlement.delivered,
            reservation.images,
            settlement.charged_units,
            settlement.refunded_units,
        )
        return settlement


@dataclass(frozen=True)
class Chunk:
    """Bytes of an answer, and how many images they hand over once sent."""

    data: bytes
    images: int = 0


@dataclass
class ServedResponse:
    """What the service answers: the chunks of its body (one for JSON, one per event for a
    stream), and the charge that ``hand_over`` settles (None: nothing to charge, a replay)."""

    chunks: AsyncIterator[Chunk]
    media_type: str
    headers: dict[str, str] = field(default_factory=dict)
    charge: Charge | None = None
    body: Any = None  # the JSON answer's model, for callers that want it unserialized


async def one_chunk(chunk: Chunk) -> AsyncIterator[Chunk]:
    yield chunk


async def hand_over(served: ServedResponse, send: Callable[[bytes], Awaitable[None]]) -> None:
    """Send every chunk; settle the charge once, for what was sent, however this ends."""
    charge = served.charge
    try:
        async for chunk in served.chunks:
            await send(chunk.data)
            if charge is not None:
                charge.handed_over(chunk.images)
    finally:
        # Shielded: a cancelled response (the client left) still stops its generation and
        # settles. ``aclose`` ends the chunks' generator (and the model work behind it).
        with anyio.CancelScope(shield=True):
            aclose = getattr(served.chunks, "aclose", None)
            try:
                if aclose is not None:
                    await aclose()
            finally:
                if charge is not None:
                    await charge.settle()


__all__ = ["Charge", "Chunk", "ServedResponse", "hand_over", "one_chunk"]
