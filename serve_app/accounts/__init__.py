"""Accounts: API keys, the credit ledger, rate limits and permissions.

Imports neither torch nor ray (the Ray actor lives in ``serve_app.accounts.limiter_actor``,
imported only when used).
"""

from serve_app.accounts.facade import Accounts, build_accounts
from serve_app.accounts.keys import KEY_PREFIX, generate_key, hash_key, issue_key
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
    IssuedKey,
    LedgerEntry,
    ModelUsage,
    Reservation,
    Settlement,
    Usage,
)
from serve_app.accounts.store import (
    AccountsError,
    AccountStore,
    DuplicateKeyName,
    KeyNotFound,
    KeyRevoked,
    open_store,
)
from serve_app.accounts.units import format_credits, parse_credits

__all__ = [
    "KEY_PREFIX",
    "AccountStore",
    "Accounts",
    "AccountsError",
    "ApiKey",
    "DuplicateKeyName",
    "IssuedKey",
    "KeyNotFound",
    "KeyRevoked",
    "LedgerEntry",
    "LocalRateLimiter",
    "ModelUsage",
    "RateLimitBook",
    "RateLimitDecision",
    "RateLimiter",
    "Reservation",
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
