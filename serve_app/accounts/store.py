"""The storage seam: what the service needs from an accounts database.

``SQLiteAccountStore`` is the one implementation today; a server database (Postgres) can
implement the same protocol later and be chosen by the URL scheme in ``open_store``.
Every method is blocking and thread-safe; the async facade runs them off the event loop.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

from serve_app.accounts.records import (
    ApiKey,
    LedgerEntry,
    Reservation,
    Settlement,
    Usage,
)


class AccountsError(Exception):
    """An operator-facing problem (bad name, duplicate, ...): the CLI prints the message."""


class KeyNotFound(AccountsError):
    pass


class DuplicateKeyName(AccountsError):
    pass


class KeyRevoked(AccountsError):
    pass


@runtime_checkable
class AccountStore(Protocol):
    # -- keys ------------------------------------------------------------------------
    def create_key(
        self,
        name: str,
        key_hash: str,
        *,
        credits_units: int = 0,
        allowed_models: Iterable[str] | None = None,
        rpm: int | None = None,
        ipm: int | None = None,
        may_disable_safety_checker: bool = False,
    ) -> ApiKey:
        """Raises DuplicateKeyName. Initial credits are a 'credit' ledger row."""

    def key_by_hash(self, key_hash: str) -> ApiKey | None:
        """The key with this hash, revoked or not; None when there is none."""

    def key_by_name(self, name: str) -> ApiKey:
        """Raises KeyNotFound."""

    def key_by_id(self, key_id: int) -> ApiKey:
        """Raises KeyNotFound."""

    def list_keys(self) -> list[ApiKey]: ...

    def set_safety_permission(self, name: str, allowed: bool) -> ApiKey:
        """Whether the key may send ``disable_safety_checker: true``. Raises KeyNotFound."""

    def revoke_key(self, name: str) -> ApiKey:
        """Idempotent: revoking a revoked key returns it unchanged. Raises KeyNotFound."""

    def add_credits(self, name: str, credits_units: int) -> ApiKey:
        """Raises KeyNotFound, KeyRevoked, ValueError (amount <= 0)."""

    # -- billing ---------------------------------------------------------------------
    def reserve(
        self, key_id: int, request_id: str, model: str, images: int, price_units: int, owner: str | None = None
    ) -> Reservation:
        """Hold images x price atomically, or raise CreditShortfall (the 402, carrying the
        balance it saw) / InvalidAPIKey (revoked meanwhile) with nothing written. ``owner``
        names the ingress replica whose request holds it (``release_orphaned``)."""

    def settle(self, reservation_id: int, delivered: int) -> Settlement:
        """Charge delivered x price, refund the rest. Idempotent: a second call changes
        nothing and returns the first outcome with ``already_settled=True``."""

    def release_stale(self, older_than_s: float) -> list[Settlement]:
        """Settle (deliver 0, refund all) reservations left open longer than this: the
        requests of a replica that died mid-flight."""

    def open_owners(self) -> set[str]:
        """The owners of reservations still open."""

    def release_orphaned(self, dead_owners: Iterable[str]) -> list[Settlement]:
        """Settle (deliver 0, refund all) the open reservations of these owners: ingress
        replicas that are gone, whose requests can no longer deliver."""

    # -- idempotency -----------------------------------------------------------------
    def claim_idempotency(
        self, key_id: int, idem_key: str, fingerprint: str, owner: str | None, stale_after_s: float
    ) -> tuple[str, bytes | None]:
        """Claim ``idem_key`` for a first attempt. Returns ("claimed", None) if this call
        may run the request, ("done", outcome) if an attempt completed, ("running", None)
        if one is running, ("conflict", None) if the key was used for another request. A
        claim older than ``stale_after_s`` without an outcome is taken over."""

    def complete_idempotency(self, key_id: int, idem_key: str, outcome: bytes) -> None: ...

    def release_idempotency(self, key_id: int, idem_key: str) -> None:
        """Forget a claim whose attempt failed: a retry runs anew (nothing was charged)."""

    def forget_idempotency(self, older_than_s: float) -> int:
        """Drop outcomes older than the window; returns how many."""

    # -- reporting -------------------------------------------------------------------
    def usage(self, key_id: int) -> Usage: ...

    def ledger(self, key_id: int) -> list[LedgerEntry]: ...

    def inconsistencies(self) -> list[str]:
        """Keys whose balance differs from their ledger sum, or is negative. Empty: sound."""

    def close(self) -> None: ...


def open_store(url: str) -> AccountStore:
    """A store for a database URL: ``sqlite:///relative/path``, ``sqlite:////absolute``."""
    if url.startswith("sqlite:"):
        from serve_app.accounts.sqlite_store import SQLiteAccountStore

        return SQLiteAccountStore.from_url(url)
    scheme = url.split(":", 1)[0] if ":" in url else url
    raise ValueError(f"unsupported accounts database URL scheme {scheme!r}: use sqlite:///path")


__all__ = [
    "AccountStore",
    "AccountsError",
    "DuplicateKeyName",
    "KeyNotFound",
    "KeyRevoked",
    "open_store",
]
