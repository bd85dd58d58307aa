"""HMAC-signed, expiring URLs for files the ingress serves itself.

A URL carries ``expires`` (unix seconds) and ``signature`` (hex HMAC-SHA256 of
``name + "\\n" + expires`` under a secret). Every ingress replica and every restart must
use the same secret, so without a configured one a random secret is created once,
atomically, in ``<root>/.signing_key`` (mode 0600) and read by everyone after.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import tempfile
import time
from pathlib import Path

from serve_app.errors import Forbidden

SIGNING_KEY_FILE = ".signing_key"
_KEY_BYTES = 32


class UrlSigner:
    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the URL signing secret must be at least 16 bytes")
        self._secret = secret

    def __repr__(self) -> str:  # never show the secret
        return "UrlSigner(<secret>)"

    def signature(self, name: str, expires: int) -> str:
        message = f"{name}\n{int(expires)}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def verify(self, name: str, expires: str | int | None, signature: str | None, now: float | None = None) -> int:
        """Return ``expires`` as an int, or raise ``Forbidden`` for a URL that was not signed
        by us, was altered, or has expired."""
        text = str(expires) if isinstance(expires, (str, int)) and not isinstance(expires, bool) else ""
        expires_at = int(text) if text.isascii() and text.isdigit() and len(text) <= 12 else None
        if expires_at is None or not isinstance(signature, str) or not signature:
            raise Forbidden("The URL is not validly signed.")
        expected = self.signature(name, expires_at)
        # compare_digest on ASCII str is constant-time in the length of the inputs.
        if not hmac.compare_digest(expected, signature.lower() if signature.isascii() else ""):
            raise Forbidden("The URL is not validly signed.")
        if (time.time() if now is None else now) > expires_at:
            raise Forbidden("The URL has expired.")
        return expires_at


def load_or_create_secret(root: Path) -> bytes:
    """The shared secret in ``root/.signing_key``, created once if missing.

    Creation is atomic: the key is written to a temporary file and hard-linked into place,
    which fails if another replica got there first; then everyone reads the winner's key.
    """
    root.mkdir(parents=True, exist_ok=True)
    path = root / SIGNING_KEY_FILE
    for _ in range(100):
        secret = _read_secret(path)
        if secret is not None:
            return secret
        key = secrets.token_hex(_KEY_BYTES)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-key-", dir=root)  # mode 0600
        try:
            with os.fdopen(fd, "w", encoding="ascii") as handle:
                handle.write(key)
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another replica won: read its key
            except OSError:
                _create_exclusive(path, key)  # a filesystem without hard links
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        time.sleep(0.01)
    raise RuntimeError(f"could not read or create the URL signing key {path}")


def _create_exclusive(path: Path, key: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(key)


def _read_secret(path: Path) -> bytes | None:
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    if len(text) < 2 * _KEY_BYTES:
        return None  # being written (only with the no-hard-link fallback): read again
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise RuntimeError(f"{path} does not hold a hex signing key") from None
