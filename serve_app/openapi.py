"""The service's OpenAPI document, served at ``/openapi.json`` (and shown at ``/docs`` when
the config's ``api_docs`` is true).

FastAPI generates paths from route signatures, but the routes here read their bodies
themselves (a JSON body goes through ``protocol.parse_generation_request`` so that every
problem is a 400 naming its field; an edits form is size-bounded before it is parsed) and
answer errors through ``http_errors``. So FastAPI sees no request models, documents a 422
the service never sends, and none of the errors it does send. ``install_openapi`` keeps
FastAPI's generated paths as the base (operation ids, path parameters, summaries) and puts
the real contract on them, generated from the wire models in ``serve_app.protocol``: the
request bodies, the 200 bodies and headers, and each route's error statuses with the
``ErrorResponse`` schema. The only hand-written shapes are the multipart encoding of the
edits form (its file parts), the signed image URL's parameters, and headers.

Call ``install_openapi(api)`` once on the ingress's FastAPI object; it is idempotent and
the document is built on first use, so it may run before or after the routes exist.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from serve_app.errors import APIError
from serve_app.protocol import (
    ErrorResponse,
    ImageEditRequest,
    ImageGenerationRequest,
    ImagesResponse,
    ImageVariationRequest,
    ModelCard,
    ModelList,
)

SECURITY_SCHEME = "bearerAuth"
REF_PREFIX = "#/components/schemas/"
ERROR_SCHEMA_REF = {"$ref": f"{REF_PREFIX}ErrorResponse"}

# The wire models, and the mode their schema is generated in (what a client sends is
# validated; what it receives is serialized).
_MODELS: tuple[tuple[type[BaseModel], str], ...] = (
    (ImageGenerationRequest, "validation"),
    (ImagesResponse, "serialization"),
    (ModelList, "serialization"),
    (ModelCard, "serialization"),
    (ErrorResponse, "serialization"),
)

# What each error status means on this service (README's and DESIGN.md's error tables); the
# codes that answer with it are appended from ``serve_app.errors``.
_REASONS: dict[int, str] = {
    400: "The request failed validation; `param` names the field. Also a POST with no body, or a body not of "
    "the operation's media type (JSON for generations, multipart/form-data for edits).",
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

_STRING = {"type": "string"}
_BINARY = {"type": "string", "format": "binary"}
_REQUEST_ID = {
    "x-request-id": {"description": "The request's id, also in an error body's `request_id`.", "schema": _STRING}
}
_RETRY_AFTER = {"retry-after": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}}
_RATE_LIMIT_HEADERS = {
    f"x-ratelimit-{what}-{unit}": {"description": f"Per-key rate limit: {what} {unit}.", "schema": _STRING}
    for unit in ("requests", "images")
    for what in ("limit", "remaining", "reset")
}
_CREDIT_HEADERS = {
    "x-credits-charged": {
        "description": "Credits charged for this request (exact decimal).",
        "required": True,
        "schema": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"},
    },
    "x-credits-remaining": {
        "description": "The key's balance after this request (exact decimal).",
        "required": True,
        "schema": {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]+)?$"},
    },
}
_IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "Makes a retry of this request return the first outcome without a second charge.",
    "schema": _STRING,
}
_IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp")

_POST_ERRORS = (400, 401, 402, 403, 404, 408, 409, 413, 429, 500, 502, 503, 504)
_KEY_ONLY_ERRORS = (401, 500, 503)


@dataclass(frozen=True)
class _Contract:
    """What one operation really takes and answers."""

    # The 200 response, given the operation FastAPI generated.
    ok: Callable[[dict[str, Any]], dict[str, Any]]
    errors: tuple[int, ...]
    secured: bool = True
    request_body: Callable[[], dict[str, Any]] | None = None
    parameters: Callable[[], list[dict[str, Any]]] | None = None
    # Per-operation wording of an error status, where the general one does not fit.
    reasons: dict[int, str] = field(default_factory=dict)
    # HEAD: the same statuses and headers, never a body.
    bodiless: bool = False
    description: str | None = None


def install_openapi(api: FastAPI) -> None:
    """Make ``api.openapi()`` (and so ``/openapi.json`` and ``/docs``) return the real
    contract. Idempotent; the document is built on first use and cached until FastAPI's
    own route set changes."""
    if getattr(api.openapi, "_imagegen_openapi", False):
        return
    cache: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        base = FastAPI.openapi(api)  # FastAPI's own, cached by FastAPI per route set
        if cache.get("base") is not base:
            cache["document"] = build_document(base)
            cache["base"] = base
        return cache["document"]

    openapi._imagegen_openapi = True  # type: ignore[attr-defined]
    api.openapi = openapi  # type: ignore[method-assign]


def build_document(base: dict[str, Any]) -> dict[str, Any]:
    """The contract, from FastAPI's generated document ``base`` (left untouched)."""
    document = copy.deepcopy(base)
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas.update(_model_schemas())
    components["securitySchemes"] = {
        SECURITY_SCHEME: {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "qbt_...",
            "description": "An API key (`qbt_...`) from `imagegen keys create`.",
        }
    }
    paths = document.setdefault("paths", {})
    for (method, path), contract in CONTRACTS.items():
        item = paths.setdefault(path, {})
        if method not in item:  # a method FastAPI does not list (HEAD): start from GET's
            item[method] = _derived_operation(item.get("get", {}), method, path)
        _apply(item[method], contract)
    for item in paths.values():
        for operation in item.values():
            if isinstance(operation, dict):
                operation.get("responses", {}).pop("422", None)  # never sent
    _unique_operation_ids(paths)
    for unused in ("HTTPValidationError", "ValidationError"):  # FastAPI's, for the 422
        if unused in schemas and not _referenced(document, unused):
            del schemas[unused]
    return document


