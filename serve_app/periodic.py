"""Background upkeep that runs now and then every so often, for the life of a replica."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

logger = logging.getLogger(__name__)


async def run_periodically(work: Callable[[], Awaitable[object]], every_s: float, what: str) -> None:
    """Await ``work()`` now and then every ``every_s`` seconds until cancelled. A failing
    round is logged and the next one still runs: upkeep must not die with one bad round."""
    while True:
        try:
            await work()
        except Exception:
            logger.exception("%s failed", what)
        await asyncio.sleep(every_s)


__all__ = ["run_periodically"]
