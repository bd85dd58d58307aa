"""Images in any S3-compatible store, delivered as presigned GET URLs.

Credentials come from boto3's standard chain (environment, shared config/credentials
files, container or instance role, ...); never from the service config. ``endpoint_url``
points the client at another S3-compatible store; unset, boto3's own
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` environment variables do (the GPU config
takes endpoint and credentials from the environment). All boto3 calls run in worker threads
(a boto3 client is thread-safe; its session is not, so the client is made once, here).

Retention is the bucket's business: configure a lifecycle rule on the prefix that expires
objects after a day or so. A presigned URL lives ``url_ttl_s`` seconds (at most 7 days for
SigV4) or until the signing credentials expire, whichever comes first: temporary
credentials (an assumed role) shorten it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from serve_app.config import S3StorageConfig

from .base import ImageStore, StorageError, unguessable_name

logger = logging.getLogger(__name__)

MAX_PRESIGN_TTL_S = 7 * 24 * 3600  # SigV4 presigned URLs cannot live longer


class S3ImageStore(ImageStore):
    def __init__(self, config: S3StorageConfig, url_ttl_s: int, client: object | None = None) -> None:
        super().__init__(url_ttl_s)
        if self.url_ttl_s > MAX_PRESIGN_TTL_S:
            raise ValueError(f"url_ttl_s {self.url_ttl_s} exceeds the 7-day limit of S3 presigned URLs")
        self.bucket = config.bucket
        self.prefix = config.prefix.lstrip("/")
        if self.prefix and not self.prefix.endswith("/"):
            self.prefix += "/"
        self._client = client if client is not None else _make_client(config)

    def __repr__(self) -> str:
        return f"S3ImageStore(bucket={self.bucket!r}, prefix={self.prefix!r}, url_ttl_s={self.url_ttl_s})"

    async def save(self, name: str, data: bytes, content_type: str) -> str:
        key = self.prefix + unguessable_name(name)
        await asyncio.to_thread(
            self._call,
            "upload",
            self._client.put_object,
            Bucket=self.bucket,
            Key=key,
            Body=data,
            ContentType=content_type,
        )
        return key

    async def url(self, stored: str, base_url: str | None, expires_at: int) -> str:
        expires_in = max(1, expires_at - int(time.time()))
        return await asyncio.to_thread(
            self._call,
            "presign",
            self._client.generate_presigned_url,
            "get_object",
            Params={"Bucket": self.bucket, "Key": stored},
            ExpiresIn=expires_in,
        )

    async def load(self, stored: str) -> bytes:
        def read() -> bytes:
            response = self._call("download", self._client.get_object, Bucket=self.bucket, Key=stored)
            return response["Body"].read()

        return await asyncio.to_thread(read)

    async def delete(self, stored: str) -> None:
        await asyncio.to_thread(self._call, "delete", self._client.delete_object, Bucket=self.bucket, Key=stored)

    def _call(self, what: str, method: Any, *args: Any, **kwargs: Any) -> Any:
        """One client call, its failures as ``StorageError`` with nothing secret in them."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return method(*args, **kwargs)
        except ClientError as exc:
            response = exc.response if isinstance(exc.response, dict) else {}
            error = response.get("Error") or {}
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            raise StorageError(
                f"s3 {exc.operation_name} to bucket {self.bucket!r} failed: "
                f"{error.get('Code', 'unknown error')} (HTTP {status})"
            ) from None
        except BotoCoreError as exc:
            # Class name only: some botocore messages quote endpoints or profile names.
            raise StorageError(f"s3 {what} with bucket {self.bucket!r} failed: {type(exc).__name__}") from None

    async def close(self) -> None:
        await super().close()
        close = getattr(self._client, "close", None)
        if close is not None:
            await asyncio.to_thread(close)


def _make_client(config: S3StorageConfig) -> object:
    import boto3
    from botocore.config import Config

    # AWS itself: virtual-hosted URLs on the bucket's regional endpoint (botocore's "auto"
    # presigns against the global endpoint, which redirects for young buckets outside
    # us-east-1). A custom endpoint: path-style, which needs no wildcard DNS.
    endpoint = config.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    style = config.addressing_style or ("path" if endpoint else "virtual")
    return boto3.session.Session().client(
        "s3",
        region_name=config.region,
        endpoint_url=endpoint,
        config=Config(
            signature_version="s3v4",
            s3={"addressing_style": style},
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=5,
            read_timeout=30,
        ),
    )
