"""API key material: generation, hashing, parsing of the Authorization header.

A key is ``qbt_`` followed by 43 url-safe characters (32 random bytes). Keys are
high-entropy, so one SHA-256 is a sufficient one-way storage form (no salt or slow hash
needed: there is nothing to brute-force). The plaintext leaves this module exactly once,
when it is issued, and nothing here logs or formats it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from serve_app.accounts.errors import AccountsError

KEY_PREFIX = "qbt_"
KEY_RANDOM_BYTES = 32  # token_urlsafe(32) gives 43 characters
MAX_KEY_CHARS = 128
_KEY_SHAPE = re.compile(r"^qbt_[A-Za-z0-9_-]{32,124}$")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


def generate_key() -> str:
    """A fresh plaintext key. Show it to the operator once; store only ``hash_key(key)``."""
    return KEY_PREFIX + secrets.token_urlsafe(KEY_RANDOM_BYTES)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def hashes_match(stored_hash: str, presented_hash: str) -> bool:
    return hmac.compare_digest(stored_hash.encode("ascii"), presented_hash.encode("ascii"))


def looks_like_key(token: str) -> bool:
    """Cheap shape check, so garbage never reaches the database."""
    return len(token) <= MAX_KEY_CHARS and _KEY_SHAPE.match(token) is not None


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header; None when absent or empty.

    The scheme is case-insensitive (RFC 7235). A header with another scheme (``Basic ...``)
    counts as no API key at all.
    """
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or None


def validate_key_name(name: str) -> str:
    """A key's name: what the operator types in the CLI, shown in usage reports."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise AccountsError(
            f"invalid key name {name!r}: use 1-64 letters, digits, '.', '_', '-' or '@', "
            "starting with a letter or digit"
        )
    return name


__all__ = [
    "KEY_PREFIX",
    "bearer_token",
    "generate_key",
    "hash_key",
    "hashes_match",
    "looks_like_key",
    "validate_key_name",
]
