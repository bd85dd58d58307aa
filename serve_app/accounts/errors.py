"""What the accounts database can refuse, in its own terms.

These are domain errors, not HTTP errors: the CLI prints them as they are, and the facade
(``serve_app.accounts.facade``) turns the two that a request can meet (no credits, a key
revoked meanwhile) into the service's API errors.
"""

from __future__ import annotations

from serve_app.accounts.units import format_credits


class AccountsError(Exception):
    """An operator-facing problem (bad name, duplicate, ...): the CLI prints the message."""


class KeyNotFound(AccountsError):
    pass


class DuplicateKeyName(AccountsError):
    pass


class KeyRevoked(AccountsError):
    pass


class InsufficientCredits(AccountsError):
    """A reservation the balance cannot cover; carries the balance that was too small."""

    def __init__(self, *, images: int, model: str, amount_units: int, balance_units: int) -> None:
        super().__init__(
            f"Insufficient credits: {images} image(s) of model '{model}' cost "
            f"{format_credits(amount_units)} credits; the balance is {format_credits(balance_units)}."
        )
        self.balance_units = balance_units


class IdempotencyKeyReused(AccountsError):
    """The Idempotency-Key was claimed for a request that asked something else."""


class IdempotencyKeyInUse(AccountsError):
    """The Idempotency-Key's first attempt still holds its reservation."""


class SchemaTooNew(AccountsError):
    """The database was migrated by a newer version of the service."""


__all__ = [
    "AccountsError",
    "DuplicateKeyName",
    "IdempotencyKeyInUse",
    "IdempotencyKeyReused",
    "InsufficientCredits",
    "KeyNotFound",
    "KeyRevoked",
    "SchemaTooNew",
]