# --- per-operation contracts --------------------------------------------------------------


def _json_body(model: type[BaseModel]) -> Callable[[], dict[str, Any]]:
    return lambda: {"required": True, "content": {"application/json": {"schema": _ref(model)}}}


def _edit_form() -> dict[str, Any]:
    """OpenAI's multipart form for edits: the file parts, and ``ImageEditRequest``'s fields
    as form fields (a form field is never null: left out, it takes its default)."""
    fields = ImageEditRequest.model_json_schema(mode="validation")
    if "$defs" in fields:  # a form field is text: a nested model would need an encoding of its own
        raise RuntimeError("ImageEditRequest has nested models; document their multipart encoding")
    properties: dict[str, Any] = {name: _form_field(schema) for name, schema in fields["properties"].items()}
    properties["image"] = {
        **_BINARY,
        "description": "The input image (png, jpeg or webp). More than one: repeat `image[]` instead.",
    }
    properties["image[]"] = {
        "type": "array",
        "items": _BINARY,
        "description": "Input images, for models that take several (OpenAI allows up to 16).",
    }
    properties["mask"] = {
        **_BINARY,
        "description": "A PNG of the image's size; its fully transparent pixels mark what to change.",
    }
    schema = {
        "title": "ImageEditForm",
        "type": "object",
        "properties": properties,
        "required": ["image", "prompt"],
        "additionalProperties": False,
    }
    image_types = ", ".join(_IMAGE_TYPES)
    encoding = {
        "image": {"contentType": image_types},
        "image[]": {"contentType": image_types},
        "mask": {"contentType": "image/png"},
    }
    return {"required": True, "content": {"multipart/form-data": {"schema": schema, "encoding": encoding}}}


# Fields of ImageVariationRequest (inherited from generations) that a variation refuses.
_NOT_VARIATION_FIELDS = ("prompt", "image", "stream", "partial_images", "enhance_prompt")


def _variation_form() -> dict[str, Any]:
    """OpenAI's multipart form for variations: one ``image`` file, and
    ``ImageVariationRequest``'s fields as form fields (no prompt: a variation has none)."""
    fields = ImageVariationRequest.model_json_schema(mode="validation")
    if "$defs" in fields:
        raise RuntimeError("ImageVariationRequest has nested models; document their multipart encoding")
    properties: dict[str, Any] = {
        name: _form_field(schema) for name, schema in fields["properties"].items() if name not in _NOT_VARIATION_FIELDS
    }
    properties["image"] = {**_BINARY, "description": "The image to make variations of (png, jpeg or webp)."}
    schema = {
        "title": "ImageVariationForm",
        "type": "object",
        "properties": properties,
        "required": ["image"],
        "additionalProperties": False,
    }
    encoding = {"image": {"contentType": ", ".join(_IMAGE_TYPES)}}
    return {"required": True, "content": {"multipart/form-data": {"schema": schema, "encoding": encoding}}}


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


def _images_ok(_: dict[str, Any]) -> dict[str, Any]:
    response = _json_ok(ImagesResponse, {**_CREDIT_HEADERS, **_RATE_LIMIT_HEADERS}, "The generated images.")
    response["description"] += (
        " With `stream: true`, server-sent events instead (OpenAI's image streaming, serve_app/streaming.py):"
        " `image_generation.partial_image` / `image_edit.partial_image` previews, one `*.completed` event per"
        " image, and an `error` event if generation fails after the stream started. The credit headers are then"
        " replaced by `x-credits-reserved`; each completed event carries `credits_charged` and `credits_remaining`."
    )
    response["content"]["text/event-stream"] = {"schema": _STRING}
    return response


