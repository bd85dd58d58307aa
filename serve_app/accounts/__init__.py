"""Accounts: API keys, the credit ledger, rate limits and permissions.

Modules, each with one job: ``keys`` (key material), ``records`` (what the store returns),
``errors`` (what it refuses, in domain terms), ``schema`` + ``migrations`` (the tables and
their Alembic revisions, applied by ``migrate``), ``store`` (the ledger on SQLAlchemy:
SQLite or PostgreSQL), ``rate_limit`` (token buckets), ``facade`` (the async face for the
ingress, mapping domain errors to API errors).

Imports neither torch nor ray (the Ray actor lives in ``serve_app.accounts.limiter_actor``,
imported only when used).
"""

from serve_app.accounts.errors import (
    AccountsError,
    DuplicateKeyName,
    InsufficientCredits,
    KeyNotFound,
    KeyRevoked,
    SchemaTooNew,
)
from serve_app.accounts.facade import Accounts, build_accounts
from serve_app.accounts.keys import KEY_PREFIX, generate_key, hash_key
from serve_app.accounts.rate_limit import (
    LocalRateLimiter,
    RateLimitBook,
    RateLimitDecision,
    RateLimiter,
    TokenBucket,
    rate_limit_headers,
    retry_after_header,
)
from serve_app.accounts.records import (
    ApiKey,
    IdempotencyClaim,
    IssuedKey,
    LedgerEntry,
    ModelUsage,
    Replay,
    Reservation,
    Settlement,
    Usage,
)
from serve_app.accounts.store import AccountStore, issue_key, open_store
from serve_app.accounts.units import format_credits, parse_credits

__all__ = [
    "KEY_PREFIX",
    "AccountStore",
    "Accounts",
    "AccountsError",
    "ApiKey",
    "DuplicateKeyName",
    "IdempotencyClaim",
    "InsufficientCredits",
    "IssuedKey",
    "KeyNotFound",
    "KeyRevoked",
    "LedgerEntry",
    "LocalRateLimiter",
    "ModelUsage",
    "RateLimitBook",
    "RateLimitDecision",
    "RateLimiter",
    "Replay",
    "Reservation",
    "SchemaTooNew",
    "Settlement",
    "TokenBucket",
    "Usage",
    "build_accounts",
    "format_credits",
    "generate_key",
    "hash_key",
    "issue_key",
    "open_store",
    "parse_credits",
    "rate_limit_headers",
    "retry_after_header",
]
