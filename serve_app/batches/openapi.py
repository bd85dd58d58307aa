"""The Batch API's part of the OpenAPI document (``serve_app.openapi`` adds it to its own)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from serve_app.batches.protocol import BatchCreateRequest, BatchList, BatchObject, FileDeleted, FileList, FileObject


def batch_models() -> tuple[tuple[type[BaseModel], str], ...]:
    return (
        (BatchCreateRequest, "validation"),
        (FileObject, "serialization"),
        (FileList, "serialization"),
        (FileDeleted, "serialization"),
        (BatchObject, "serialization"),
        (BatchList, "serialization"),
    )


def _query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


def _upload_form() -> dict[str, Any]:
    schema = {
        "title": "FileUploadForm",
        "type": "object",
        "properties": {
            "file": {"type": "string", "format": "binary", "description": "The JSONL file: one request per line."},
            "purpose": {"type": "string", "enum": ["batch"]},
        },
        "required": ["file", "purpose"],
        "additionalProperties": False,
    }
    return {"required": True, "content": {"multipart/form-data": {"schema": schema}}}


def batch_contracts() -> dict[tuple[str, str], Any]:
    from serve_app import openapi as base

    contract, ok = base._Contract, base._json_ok
    errors = (400, 401, 404, 500, 503)
    reasons = {
        **base._NO_MODEL_503,
        404: "No such file or batch for this key (`not_found`; another key's ids are unknown here too).",
        400: "The request failed validation; `param` names the field. An upload names every malformed line.",
    }
    after = _query("after", "A cursor: the id of the last object of the previous page.", {"type": "string"})

    def content_ok(_: dict[str, Any]) -> dict[str, Any]:
        return {
            "description": "The file's bytes (JSONL).",
            "headers": dict(base._REQUEST_ID),
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }

    return {
        ("post", "/v1/files"): contract(
            ok=lambda _: ok(FileObject),
            errors=(400, 401, 408, 413, 500, 503),
            request_body=_upload_form,
            reasons=reasons,
            description="Upload a Batch API input file (JSONL), validated line by line.",
        ),
        ("get", "/v1/files"): contract(
            ok=lambda _: ok(FileList),
            errors=errors,
            reasons=reasons,
            parameters=lambda: [
                after,
                _query("limit", "1 to 10000 (default 10000).", {"type": "integer", "minimum": 1, "maximum": 10000}),
                _query("order", "By creation: asc or desc (default).", {"type": "string", "enum": ["asc", "desc"]}),
                _query("purpose", "Only files of this purpose.", {"type": "string"}),
            ],
        ),
        ("get", "/v1/files/{file_id}"): contract(ok=lambda _: ok(FileObject), errors=errors, reasons=reasons),
        ("get", "/v1/files/{file_id}/content"): contract(ok=content_ok, errors=errors, reasons=reasons),
        ("delete", "/v1/files/{file_id}"): contract(ok=lambda _: ok(FileDeleted), errors=errors, reasons=reasons),
        ("post", "/v1/batches"): contract(
            ok=lambda _: ok(BatchObject),
            errors=(400, 401, 404, 408, 413, 500, 503),
            request_body=base._json_body(BatchCreateRequest),
            reasons=reasons,
            description="Run every request of an uploaded file in the batch lane, at the batch price.",
        ),
        ("get", "/v1/batches"): contract(
            ok=lambda _: ok(BatchList),
            errors=errors,
            reasons=reasons,
            parameters=lambda: [
                after,
                _query("limit", "1 to 100 (default 20).", {"type": "integer", "minimum": 1, "maximum": 100}),
            ],
        ),
        ("get", "/v1/batches/{batch_id}"): contract(ok=lambda _: ok(BatchObject), errors=errors, reasons=reasons),
        ("post", "/v1/batches/{batch_id}/cancel"): contract(
            ok=lambda _: ok(BatchObject), errors=errors, reasons=reasons
        ),
    }


__all__ = ["batch_contracts", "batch_models"]
