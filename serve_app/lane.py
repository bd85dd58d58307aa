"""The lane a request runs in: interactive (the API's own requests) or batch (lines of the
Batch API). One lifecycle for both (``ImageGenerationService._serve``); a lane changes only
what it costs, whether the per-key rate limit admits it, and the priority its jobs get on the
model replicas (``deployments/coalescing.py``: batch jobs only fill the slots interactive
jobs leave empty)."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Literal

Priority = Literal["interactive", "batch"]


@dataclass(frozen=True)
class Lane:
    priority: Priority = "interactive"
    price_factor: Decimal = Decimal(1)
    # Batch lines are bounded by the runner's concurrency (batches.max_concurrent_lines), not by
    # the key's requests / images per minute: a large batch must not use up the key's
    # interactive budget, nor wait a minute per 60 lines.
    rate_limited: bool = True

    def price_units(self, price_units: int) -> int:
        """A model's price per image in this lane, in whole units (half a unit rounds up)."""
        if self.price_factor == 1:
            return price_units
        return int((Decimal(price_units) * self.price_factor).quantize(Decimal(1), rounding=ROUND_HALF_UP))


INTERACTIVE = Lane()


def batch_lane(price_factor: Decimal) -> Lane:
    return Lane(priority="batch", price_factor=Decimal(price_factor), rate_limited=False)


__all__ = ["INTERACTIVE", "Lane", "Priority", "batch_lane"]