def _json_ok(model: type[BaseModel], headers: dict[str, Any] | None = None, description: str = "OK") -> dict[str, Any]:
    return {
        "description": description,
        "headers": {**_REQUEST_ID, **(headers or {})},
        "content": {"application/json": {"schema": _ref(model)}},
    }


def _usage_ok(_: dict[str, Any]) -> dict[str, Any]:
    return {
        "description": "The key's balance, reserved credits, and images and credits by model.",
        "headers": dict(_REQUEST_ID),
        "content": {"application/json": {"schema": {"type": "object", "title": "Usage"}}},
    }


def _health_ok(operation: dict[str, Any]) -> dict[str, Any]:
    generated = operation.get("responses", {}).get("200", {})
    return {**generated, "description": "The ingress is up.", "headers": dict(_REQUEST_ID)}


def _image_ok(_: dict[str, Any]) -> dict[str, Any]:
    return {
        "description": "The stored image.",
        "headers": {
            **_REQUEST_ID,
            "cache-control": {"description": "`private`, cacheable until the URL expires.", "schema": _STRING},
        },
        "content": {content_type: {"schema": _BINARY} for content_type in _IMAGE_TYPES},
    }


def _image_parameters() -> list[dict[str, Any]]:
    return [
        {"name": "name", "in": "path", "required": True, "schema": _STRING, "description": "The stored image's name."},
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
            "schema": _STRING,
        },
    ]


_IMAGE_REASONS = {
    403: "The URL's signature is missing or wrong, or the URL has expired (`forbidden`).",
    404: "No such image (deleted after its retention time), or images are served by the object store (`not_found`).",
}
_IMAGE_ROUTE = "/v1/files/images/{name}"
# Where no model is involved, a 503 is Serve's own: the ingress is overloaded or restarting.
_NO_MODEL_503 = {503: "The service cannot take the request now (overloaded or restarting); retry later."}

# (method, path) as FastAPI writes them (a ``{x:path}`` parameter is ``{x}``) -> contract.
CONTRACTS: dict[tuple[str, str], _Contract] = {
    ("get", "/health"): _Contract(ok=_health_ok, errors=(500, 503), secured=False, reasons=_NO_MODEL_503),
    ("get", "/v1/models"): _Contract(ok=lambda _: _json_ok(ModelList), errors=_KEY_ONLY_ERRORS, reasons=_NO_MODEL_503),
    ("get", "/v1/models/{model_id}"): _Contract(
        ok=lambda _: _json_ok(ModelCard), errors=(401, 403, 404, 500, 503), reasons=_NO_MODEL_503
    ),
    ("get", "/v1/usage"): _Contract(ok=_usage_ok, errors=_KEY_ONLY_ERRORS, reasons=_NO_MODEL_503),
    ("get", _IMAGE_ROUTE): _Contract(
        ok=_image_ok,
        errors=(403, 404, 500, 503),
        secured=False,
        parameters=_image_parameters,
        reasons={**_IMAGE_REASONS, **_NO_MODEL_503},
        description="A stored image (`response_format: url`). The URL's signature is the authorization, not a key.",
    ),
    ("head", _IMAGE_ROUTE): _Contract(
        ok=_image_ok,
        errors=(403, 404, 500, 503),
        secured=False,
        parameters=_image_parameters,
        reasons={**_IMAGE_REASONS, **_NO_MODEL_503},
        bodiless=True,
        description="The headers `GET` would send for this image, without the body.",
    ),
    ("post", "/v1/images/generations"): _Contract(
        ok=_images_ok,
        errors=_POST_ERRORS,
        request_body=_json_body(ImageGenerationRequest),
        parameters=lambda: [dict(_IDEMPOTENCY_KEY)],
        description="Text-to-image, or image-to-image with `image` (OpenAI's images API plus extensions).",
    ),
    ("post", "/v1/images/edits"): _Contract(
        ok=_images_ok,
        errors=_POST_ERRORS,
        request_body=_edit_form,
        parameters=lambda: [dict(_IDEMPOTENCY_KEY)],
        description="Image-to-image, or inpainting with a `mask` (OpenAI's multipart edits form).",
    ),
    ("post", "/v1/images/variations"): _Contract(
        ok=lambda _: _json_ok(ImagesResponse, {**_CREDIT_HEADERS, **_RATE_LIMIT_HEADERS}, "The generated images."),
        errors=_POST_ERRORS,
        request_body=_variation_form,
        parameters=lambda: [dict(_IDEMPOTENCY_KEY)],
        description="Variations of an image: image-to-image with an empty prompt at the model's "
        "`defaults.variation_strength` (OpenAI's multipart variations form).",
    ),
}


