"""Build the configured ``ImageStore``."""

from __future__ import annotations

from serve_app.config import StorageConfig

from .base import ImageStore


def build_image_store(config: StorageConfig) -> ImageStore:
    if config.backend == "s3":
        from .s3 import S3ImageStore  # boto3 is imported only when S3 is used

        if config.s3 is None:  # StorageConfig already refuses this
            raise ValueError("storage backend 's3' needs an s3: section")
        return S3ImageStore(config.s3, config.url_ttl_s)
    from .local import LocalImageStore

    return LocalImageStore(config.local, config.url_ttl_s)
