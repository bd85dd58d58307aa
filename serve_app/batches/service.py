"""``/v1/files`` and ``/v1/batches``: the Batch API's use cases, free of HTTP.

Every method takes the caller's key (authenticated by the ingress before any body is read)
and sees only that key's files and batches: another key's id is a 404, as an unknown one.
A file's bytes go to the file store (``storage.build_file_store``: its own folder or prefix,
never swept with the images), its row to the accounts database. A batch's lines are written
as rows when it is created; ``serve_app.batches.runner`` runs them.

Files are of two kinds. ``batch``: a JSONL input file, validated line by line at upload.
``vision`` / ``user_data``: an image that an edit names by ``file_id`` (``serve_app.
edit_inputs``), checked at upload from its header only (``image_input.sniff_image``: PNG, JPEG
or WEBP, one frame, within ``image_upload_policy``); it is decoded when an edit uses it, under
that edit's model's limits and the decoding budget, as any input image.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from serve_app.batches.protocol import (
    FILE_PURPOSES,
    BatchError,
    BatchErrors,
    BatchList,
    BatchObject,
    BatchRequestCounts,
    FileDeleted,
    FileList,
    FileObject,
    parse_batch_create,
    parse_batch_file,
)
from serve_app.batches.store import BatchRow, BatchStore, FileRow, NewLine, new_id
from serve_app.config import AppConfig
from serve_app.edit_inputs import IMAGE_FILE_PURPOSES
from serve_app.errors import InvalidRequest, NotFound
from serve_app.image_input import ImageInputPolicy, sniff_image
from serve_app.storage import ImageStore, StorageError

T = TypeVar("T")
MAX_FILENAME_CHARS = 255
# An image file's stored suffix and content type, by the format its header declares.
IMAGE_TYPES = {"PNG": (".png", "image/png"), "JPEG": (".jpg", "image/jpeg"), "WEBP": (".webp", "image/webp")}


def image_upload_policy(config: AppConfig) -> ImageInputPolicy:
    """What an image upload (purpose vision / user_data) may be: the input-image limits of
    the most generous configured model (``limits.max_input_image_bytes`` and
    ``max_input_image_pixels``; bytes also within ``files.max_bytes``), so no image is kept
    that no model could take. An edit that uses it applies its own model's limits again."""
    models = config.models
    return ImageInputPolicy(
        max_bytes=min(config.files.max_bytes, max(m.limits.max_input_image_bytes for m in models)),
        max_pixels=max(m.limits.max_input_image_pixels for m in models),
        max_jpeg_scans=config.image_input.max_jpeg_scans,
    )


def file_object(row: FileRow) -> FileObject:
    return FileObject(
        id=row.id,
        bytes=row.bytes,
        created_at=int(row.created_at),
        expires_at=None if row.expires_at is None else int(row.expires_at),
        filename=row.filename,
        purpose=row.purpose,  # type: ignore[arg-type]
    )


def _time(value: float | None) -> int | None:
    return None if value is None else int(value)


def batch_object(row: BatchRow) -> BatchObject:
    errors = None
    if row.errors:
        errors = BatchErrors(data=[BatchError(**error) for error in row.errors])
    counts = row.counts
    return BatchObject(
        id=row.id,
        endpoint=row.endpoint,
        model=row.model,
        errors=errors,
        input_file_id=row.input_file_id,
        completion_window=row.completion_window,
        status=row.status,  # type: ignore[arg-type]
        output_file_id=row.output_file_id,
        error_file_id=row.error_file_id,
        created_at=int(row.created_at),
        in_progress_at=_time(row.in_progress_at),
        expires_at=_time(row.expires_at),
        finalizing_at=_time(row.finalizing_at),
        completed_at=_time(row.completed_at),
        failed_at=_time(row.failed_at),
        expired_at=_time(row.expired_at),
        cancelling_at=_time(row.cancelling_at),
        cancelled_at=_time(row.cancelled_at),
        request_counts=BatchRequestCounts(total=counts.total, completed=counts.completed, failed=counts.failed),
        metadata=row.metadata,
    )


def _limit(value: str | None, default: int, most: int) -> int:
    if value is None:
        return default
    if not value.isdigit() or not 1 <= int(value) <= most:
        raise InvalidRequest(f"Invalid 'limit': an integer from 1 to {most}.", param="limit")
    return int(value)


