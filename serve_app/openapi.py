"""Declarations for the API document, used on the route decorators of ``serve_app.ingress``.

FastAPI writes ``/openapi.json`` from the routes; each route declares, beside itself, what
FastAPI cannot see in its signature (vLLM's style):

- its request body, generated from the pydantic wire models in ``serve_app.protocol``
  (``json_body`` / ``form_body``, passed as ``openapi_extra``). The routes read their bodies
  themselves: authentication comes first and the read is bounded in size and time
  (``serve_app.ingress.read_body``), which a body parameter in the signature would not
  allow (FastAPI reads and parses a declared body before any dependency or handler runs);
- its answers: ``ok(...)`` for the 200 (its model, headers, and for ``stream: true`` the
  server-sent events as objects, ``image_events``) and ``errors(...)`` for the statuses it
  sends, each with the ``ErrorResponse`` model;
- ``SECURED``, FastAPI's own bearer scheme, on every route that takes an API key.

``install_openapi(api)`` then only does what applies to every route alike: the component
schemas of models that the declarations refer to, no 422 (the routes never send FastAPI's
validation error), a HEAD operation without bodies, and unique operation ids.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable
from typing import Any, Literal

from fastapi import FastAPI, Security
from fastapi.security import HTTPBearer
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from serve_app.errors import APIError
from serve_app.protocol import ErrorResponse, ImageEditRequest, ImagesResponse, ImageVariationRequest
from serve_app.streaming import CompletedEvent, PartialImageEvent, StreamErrorEvent

SECURITY_SCHEME = "bearerAuth"
REF_PREFIX = "#/components/schemas/"

# FastAPI's bearer scheme, for the document only: ``auto_error=False`` never answers for the
# route, which authenticates itself (serve_app.serving) with the documented 401s.
BEARER = HTTPBearer(
    auto_error=False,
    scheme_name=SECURITY_SCHEME,
    bearerFormat="qbt_...",
    description="An API key (`qbt_...`) from `imagegen keys create`.",
)
SECURED = [Security(BEARER)]

# What each error status means on this service (README's and DESIGN.md's error tables); the
# codes of ``serve_app.errors`` that answer with it are appended, less those that a route's
# own wording (``*_REASONS`` below) claims.
_REASONS: dict[int, str] = {
    400: "The request failed validation; `param` names the field. Also a POST with no body, or a body not of "
    "the operation's media type.",
    401: "No Bearer key, or an unknown or revoked one.",
    402: "The key's credits cannot cover the images asked for.",
    403: "The key may not use this model.",
    404: "No such model (`param`: model).",
    408: "The request body did not all arrive within the configured deadline (`body_read_timeout_s`); "
    "the connection is closed.",
    409: "A request with the same Idempotency-Key is still running, or had a different body.",
    413: "The request body is larger than the configured limit.",
    429: "The key's per-minute request or image limit was hit; `Retry-After` says when to retry.",
    500: "A bug on the server, logged with the request id.",
    502: "The model replica failed or returned something unusable.",
    503: "No replica can take the request now (still loading, waiting for a GPU, or overloaded); "
    "`Retry-After` says when to retry.",
    504: "Generation outran the model's deadline.",
}

# Route-specific wordings (they name the codes they claim).
NO_MODEL_503 = {503: "The service cannot take the request now (overloaded or restarting); retry later."}
IMAGE_REASONS = {
    403: "The URL's signature is missing or wrong, or the URL has expired (`forbidden`).",
    404: "No such image (deleted after its retention time), or images are served by the object store (`not_found`).",
    **NO_MODEL_503,
}
BATCH_REASONS = {
    **NO_MODEL_503,
    404: "No such file or batch for this key (`not_found`; another key's ids are unknown here too).",
    400: "The request failed validation; `param` names the field. An upload names every malformed line.",
}
_SPECIFIC_REASONS = (NO_MODEL_503, IMAGE_REASONS, BATCH_REASONS)

IMAGE_ERRORS = (400, 401, 402, 403, 404, 408, 409, 413, 429, 500, 502, 503, 504)
KEY_ONLY_ERRORS = (401, 500, 503)

STRING = {"type": "string"}
BINARY = {"type": "string", "format": "binary"}
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp")
REQUEST_ID = {
    "x-request-id": {"description": "The request's id, also in an error body's `request_id`.", "schema": STRING}
}
_RETRY_AFTER = {"retry-after": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}}
RATE_LIMIT_HEADERS = {
    f"x-ratelimit-{what}-{unit}": {"description": f"Per-key rate limit: {what} {unit}.", "schema": STRING}
    for unit in ("requests", "images")
    for what in ("limit", "remaining", "reset")
}
# One 200 answers both a JSON body and (``stream: true``) events, and OpenAPI's headers are
# per status, not per media type: so none of these is required, and each says when it is sent.
CREDIT_HEADERS = {
    "x-credits-charged": {
        "description": "Credits charged for this request (exact decimal). On JSON answers; a stream's "
        "`*.completed` events carry `credits_charged` instead.",
        "schema": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"},
    },
    "x-credits-remaining": {
        "description": "The key's balance after this request (exact decimal). On JSON answers; a stream's "
        "`*.completed` events carry `credits_remaining` instead.",
        "schema": {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]+)?$"},
    },
    "x-credits-reserved": {
        "description": "On `stream: true` answers: the credits held for the request when the stream starts "
        "(n x price); what is not delivered is refunded when it ends.",
        "schema": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"},
    },
    "x-prompt-enhancement": {"description": "With `enhance_prompt`: how the prompt was enhanced.", "schema": STRING},
    "x-images-flagged": {
        "description": "How many images the safety checker withheld (only when it withheld some).",
        "schema": {"type": "integer", "minimum": 1},
    },
}
IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "Makes a retry of this request return the first outcome without a second charge.",
    "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": r"^[\x21-\x7e]+$"},
}

# Models that declarations refer to by ``$ref`` without FastAPI seeing them (request bodies,
# event payloads), and the mode of their schema; ``install_openapi`` adds their schemas.
_REFERENCED: dict[str, tuple[type[BaseModel], Literal["validation", "serialization"]]] = {}


def schema_ref(model: type[BaseModel], mode: Literal["validation", "serialization"] = "validation") -> dict[str, str]:
    """``{"$ref": ...}`` to ``model``'s schema in components/schemas, which ``install_openapi`` adds."""
    _REFERENCED[model.__name__] = (model, mode)
    return {"$ref": f"{REF_PREFIX}{model.__name__}"}


