"""Insufficient credits: the 402 error, and a memo that repeats it without I/O.

A key whose balance could not cover a request stays short until credits come back to it:
a refund (a settlement that charged less than it held) or an operator's top-up. A client
looping on an exhausted key would otherwise cost a rate-limiter round trip and a database
read per request. ``ShortfallMemo`` answers such repeats in this process for ``ttl_s`` (the
key cache's 1 s), for requests that need at least the remembered shortfall.

What it can get wrong, and why that is bounded: a top-up, or a refund settled by another
ingress replica, is seen here up to ``ttl_s`` late (the same window as a key revocation),
and then only as a 402 that a retry a second later clears. It can never admit a request
the balance cannot cover: ``reserve`` is still the only way to hold credits. Refunds
settled in this process forget the key at once, and a shortfall read before such a
refund landed is not remembered (``epoch``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from serve_app.accounts.expiring import put_bounded
from serve_app.accounts.units import format_credits
from serve_app.errors import InsufficientFunds


class CreditShortfall(InsufficientFunds):
    """402 insufficient_funds, carrying the balance that was too small."""

    def __init__(self, *, images: int, model: str, amount_units: int, balance_units: int) -> None:
        super().__init__(
            f"Insufficient credits: {images} image(s) of model '{model}' cost "
            f"{format_credits(amount_units)} credits; the balance is {format_credits(balance_units)}."
        )
        self.balance_units = balance_units


class ShortfallMemo:
    def __init__(self, ttl_s: float, *, clock: Callable[[], float] = time.monotonic, max_keys: int = 10_000) -> None:
        self._ttl_s = ttl_s
        self._clock = clock
        self._max_keys = max_keys
        self._short: dict[int, tuple[float, int]] = {}  # key id -> (until, balance seen)
        self._epoch = 0  # bumped by every credit seen in this process

    def epoch(self) -> int:
        """Read before asking the database; hand it back to ``remember``."""
        return self._epoch

    def remember(self, key_id: int, shortfall: CreditShortfall, epoch: int) -> None:
        """The database refused ``key_id``; ``epoch`` is what ``epoch()`` said before it was
        asked. Not remembered if credits came back meanwhile: the read may predate them."""
        if epoch != self._epoch:
            return
        now = self._clock()
        put_bounded(self._short, key_id, (now + self._ttl_s, shortfall.balance_units), now, self._max_keys)

    def refuse_if_short(self, key_id: int, model: str, images: int, price_units: int) -> None:
        """Raise ``CreditShortfall`` if ``key_id`` was seen unable to cover this amount
        within the last ``ttl_s``; otherwise return (the database decides)."""
        entry = self._short.get(key_id)
        if entry is None:
            return
        until, balance_units = entry
        if self._clock() >= until:
            del self._short[key_id]
            return
        amount_units = images * price_units
        if amount_units > balance_units:
            raise CreditShortfall(images=images, model=model, amount_units=amount_units, balance_units=balance_units)

    def credited(self, key_id: int | None = None) -> None:
        """Credits came back to ``key_id`` (None: to keys not known here) in this process."""
        self._epoch += 1
        if key_id is None:
            self._short.clear()
        else:
            self._short.pop(key_id, None)


__all__ = ["CreditShortfall", "ShortfallMemo"]