class BatchService:
    def __init__(
        self,
        config: AppConfig,
        store: BatchStore,
        files: ImageStore,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._store = store
        self._files = files
        self._clock = clock
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="batches-db")

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    # -- files -------------------------------------------------------------------------
    async def upload_file(self, key: Any, filename: str, purpose: str, data: bytes) -> FileObject:
        """``POST /v1/files``: a batch input file, validated line by line, or an image for
        edits (vision / user_data), checked from its header; either before it is kept."""
        if purpose not in FILE_PURPOSES:
            raise InvalidRequest(
                f"Invalid 'purpose': this service keeps files for {', '.join(FILE_PURPOSES)} only.", param="purpose"
            )
        limits = self._config.files
        if len(data) > limits.max_bytes:
            raise InvalidRequest(f"Invalid 'file': larger than {limits.max_bytes} bytes.", param="file")
        count: int | None
        if purpose in IMAGE_FILE_PURPOSES:
            kind, _, _ = await asyncio.to_thread(
                sniff_image, data, param="file", policy=image_upload_policy(self._config)
            )
            suffix, content_type = IMAGE_TYPES[kind]
            count = None
        else:
            lines = parse_batch_file(data, max_lines=limits.max_lines, max_line_bytes=limits.max_line_bytes)
            suffix, content_type, count = ".jsonl", "application/jsonl", len(lines)
        name = "".join(c for c in filename if c.isprintable())[:MAX_FILENAME_CHARS] or f"file{suffix}"
        file_id = new_id("file-")
        stored = await self._files.save(f"{file_id}{suffix}", data, content_type)
        now = self._clock()
        row = FileRow(
            id=file_id,
            key_id=key.id,
            filename=name,
            purpose=purpose,
            bytes=len(data),
            created_at=now,
            expires_at=now + limits.retention_s,
            stored=stored,
            lines=count,
        )
        try:
            row = await self._run(self._store.add_file, row)
        except BaseException:
            await self._forget_object(stored)
            raise
        return file_object(row)

    async def _forget_object(self, stored: str) -> None:
        try:
            await self._files.delete(stored)
        except StorageError:
            pass

    async def _file(self, key: Any, file_id: str) -> FileRow:
        row = await self._run(self._store.file, key.id, file_id)
        if row is None:
            raise NotFound(f"No such File object: {file_id[:128]}", param="file_id")
        return row

    async def retrieve_file(self, key: Any, file_id: str) -> FileObject:
        return file_object(await self._file(key, file_id))

    async def file_content(self, key: Any, file_id: str) -> bytes:
        row = await self._file(key, file_id)
        try:
            return await self._files.load(row.stored)
        except StorageError:
            raise NotFound(f"The content of file {file_id} is no longer stored.", param="file_id") from None

    async def list_files(
        self, key: Any, *, after: str | None, limit: str | None, order: str | None, purpose: str | None
    ) -> FileList:
        if order not in (None, "asc", "desc"):
            raise InvalidRequest("Invalid 'order': asc or desc.", param="order")
        rows, more = await self._run(
            self._store.list_files,
            key.id,
            after=after,
            limit=_limit(limit, 10_000, 10_000),
            descending=order != "asc",
            purpose=purpose,
        )
        data = [file_object(row) for row in rows]
        return FileList(
            data=data,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
            has_more=more,
        )

    async def delete_file(self, key: Any, file_id: str) -> FileDeleted:
        row = await self._run(self._store.delete_file, key.id, file_id)
        if row is None:
            raise NotFound(f"No such File object: {file_id[:128]}", param="file_id")
        await self._forget_object(row.stored)
        return FileDeleted(id=row.id)

    # -- batches -----------------------------------------------------------------------
    async def create_batch(self, key: Any, payload: object) -> BatchObject:
        """``POST /v1/batches``: the input file's lines become the batch's rows, in one
        transaction. Lines that name another endpoint than the batch's fail the batch
        (``failed``, with an error per line), as OpenAI's validation does."""
        request = parse_batch_create(payload)
        source = await self._run(self._store.file, key.id, request.input_file_id)
        if source is None:
            raise NotFound(f"No such File object: {request.input_file_id[:128]}", param="input_file_id")
        if source.purpose != "batch":
            raise InvalidRequest(
                "Invalid 'input_file_id': the file was not uploaded for purpose batch.", param="input_file_id"
            )
        try:
            data = await self._files.load(source.stored)
        except StorageError:
            raise NotFound("The input file is no longer stored.", param="input_file_id") from None
        limits = self._config.files
        parsed = parse_batch_file(data, max_lines=limits.max_lines, max_line_bytes=limits.max_line_bytes)
        errors = [
            {
                "code": "invalid_url",
                "message": f"The line's url {line.url} is not the batch's endpoint {request.endpoint}.",
                "param": "url",
                "line": number,
            }
            for number, line in parsed
            if line.url != request.endpoint
        ]
        models = {line.body.get("model") for _, line in parsed}
        model = next(iter(models)) if len(models) == 1 and isinstance(next(iter(models)), str) else None
        lines = [
            NewLine(line_no=number, custom_id=line.custom_id, body=json.dumps(line.body, separators=(",", ":")))
            for number, line in parsed
        ]
        row = await self._run(
            self._store.create_batch,
            key_id=key.id,
            endpoint=request.endpoint,
            input_file_id=source.id,
            completion_window=request.completion_window,
            expires_at=self._clock() + self._config.batches.completion_window_s,
            metadata=request.metadata,
            model=model,
            lines=lines,
            errors=errors[:1000] or None,
        )
        return batch_object(row)

    async def retrieve_batch(self, key: Any, batch_id: str) -> BatchObject:
        row = await self._run(self._store.batch, key.id, batch_id)
        if row is None:
            raise NotFound(f"No such Batch object: {batch_id[:128]}", param="batch_id")
        return batch_object(row)

    async def list_batches(self, key: Any, *, after: str | None, limit: str | None) -> BatchList:
        rows, more = await self._run(self._store.list_batches, key.id, after=after, limit=_limit(limit, 20, 100))
        data = [batch_object(row) for row in rows]
        return BatchList(
            data=data,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
            has_more=more,
        )

    async def cancel_batch(self, key: Any, batch_id: str) -> BatchObject:
        row = await self._run(self._store.cancel, key.id, batch_id)
        if row is None:
            raise NotFound(f"No such Batch object: {batch_id[:128]}", param="batch_id")
        return batch_object(row)

    def close(self) -> None:
        self._executor.shutdown(wait=False)


__all__ = ["BatchService", "batch_object", "file_object", "image_upload_policy"]