def _apply(operation: dict[str, Any], contract: _Contract) -> None:
    if contract.description:
        operation["description"] = contract.description
    if contract.parameters is not None:
        _merge_parameters(operation, contract.parameters())
    if contract.request_body is not None:
        operation["requestBody"] = contract.request_body()
    responses: dict[str, Any] = {"200": contract.ok(operation)}
    for status in contract.errors:
        responses[str(status)] = _error_response(status, contract.reasons.get(status))
    if contract.bodiless:
        responses = {status: _without_body(response) for status, response in responses.items()}
    operation["responses"] = responses
    if contract.secured:
        operation["security"] = [{SECURITY_SCHEME: []}]
    else:
        operation.pop("security", None)


def _merge_parameters(operation: dict[str, Any], parameters: list[dict[str, Any]]) -> None:
    """Replace FastAPI's parameters of the same name and place, add the others."""
    ours = {(parameter["name"].lower(), parameter["in"]) for parameter in parameters}
    kept = [p for p in operation.get("parameters", []) if (p["name"].lower(), p["in"]) not in ours]
    operation["parameters"] = kept + parameters


def _derived_operation(get: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    """An operation FastAPI did not generate (HEAD on a GET route), named after GET's."""
    derived: dict[str, Any] = {"summary": f"{get.get('summary', path)} ({method.upper()})"}
    if "operationId" in get:
        derived["operationId"] = _METHOD_SUFFIX.sub("", get["operationId"]) + f"_{method}"
    if "parameters" in get:
        derived["parameters"] = copy.deepcopy(get["parameters"])
    return derived


_METHOD_SUFFIX = re.compile(r"_(get|put|post|delete|options|head|patch|trace)$")


def _unique_operation_ids(paths: dict[str, Any]) -> None:
    """One route serving several methods (GET and HEAD) gets one operation id from FastAPI
    for all of them; an id must be unique, so such ids end in their own method."""
    seen: dict[str, int] = {}
    for item in paths.values():
        for operation in item.values():
            if isinstance(operation, dict) and "operationId" in operation:
                seen[operation["operationId"]] = seen.get(operation["operationId"], 0) + 1
    for item in paths.values():
        for method, operation in item.items():
            if isinstance(operation, dict) and seen.get(operation.get("operationId", ""), 0) > 1:
                operation["operationId"] = _METHOD_SUFFIX.sub("", operation["operationId"]) + f"_{method}"


def _error_response(status: int, reason: str | None) -> dict[str, Any]:
    """An error status: a route's own wording (which names its codes), or the general one
    with the codes of ``serve_app.errors`` that no route claims for itself."""
    description = reason
    if description is None:
        description = _REASONS[status]
        claimed = {code for contract in CONTRACTS.values() for code in _named_codes(contract.reasons.get(status, ""))}
        codes = [code for code in _codes_for(status) if code not in claimed]
        if codes:
            description += " Codes: " + ", ".join(f"`{code}`" for code in codes) + "."
    headers = dict(_REQUEST_ID)
    if status in (429, 503):
        headers.update(_RETRY_AFTER)
    if status == 429:
        headers.update(_RATE_LIMIT_HEADERS)
    return {
        "description": description,
        "headers": headers,
        "content": {"application/json": {"schema": ERROR_SCHEMA_REF}},
    }


def _without_body(response: dict[str, Any]) -> dict[str, Any]:
    headers = dict(response.get("headers", {}))
    content = response.get("content", {})
    if content and "content-type" not in headers:
        headers["content-type"] = {"description": "What GET would send: " + ", ".join(content), "schema": _STRING}
    return {"description": response["description"], "headers": headers}


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


# --- schemas --------------------------------------------------------------------------------


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"{REF_PREFIX}{model.__name__}"}


def _model_schemas() -> dict[str, Any]:
    """The wire models' JSON schemas, their refs pointing into components/schemas."""
    _, top = models_json_schema(list(_MODELS), ref_template=REF_PREFIX + "{model}")
    schemas = top.get("$defs", {})
    missing = [model.__name__ for model, _ in _MODELS if model.__name__ not in schemas]
    if missing:  # a name changed by pydantic (an -Input/-Output split) would break the refs
        raise RuntimeError(f"wire models without a schema of their own name: {missing}")
    return schemas


def _referenced(document: dict[str, Any], name: str) -> bool:
    """Whether anything but ``name``'s own schema refers to it."""
    schemas = document["components"]["schemas"]
    others = {
        **document,
        "components": {**document["components"], "schemas": {k: v for k, v in schemas.items() if k != name}},
    }
    return f'"{REF_PREFIX}{name}"' in json.dumps(others)


__all__ = ["CONTRACTS", "build_document", "install_openapi"]


# The Batch API's operations and wire models (serve_app/batches/openapi.py), built on the
# helpers above.
from serve_app.batches.openapi import batch_contracts, batch_models

_MODELS += batch_models()
CONTRACTS.update(batch_contracts())
