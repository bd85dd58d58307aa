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


def build_file_store(config: StorageConfig) -> ImageStore:
    """Where ``/v1/files`` keeps its bytes: the configured backend, in a place of its own that
    the image retention never sweeps (``storage.local.files_root``, ``storage.s3.files_prefix``).
    Files are deleted by the Batch API's own retention (``files.retention_s``) or a DELETE;
    its ``url_ttl_s`` is unused (files are downloaded through the API, never by URL)."""
    if config.backend == "s3":
        from .s3 import S3ImageStore

        if config.s3 is None:
            raise ValueError("storage backend 's3' needs an s3: section")
        return S3ImageStore(config.s3.model_copy(update={"prefix": config.s3.files_prefix}), config.url_ttl_s)
    from .local import LocalImageStore

    return LocalImageStore(config.local.model_copy(update={"root": config.local.files_root}), config.url_ttl_s)