# --- request bodies -------------------------------------------------------------------------


def operation(body: dict[str, Any] | None = None, parameters: Iterable[dict[str, Any]] = ()) -> dict[str, Any]:
    """A route's ``openapi_extra``: its request body and the parameters it reads itself."""
    extra: dict[str, Any] = {}
    if body is not None:
        extra["requestBody"] = body
    if parameters:
        extra["parameters"] = [copy.deepcopy(parameter) for parameter in parameters]
    return extra


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """A required ``application/json`` body of ``model``."""
    return {"required": True, "content": {"application/json": {"schema": schema_ref(model)}}}


def form_body(
    model: type[BaseModel],
    *,
    title: str,
    files: dict[str, dict[str, Any]],
    required: Iterable[str],
    exclude: Iterable[str] = (),
    encoding: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A required ``multipart/form-data`` body: ``model``'s fields as text fields (a form field
    is never null: left out, it takes its default), less ``exclude``, plus the ``files`` parts."""
    fields = model.model_json_schema(mode="validation")
    if "$defs" in fields:  # a form field is text: a nested model would need an encoding of its own
        raise RuntimeError(f"{model.__name__} has nested models; document their multipart encoding")
    skipped = set(exclude) | set(files)
    properties = {name: _form_field(schema) for name, schema in fields["properties"].items() if name not in skipped}
    properties.update(files)
    schema = {
        "title": title,
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }
    media: dict[str, Any] = {"schema": schema}
    if encoding:
        media["encoding"] = {name: {"contentType": content_type} for name, content_type in encoding.items()}
    return {"required": True, "content": {"multipart/form-data": media}}


def merged_bodies(*bodies: dict[str, Any]) -> dict[str, Any]:
    """One request body that takes any of ``bodies``' media types (edits: multipart or JSON)."""
    content: dict[str, Any] = {}
    for body in bodies:
        content.update(body["content"])
    return {"required": True, "content": content}


