"""The Batch API's declarations for the API document, used on its routes' decorators in
``serve_app.ingress`` (the helpers are ``serve_app.openapi``'s)."""

from __future__ import annotations

from typing import Any

from serve_app.batches.protocol import BatchCreateRequest
from serve_app.openapi import BATCH_REASONS, BINARY, errors, json_body, ok, operation

BATCH_ERRORS = errors(400, 401, 404, 500, 503, reasons=BATCH_REASONS)
UPLOAD_ERRORS = errors(400, 401, 408, 413, 500, 503, reasons=BATCH_REASONS)
CREATE_BATCH_ERRORS = errors(400, 401, 404, 408, 413, 500, 503, reasons=BATCH_REASONS)


def _query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


_AFTER = _query("after", "A cursor: the id of the last object of the previous page.", {"type": "string"})

UPLOAD = operation(
    {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "title": "FileUploadForm",
                    "type": "object",
                    "properties": {
                        "file": {
                            **BINARY,
                            "description": "batch: the JSONL file, one request per line. vision or user_data: "
                            "a PNG, JPEG or WEBP image that edits name by file_id.",
                        },
                        "purpose": {"type": "string", "enum": ["batch", "vision", "user_data"]},
                    },
                    "required": ["file", "purpose"],
                    "additionalProperties": False,
                }
            }
        },
    }
)
LIST_FILES = operation(
    parameters=[
        _AFTER,
        _query("limit", "1 to 10000 (default 10000).", {"type": "integer", "minimum": 1, "maximum": 10000}),
        _query("order", "By creation: asc or desc (default).", {"type": "string", "enum": ["asc", "desc"]}),
        _query("purpose", "Only files of this purpose.", {"type": "string"}),
    ]
)
CREATE_BATCH = operation(json_body(BatchCreateRequest))
LIST_BATCHES = operation(
    parameters=[_AFTER, _query("limit", "1 to 100 (default 20).", {"type": "integer", "minimum": 1, "maximum": 100})]
)
FILE_CONTENT_OK = ok(
    description="The file's bytes (JSONL, or the image as uploaded).",
    content={"application/octet-stream": {"schema": BINARY}},
)

__all__ = [
    "BATCH_ERRORS",
    "CREATE_BATCH",
    "CREATE_BATCH_ERRORS",
    "FILE_CONTENT_OK",
    "LIST_BATCHES",
    "LIST_FILES",
    "UPLOAD",
    "UPLOAD_ERRORS",
]
