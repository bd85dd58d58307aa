"""Plain records the store returns. None of them holds key material."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from serve_app.accounts.units import format_credits, units_to_decimal

LedgerKind = Literal["reserve", "charge", "refund", "credit"]


@dataclass(frozen=True)
class ApiKey:
    """A key's record, as of the moment it was read. Safe to log: no secret, no hash."""

    id: int
    name: str
    created: float
    revoked_at: float | None = None
    balance_units: int = 0
    allowed_models: frozenset[str] | None = None  # None: every model
    rpm: int | None = None  # None: the configured default
    ipm: int | None = None
    # An operator allowed this key to turn the models' safety checker off per request.
    may_disable_safety_checker: bool = False

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def may_use(self, model_id: str) -> bool:
        return self.allowed_models is None or model_id in self.allowed_models


@dataclass(frozen=True)
class IdempotencyClaim:
    """An ``Idempotency-Key``, the digest of what its request asks, and how long a charged
    outcome of it is replayed (after that, the key starts a new request)."""

    idem_key: str
    fingerprint: str
    window_s: float = float("inf")


@dataclass(frozen=True)
class Replay:
    """A reservation that was not made: the key's first attempt already delivered and was
    charged, and this is its stored outcome."""

    outcome: bytes = field(repr=False)


@dataclass(frozen=True)
class IssuedKey:
    """What issuing a key returns: the record and the plaintext, shown once."""

    record: ApiKey
    secret: str = field(repr=False)


@dataclass(frozen=True)
class Reservation:
    """Credits held for ``images`` images of ``model`` until the request settles."""

    id: int
    key_id: int
    request_id: str
    model: str
    images: int
    price_units: int
    created: float
    balance_units: int = 0  # the key's balance right after the hold

    @property
    def amount_units(self) -> int:
        return self.images * self.price_units

    def settlement_if(self, delivered: int) -> Settlement:
        """What settling ``delivered`` images will do, as seen from this request: the
        balance other requests of the key change meanwhile is theirs."""
        delivered = max(0, min(delivered, self.images))
        refund = (self.images - delivered) * self.price_units
        return Settlement(self.id, delivered, delivered * self.price_units, refund, self.balance_units + refund)


@dataclass(frozen=True)
class Settlement:
    """The outcome of settling a reservation. ``balance_units`` is the balance right after."""

    reservation_id: int
    delivered: int
    charged_units: int
    refunded_units: int
    balance_units: int
    already_settled: bool = False

    def credit_headers(self) -> dict[str, str]:
        """``x-credits-charged`` / ``x-credits-remaining``, as exact decimal strings."""
        return {
            "x-credits-charged": format_credits(self.charged_units),
            "x-credits-remaining": format_credits(self.balance_units),
        }


@dataclass(frozen=True)
class LedgerEntry:
    id: int
    ts: float
    request_id: str | None
    key_id: int
    model: str | None
    kind: LedgerKind
    images: int
    amount_units: int  # the signed change to the balance


@dataclass(frozen=True)
class ModelUsage:
    model: str
    requests: int
    images: int
    credits_units: int


@dataclass(frozen=True)
class Usage:
    key_name: str
    balance_units: int
    reserved_units: int  # held by requests still in flight
    by_model: tuple[ModelUsage, ...] = ()

    @property
    def images(self) -> int:
        return sum(m.images for m in self.by_model)

    @property
    def credits_units(self) -> int:
        return sum(m.credits_units for m in self.by_model)

    def as_json(self) -> dict:
        """The body of ``GET /v1/usage``. Credits are JSON numbers (exact to 6 places)."""

        def credits(units: int) -> float:
            return float(units_to_decimal(units))

        return {
            "object": "usage",
            "key": self.key_name,
            "balance": credits(self.balance_units),
            "reserved": credits(self.reserved_units),
            "total_images": self.images,
            "total_credits": credits(self.credits_units),
            "data": [
                {
                    "object": "usage.model",
                    "model": m.model,
                    "requests": m.requests,
                    "images": m.images,
                    "credits": credits(m.credits_units),
                }
                for m in self.by_model
            ],
        }


__all__ = [
    "ApiKey",
    "IdempotencyClaim",
    "IssuedKey",
    "LedgerEntry",
    "LedgerKind",
    "ModelUsage",
    "Replay",
    "Reservation",
    "Settlement",
    "Usage",
]