def _form_field(schema: dict[str, Any]) -> dict[str, Any]:
    schema = {key: value for key, value in schema.items() if not (key == "default" and value is None)}
    options = schema.get("anyOf")
    if options is not None:
        options = [option for option in options if option != {"type": "null"}]
        del schema["anyOf"]
        if len(options) == 1:
            schema.update(options[0])
        else:
            schema["anyOf"] = options
    return schema


# --- answers --------------------------------------------------------------------------------


def ok(
    model: type[BaseModel] | None = None,
    *,
    description: str = "OK",
    headers: dict[str, Any] | None = None,
    content: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A 200 for ``responses=``: ``model`` as JSON (FastAPI writes its schema), other media
    types in ``content``, and its headers (``x-request-id`` on every answer)."""
    response: dict[str, Any] = {"description": description, "headers": {**REQUEST_ID, **(headers or {})}}
    if model is not None:
        response["model"] = model
    if content is not None:
        response["content"] = content
    return response


def image_events(prefix: Literal["image_generation", "image_edit"]) -> dict[str, Any]:
    """The ``text/event-stream`` answer to ``stream: true``: each event an object, named by its
    ``event:`` line, whose ``data:`` is the JSON of the event's model (serve_app/streaming.py).
    Written as OpenAPI 3.2 writes an event (``event`` / ``data`` with ``contentSchema``) and
    placed under ``schema``, which a 3.1 document reads as one event (as schemathesis does)."""
    events = [
        _event(f"{prefix}.partial_image", PartialImageEvent),
        _event(f"{prefix}.completed", CompletedEvent),
        _event("error", StreamErrorEvent),
    ]
    return {"text/event-stream": {"schema": {"title": f"{prefix} events", "oneOf": events}}}


def _event(name: str, model: type[BaseModel]) -> dict[str, Any]:
    return {
        "title": name,
        "type": "object",
        "required": ["event", "data"],
        "properties": {
            "event": {"const": name},
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                # Inlined, no $ref: a ref inside contentSchema is resolved by few tools (not by
                # schemathesis past the first level).
                "contentSchema": {"allOf": [_inlined(model), {"properties": {"type": {"const": name}}}]},
            },
            "id": STRING,
            "retry": {"type": "integer"},
        },
    }


def _inlined(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s serialization schema with its nested models written in place."""
    schema = model.model_json_schema(mode="serialization")
    definitions = schema.pop("$defs", {})

    def expand(value: Any) -> Any:
        if isinstance(value, dict):
            ref = value.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return expand(definitions[ref.removeprefix("#/$defs/")])
            return {key: expand(item) for key, item in value.items()}
        if isinstance(value, list):
            return [expand(item) for item in value]
        return value

    return expand(schema)


def errors(*statuses: int, reasons: dict[int, str] | None = None) -> dict[int, dict[str, Any]]:
    """The error statuses a route sends, for ``responses=``: each the ``ErrorResponse`` model,
    described by ``reasons`` or the service's general wording (with its codes)."""
    return {status: _error(status, (reasons or {}).get(status)) for status in statuses}


def _error(status: int, reason: str | None) -> dict[str, Any]:
    description = reason
    if description is None:
        description = _REASONS[status]
        claimed = {code for reasons in _SPECIFIC_REASONS for code in _named_codes(reasons.get(status, ""))}
        codes = [code for code in _codes_for(status) if code not in claimed]
        if codes:
            description += " Codes: " + ", ".join(f"`{code}`" for code in codes) + "."
    headers = dict(REQUEST_ID)
    if status in (429, 503):
        headers.update(_RETRY_AFTER)
    if status == 429:
        headers.update(RATE_LIMIT_HEADERS)
    return {"model": ErrorResponse, "description": description, "headers": headers}


def _codes_for(status: int) -> list[str]:
    """The ``code``s of ``serve_app.errors`` that answer with ``status``."""
    codes: list[str] = []
    pending: list[type[APIError]] = [APIError]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls is not APIError and cls.status_code == status and cls.code not in codes:
            codes.append(cls.code)
    return sorted(codes)


def _named_codes(text: str) -> set[str]:
    return set(re.findall(r"`([a-z_]+)`", text))


# --- the image routes' own declarations (used on their decorators) ---------------------------


def images_ok(events: Literal["image_generation", "image_edit"] | None) -> dict[str, Any]:
    """The 200 of an image route: ``ImagesResponse``, and with ``events`` the ``stream: true``
    answer: previews, one ``*.completed`` event per image, an ``error`` event if generation
    fails after the stream started."""
    description = "The generated images."
    if events is not None:
        description += (
            " With `stream: true`, server-sent events instead (OpenAI's image streaming): "
            f"`{events}.partial_image` previews, one `{events}.completed` event per image, and an `error` event "
            "if generation fails after the stream started."
        )
    return ok(
        ImagesResponse,
        description=description,
        headers={**CREDIT_HEADERS, **RATE_LIMIT_HEADERS},
        content=image_events(events) if events is not None else None,
    )


_IMAGE_FILE = {**BINARY, "description": "The input image (png, jpeg or webp). More than one: repeat `image[]` instead."}
EDIT_FORM = form_body(
    ImageEditRequest,
    title="ImageEditForm",
    files={
        "image": _IMAGE_FILE,
        "image[]": {
            "type": "array",
            "items": BINARY,
            "description": "Input images, for models that take several (OpenAI allows up to 16).",
        },
        "mask": {
            **BINARY,
            "description": "A PNG of the image's size; its fully transparent pixels mark what to change.",
        },
    },
    required=("image", "prompt"),
    encoding={"image": ", ".join(IMAGE_TYPES), "image[]": ", ".join(IMAGE_TYPES), "mask": "image/png"},
)
VARIATION_FORM = form_body(
    ImageVariationRequest,
    title="ImageVariationForm",
    files={"image": {**BINARY, "description": "The image to make variations of (png, jpeg or webp)."}},
    required=("image",),
    # Fields inherited from generations that a variation refuses (it has no prompt, no stream).
    exclude=("prompt", "stream", "partial_images", "enhance_prompt"),
    encoding={"image": ", ".join(IMAGE_TYPES)},
)
SIGNED_IMAGE_PARAMETERS = (
    {
        "name": "expires",
        "in": "query",
        "required": True,
        "description": "When the URL expires (Unix seconds), as signed.",
        "schema": {"type": "integer", "minimum": 0},
    },
    {
        "name": "signature",
        "in": "query",
        "required": True,
        "description": "The URL's signature (hex).",
        "schema": STRING,
    },
)
SIGNED_IMAGE_OK = ok(
    description="The stored image.",
    headers={"cache-control": {"description": "`private`, cacheable until the URL expires.", "schema": STRING}},
    content={content_type: {"schema": BINARY} for content_type in IMAGE_TYPES},
)
USAGE_OK = ok(
    description="The key's balance, reserved credits, and images and credits by model.",
    content={"application/json": {"schema": {"type": "object", "title": "Usage"}}},
)


# --- what applies to every route --------------------------------------------------------------


def install_openapi(api: FastAPI) -> None:
    """Make ``api.openapi()`` (``/openapi.json``, ``/docs``) FastAPI's document of the declared
    routes plus the generic steps of ``finish_document``. Idempotent; built on first use and
    cached until FastAPI's own route set changes."""
    if getattr(api.openapi, "_imagegen_openapi", False):
        return
    cache: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        base = FastAPI.openapi(api)  # FastAPI's own, cached by FastAPI per route set
        if cache.get("base") is not base:
            cache["document"] = finish_document(base)
            cache["base"] = base
        return cache["document"]

    openapi._imagegen_openapi = True  # type: ignore[attr-defined]
    api.openapi = openapi  # type: ignore[method-assign]


def finish_document(base: dict[str, Any]) -> dict[str, Any]:
    """FastAPI's document ``base`` (left untouched) with the referenced models' schemas, no
    422, bodiless HEAD operations and unique operation ids."""
    document = copy.deepcopy(base)
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for name, schema in _referenced_schemas().items():
        schemas.setdefault(name, schema)
    for item in document.get("paths", {}).values():
        for method, op in item.items():
            responses = op.get("responses", {})
            responses.pop("422", None)  # never sent: the routes validate themselves
            for response in responses.values():
                # FastAPI's placeholder for a route without a response model: an empty JSON schema.
                content = response.get("content", {})
                if content.get("application/json") == {"schema": {}} and len(content) > 1:
                    del content["application/json"]
            if method == "head":
                op["responses"] = {status: _without_body(r) for status, r in op.get("responses", {}).items()}
    _unique_operation_ids(document.get("paths", {}))
    for unused in ("HTTPValidationError", "ValidationError"):  # FastAPI's, for the 422
        if unused in schemas and not _referenced(document, unused):
            del schemas[unused]
    return document


def _referenced_schemas() -> dict[str, Any]:
    """The schemas of the models ``schema_ref`` handed out, refs pointing into components."""
    if not _REFERENCED:
        return {}
    _, top = models_json_schema(list(_REFERENCED.values()), ref_template=REF_PREFIX + "{model}")
    schemas = top.get("$defs", {})
    missing = [name for name in _REFERENCED if name not in schemas]
    if missing:  # a name changed by pydantic (an -Input/-Output split) would break the refs
        raise RuntimeError(f"models without a schema of their own name: {missing}")
    return schemas


def _without_body(response: dict[str, Any]) -> dict[str, Any]:
    headers = dict(response.get("headers", {}))
    content = response.get("content", {})
    if content and "content-type" not in headers:
        headers["content-type"] = {"description": "What GET would send: " + ", ".join(content), "schema": STRING}
    return {"description": response["description"], "headers": headers}


_METHOD_SUFFIX = re.compile(r"_(get|put|post|delete|options|head|patch|trace)$")


def _unique_operation_ids(paths: dict[str, Any]) -> None:
    """One route serving several methods (GET and HEAD) gets one operation id from FastAPI
    for all of them; an id must be unique, so such ids end in their own method."""
    seen: dict[str, int] = {}
    for item in paths.values():
        for op in item.values():
            if isinstance(op, dict) and "operationId" in op:
                seen[op["operationId"]] = seen.get(op["operationId"], 0) + 1
    for item in paths.values():
        for method, op in item.items():
            if isinstance(op, dict) and seen.get(op.get("operationId", ""), 0) > 1:
                op["operationId"] = _METHOD_SUFFIX.sub("", op["operationId"]) + f"_{method}"


def _referenced(document: dict[str, Any], name: str) -> bool:
    """Whether anything but ``name``'s own schema refers to it."""
    schemas = document["components"]["schemas"]
    others = {
        **document,
        "components": {**document["components"], "schemas": {k: v for k, v in schemas.items() if k != name}},
    }
    return f'"{REF_PREFIX}{name}"' in json.dumps(others)


__all__ = [
    "BEARER",
    "SECURED",
    "errors",
    "finish_document",
    "form_body",
    "image_events",
    "install_openapi",
    "json_body",
    "merged_bodies",
    "ok",
    "operation",
    "schema_ref",
]
