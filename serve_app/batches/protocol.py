"""Wire types of ``/v1/files`` and ``/v1/batches``, shaped as openai-python's ``FileObject``,
``FileDeleted``, ``Batch`` and their cursor pages describe them, and the validation of a
batch input file (JSONL, one request per line)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serve_app.edit_inputs import IMAGE_FILE_PURPOSES
from serve_app.errors import InvalidRequest

# The endpoints a batch line may name. Edits take OpenAI's JSON form in a line, as
# ``/v1/images/edits`` does (``images: [{"image_url" | "file_id"}]``, ``mask``).
ENDPOINTS = ("/v1/images/generations", "/v1/images/edits")
# What an upload may be for: a batch input file (JSONL), or an image an edit names by
# ``file_id`` (OpenAI's "vision" and "user_data"). Outputs are "batch_output".
FILE_PURPOSES = ("batch", *IMAGE_FILE_PURPOSES)
MAX_CUSTOM_ID_CHARS = 512
MAX_LISTED_ERRORS = 20  # a 400 names this many malformed lines, then counts the rest


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    expires_at: int | None = None
    filename: str
    purpose: Literal["batch", "batch_output", "vision", "user_data"]
    status: Literal["uploaded", "processed", "error"] = "processed"
    status_details: str | None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class BatchRequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchError(BaseModel):
    code: str | None = None
    message: str | None = None
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


BatchStatus = Literal[
    "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
]


class BatchObject(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    model: str | None = None
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: BatchRequestCounts
    metadata: dict[str, str] | None = None


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class BatchCreateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    input_file_id: str = Field(min_length=1, max_length=128)
    endpoint: str = Field(min_length=1, max_length=128)
    completion_window: str = Field(min_length=1, max_length=16)
    metadata: dict[str, str] | None = Field(None, max_length=16)
    output_expires_after: dict[str, Any] | None = None


def parse_batch_create(payload: object) -> BatchCreateRequest:
    from serve_app.protocol import _to_invalid_request

    if not isinstance(payload, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    try:
        request = BatchCreateRequest.model_validate(payload)
    except ValidationError as exc:
        raise _to_invalid_request(exc) from None
    if request.endpoint not in ENDPOINTS:
        raise InvalidRequest(
            f"Invalid 'endpoint': this service batches {' and '.join(ENDPOINTS)}, not {request.endpoint[:64]!r}.",
            param="endpoint",
        )
    if request.completion_window != "24h":
        raise InvalidRequest("Invalid 'completion_window': only '24h' is supported.", param="completion_window")
    for name, value in (request.metadata or {}).items():
        if len(name) > 64 or len(value) > 512:
            raise InvalidRequest(
                "Invalid 'metadata': keys are at most 64 characters, values at most 512.", param="metadata"
            )
    if request.output_expires_after is not None:
        raise InvalidRequest(
            "Invalid 'output_expires_after': not supported; output files live for files.retention_s.",
            param="output_expires_after",
        )
    return request


class BatchLine(BaseModel):
    """One request of a batch input file."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    custom_id: str = Field(min_length=1, max_length=MAX_CUSTOM_ID_CHARS)
    method: Literal["POST"]
    url: str = Field(max_length=128)
    body: dict[str, Any]


def _line_problem(exc: ValidationError) -> str:
    error = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"unexpected field '{where}'"
    if error["type"] == "missing":
        return f"missing '{where}'"
    return f"invalid '{where}': {error['msg'].rstrip('.')}"


def parse_batch_file(data: bytes, *, max_lines: int, max_line_bytes: int) -> list[tuple[int, BatchLine]]:
    """The requests of a batch input file, numbered from 1 as lines of the file; a 400 that
    names every malformed line (the first ``MAX_LISTED_ERRORS`` of them, then a count).
    Blank lines are skipped."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("Invalid 'file': a batch input file is UTF-8 JSONL.", param="file") from None
    problems: list[str] = []
    lines: list[tuple[int, BatchLine]] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        if len(raw.encode()) > max_line_bytes:
            problems.append(f"line {number}: longer than {max_line_bytes} bytes")
            continue
        try:
            value = json.loads(raw)
        except (json.JSONDecodeError, RecursionError):
            problems.append(f"line {number}: not valid JSON")
            continue
        if not isinstance(value, dict):
            problems.append(f"line {number}: not a JSON object")
            continue
        try:
            line = BatchLine.model_validate(value)
        except ValidationError as exc:
            problems.append(f"line {number}: {_line_problem(exc)}")
            continue
        if line.url not in ENDPOINTS:
            problems.append(f"line {number}: url must be one of {', '.join(ENDPOINTS)}")
            continue
        if line.custom_id in seen:
            problems.append(f"line {number}: custom_id duplicates line {seen[line.custom_id]}'s")
            continue
        seen[line.custom_id] = number
        lines.append((number, line))
    if not lines and not problems:
        problems.append("the file holds no requests")
    if len(lines) > max_lines:
        problems.append(f"{len(lines)} requests; a batch takes at most {max_lines}")
    if problems:
        listed = "; ".join(problems[:MAX_LISTED_ERRORS])
        more = len(problems) - MAX_LISTED_ERRORS
        suffix = f"; and {more} more" if more > 0 else ""
        raise InvalidRequest(f"Invalid 'file': {listed}{suffix}.", param="file")
    return lines


__all__ = [
    "ENDPOINTS",
    "FILE_PURPOSES",
    "IMAGE_FILE_PURPOSES",
    "BatchCreateRequest",
    "BatchLine",
    "BatchList",
    "BatchObject",
    "FileDeleted",
    "FileList",
    "FileObject",
    "parse_batch_create",
    "parse_batch_file",
]
