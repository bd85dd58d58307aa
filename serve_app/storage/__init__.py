"""Object storage for ``response_format: "url"``: see ``base.ImageStore``."""

from .base import CONTENT_TYPES, ImageStore, StorageError, content_type_for
from .factory import build_file_store, build_image_store
from .local import ROUTE_PREFIX, LocalImageStore


def __getattr__(name: str):  # S3ImageStore without importing boto3 up front
    if name == "S3ImageStore":
        from .s3 import S3ImageStore

        return S3ImageStore
    raise AttributeError(name)


__all__ = [
    "CONTENT_TYPES",
    "ROUTE_PREFIX",
    "ImageStore",
    "LocalImageStore",
    "S3ImageStore",
    "StorageError",
    "build_file_store",
    "build_image_store",
    "content_type_for",
]
