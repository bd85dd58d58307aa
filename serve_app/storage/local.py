"""The embedded default backend: files under a data folder, served by the ingress.

``put`` writes ``<root>/<name>`` atomically (temporary file + rename) and returns
``{base}/v1/files/images/<name>?expires=<unix s>&signature=<hex>``. The ingress route for
that path calls ``resolve``, which checks the signature and expiry before touching the
disk. A sweep deletes files once their URLs can no longer be valid.

Every ingress replica must see the same folder (one machine, or a shared volume): that is
where the files and the shared signing key live.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

from serve_app.config import LocalStorageConfig
from serve_app.errors import NotFound
from serve_app.periodic import run_periodically

from .base import ImageStore, StorageError, content_type_for, is_valid_name, unguessable_name
from .signing import SIGNING_KEY_FILE, UrlSigner, load_or_create_secret

logger = logging.getLogger(__name__)

ROUTE_PREFIX = "/v1/files/images/"
_TMP_PREFIX = ".tmp-"


class LocalImageStore(ImageStore):
    def __init__(self, config: LocalStorageConfig, url_ttl_s: int) -> None:
        super().__init__(url_ttl_s)
        self.root = Path(config.root).expanduser().absolute()
        self.root.mkdir(parents=True, exist_ok=True)
        self.root = self.root.resolve()
        self.public_base_url = config.public_base_url.rstrip("/") if config.public_base_url else None
        self.sweep_interval_s = float(config.sweep_interval_s)
        secret = config.signing_secret.encode("utf-8") if config.signing_secret else load_or_create_secret(self.root)
        self._signer = UrlSigner(secret)

    def __repr__(self) -> str:
        return f"LocalImageStore(root={str(self.root)!r}, url_ttl_s={self.url_ttl_s})"

    # -- writing ---------------------------------------------------------------------------

    @property
    def needs_request_base_url(self) -> bool:
        return self.public_base_url is None

    async def save(self, name: str, data: bytes, content_type: str) -> str:
        stored = unguessable_name(name)
        try:
            await asyncio.to_thread(self._write, stored, data)
        except OSError as exc:
            raise StorageError(f"local write failed: {type(exc).__name__} errno={exc.errno}") from exc
        return stored

    async def url(self, stored: str, base_url: str | None, expires_at: int) -> str:
        base = self.public_base_url or base_url
        if base is None:
            raise StorageError("no public_base_url and no trusted request base URL")
        return self.url_for(stored, expires_at, base.rstrip("/"))

    async def load(self, stored: str) -> bytes:
        if not is_valid_name(stored):
            raise StorageError("not a stored name")
        try:
            return await asyncio.to_thread((self.root / stored).read_bytes)
        except OSError as exc:
            raise StorageError(f"local read failed: {type(exc).__name__} errno={exc.errno}") from exc

    async def delete(self, stored: str) -> None:
        if not is_valid_name(stored):
            raise StorageError("not a stored name")
        try:
            await asyncio.to_thread((self.root / stored).unlink, missing_ok=True)
        except OSError as exc:
            raise StorageError(f"local delete failed: {type(exc).__name__} errno={exc.errno}") from exc

    def url_for(self, name: str, expires: int, base_url: str) -> str:
        signature = self._signer.signature(name, expires)
        return f"{base_url.rstrip('/')}{ROUTE_PREFIX}{quote(name)}?expires={expires}&signature={signature}"

    def _write(self, name: str, data: bytes) -> None:
        target = self.root / name
        for attempt in range(3):
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=target.parent)
            except FileNotFoundError:
                if attempt == 2:
                    raise
                continue  # the sweep removed the (empty) folder in between: make it again
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                os.chmod(tmp, 0o644)
                os.replace(tmp, target)
            except BaseException:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
                raise
            return

    # -- serving ---------------------------------------------------------------------------

    def resolve(
        self, name: str, expires: str | int | None, signature: str | None, now: float | None = None
    ) -> tuple[Path, str]:
        """Check a URL's signature and expiry and return the file to send and its type.

        Raises ``Forbidden`` (403) for a missing, bad or tampered signature or an expired
        URL and ``NotFound`` (404) for a name that cannot exist here or a file that is gone.
        Cheap (one HMAC and one stat): fine to call on the event loop.
        """
        if not is_valid_name(name):
            raise NotFound("The requested file does not exist.")
        self._signer.verify(name, expires, signature, now=now)
        path = (self.root / name).resolve()
        if not path.is_relative_to(self.root) or path == self.root:
            raise NotFound("The requested file does not exist.")  # a symlink out of root
        if not path.is_file():
            raise NotFound("The requested file does not exist.")
        return path, content_type_for(name)

    # -- retention ---------------------------------------------------------------------------

    def sweep(self, now: float | None = None) -> int:
        """Delete stored files (and stale temporary files) older than ``url_ttl_s`` and the
        folders left empty. Returns how many files were deleted. Safe to run concurrently
        from several replicas."""
        cutoff = (time.time() if now is None else now) - self.url_ttl_s
        deleted = 0
        for folder, dirnames, filenames in os.walk(self.root, topdown=False):
            here = Path(folder)
            for filename in filenames:
                if here == self.root and filename == SIGNING_KEY_FILE:
                    continue
                path = here / filename
                try:
                    if path.lstat().st_mtime < cutoff:
                        path.unlink()
                        deleted += 1
                except FileNotFoundError:
                    continue
            if here != self.root:
                try:
                    here.rmdir()  # succeeds only when empty; put() re-creates on a race
                except OSError:
                    pass
        return deleted

    async def run_sweeper(self) -> None:
        """Sweep now and then every ``sweep_interval_s`` until cancelled."""
        await run_periodically(self._sweep_once, self.sweep_interval_s, "image store sweep")

    async def _sweep_once(self) -> None:
        deleted = await asyncio.to_thread(self.sweep)
        if deleted:
            logger.info("image store sweep deleted %d expired file(s)", deleted)
