"""A size bound for the small in-process caches whose entries start with an expiry time."""

from __future__ import annotations

from typing import Any, TypeVar

K = TypeVar("K")


def put_bounded(cache: dict[K, tuple[Any, ...]], key: K, entry: tuple[Any, ...], now: float, max_size: int) -> None:
    """Store ``entry`` (its first item is when it expires) under ``key``. A full cache first
    drops its expired entries, then everything if that was not enough: a client spraying
    random keys can cost lookups, never unbounded memory."""
    if len(cache) >= max_size:
        for stale in [k for k, old in cache.items() if old[0] <= now]:
            del cache[stale]
        if len(cache) >= max_size:
            cache.clear()
    cache[key] = entry
