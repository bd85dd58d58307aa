"""The object-store interface behind ``response_format: "url"``.

An ``ImageStore`` keeps one generated image under an unguessable object name and hands
back a URL that stops working after ``url_ttl_s`` seconds. Two backends implement it:
``LocalImageStore`` (files under a data folder, served by the ingress at an HMAC-signed
URL) and ``S3ImageStore`` (any S3-compatible store, presigned GET URLs).
"""

from __future__ import annotations

import abc
import asyncio
import re
import secrets
import time

from serve_app.errors import UpstreamError

# Content types of the formats the service encodes; anything else is served as bytes.
CONTENT_TYPES = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "jpg": "image/jpeg",
    "webp": "image/webp",
}
DEFAULT_CONTENT_TYPE = "application/octet-stream"

# One path segment: starts with a letter or digit (so never "", "." , ".." or a hidden
# file such as ".signing_key"), then letters, digits, "_", "-" and ".".
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
MAX_NAME_CHARS = 512
MAX_SEGMENTS = 8


class StorageError(UpstreamError):
    """The object store could not take or hand out an image.

    A 502 upstream_error on the wire if it ever escapes; the message is safe for clients
    (no bucket, path, endpoint or credential), ``detail`` is for the server log.
    """

    def __init__(self, detail: str, message: str = "The generated image could not be stored.") -> None:
        super().__init__(message)
        self.detail = detail

    def __str__(self) -> str:  # what logs and tracebacks show
        return f"{self.message} ({self.detail})"


def content_type_for(name: str) -> str:
    _, dot, ext = name.rpartition(".")
    return CONTENT_TYPES.get(ext.lower(), DEFAULT_CONTENT_TYPE) if dot else DEFAULT_CONTENT_TYPE


def is_valid_name(name: str) -> bool:
    """A relative object name made of safe segments: no traversal, no hidden files."""
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS:
        return False
    segments = name.split("/")
    return len(segments) <= MAX_SEGMENTS and all(_SEGMENT.match(s) for s in segments)


def unguessable_name(name: str) -> str:
    """A safe stored name for the caller's ``name``, with 128 random bits added.

    ``req_abc/0.png`` becomes ``req_abc/0-<22 random url-safe chars>.png``. Whatever the
    caller passes (a client-chosen request id included) the result is a valid relative
    name: unsafe characters become ``_``, empty, ``.`` and ``..`` segments are dropped.
    """
    *raw_folders, raw_base = str(name).replace("\\", "/").split("/")
    folders = [f for f in (_clean(s, 48) for s in raw_folders) if f][-(MAX_SEGMENTS - 1) :]
    stem, dot, ext = raw_base.rpartition(".")
    if not dot:
        stem, ext = raw_base, ""
    stem, ext = _clean(stem, 80) or "image", _clean(ext, 8)
    token = secrets.token_urlsafe(16)
    return "/".join([*folders, f"{stem}-{token}.{ext}" if ext else f"{stem}-{token}"])


def _clean(segment: str, limit: int) -> str:
    """Unsafe characters to ``_``, no leading ``.``/``_``/``-``, at most ``limit`` chars."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", segment).lstrip("._-")[:limit]


class ImageStore(abc.ABC):
    """Stores images and returns expiring URLs for them."""

    def __init__(self, url_ttl_s: int) -> None:
        if url_ttl_s < 1:
            raise ValueError("url_ttl_s must be at least 1 second")
        self.url_ttl_s = int(url_ttl_s)
        self._sweeper: asyncio.Task[None] | None = None

    @property
    def needs_request_base_url(self) -> bool:
        """Whether URLs are built from the request's own base URL (the local store with no
        ``public_base_url``); the ingress passes one only for a loopback Host."""
        return False

    async def put(self, name: str, data: bytes, content_type: str, base_url: str | None) -> str:
        """Store ``data`` under a name derived from ``name`` and return a URL valid for
        ``url_ttl_s`` seconds. ``name`` is a relative name such as ``f"{request_id}/{i}.png"``;
        random bits are added so the stored name cannot be guessed. ``base_url`` is the
        ingress's external base URL for the current request (used by the local backend
        when no public_base_url is configured). Raises ``StorageError``."""
        # Expiry is fixed before the write, so an object's age + ttl is never earlier than
        # its URL's expiry and retention cannot delete an object whose URL still works.
        expires_at = int(time.time()) + self.url_ttl_s
        stored = await self.save(name, data, content_type)
        return await self.url(stored, base_url, expires_at)

    @abc.abstractmethod
    async def save(self, name: str, data: bytes, content_type: str) -> str:
        """Store ``data`` under a name derived from ``name`` (random bits added); return the
        stored name, which ``url`` and ``load`` take. Kept for ``url_ttl_s``. Raises
        ``StorageError``."""

    @abc.abstractmethod
    async def url(self, stored: str, base_url: str | None, expires_at: int) -> str:
        """A URL for a stored object that stops working at ``expires_at`` (unix seconds)."""

    @abc.abstractmethod
    async def load(self, stored: str) -> bytes:
        """A stored object's bytes. Raises ``StorageError`` when it is gone."""

    async def delete(self, stored: str) -> None:
        """Remove a stored object; one already gone is not an error. Raises ``StorageError``."""
        raise StorageError(f"{type(self).__name__} cannot delete objects")

    async def run_sweeper(self) -> None:
        """Background retention loop; backends whose store expires objects itself (S3: a
        bucket lifecycle rule) return at once."""

    def start_sweeper(self) -> asyncio.Task[None] | None:
        """Start ``run_sweeper()`` as a task of the running event loop, once. ``close()``
        cancels it."""
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(
                self.run_sweeper(), name=f"{type(self).__name__}.sweeper"
            )
        return self._sweeper

    async def close(self) -> None:
        """Stop background work and release clients."""
        task, self._sweeper = self._sweeper, None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
