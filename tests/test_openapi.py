"""The OpenAPI document (serve_app.openapi): valid, complete, and generated from the wire
models. No Ray: the routes are on the ingress's FastAPI object once its module is imported."""

from __future__ import annotations

import json

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from serve_app.errors import APIError
from serve_app.openapi import CONTRACTS, SECURITY_SCHEME, install_openapi
from serve_app.protocol import ErrorResponse, ImageEditRequest, ImageGenerationRequest

GENERATIONS = "/v1/images/generations"
EDITS = "/v1/images/edits"
VARIATIONS = "/v1/images/variations"
IMAGE = "/v1/files/images/{name}"
ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
# Every status that README's error table documents, and what only some routes answer.
POST_STATUSES = {"200", "400", "401", "402", "403", "404", "408", "409", "413", "429", "500", "502", "503", "504"}


@pytest.fixture(scope="module")
def api() -> FastAPI:
    from serve_app.ingress import api

    install_openapi(api)
    install_openapi(api)  # idempotent
    return api


@pytest.fixture(scope="module")
def document(api: FastAPI) -> dict:
    return api.openapi()


def operations(document: dict):
    for path, item in document["paths"].items():
        for method, operation in item.items():
            yield method, path, operation


def resolve(document: dict, schema: dict) -> dict:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    return document["components"]["schemas"][ref.removeprefix("#/components/schemas/")]


def test_the_document_is_valid_openapi(document: dict) -> None:
    from openapi_spec_validator import validate

    assert document["openapi"].startswith("3.")
    validate(json.loads(json.dumps(document)))  # as served: plain JSON


def test_it_is_built_once_and_served_at_openapi_json(api: FastAPI, document: dict) -> None:
    # (/docs and /redoc are the ingress's own routes, off by default: tests/test_edge.py.)
    assert api.openapi() is document
    client = TestClient(api)
    assert client.get("/openapi.json").json() == json.loads(json.dumps(document))
    assert "/docs" not in document["paths"] and "/redoc" not in document["paths"]


def test_every_route_has_a_contract(api: FastAPI, document: dict) -> None:
    generated = {(method, path) for path, item in FastAPI.openapi(api)["paths"].items() for method in item}
    assert generated <= set(CONTRACTS), f"routes without a contract in serve_app.openapi: {generated - set(CONTRACTS)}"
    assert {(method, path) for method, path, _ in operations(document)} == set(CONTRACTS)
    assert "head" in document["paths"][IMAGE]


def test_no_422_anywhere(document: dict) -> None:
    for method, path, operation in operations(document):
        assert "422" not in operation["responses"], (method, path)
    assert "HTTPValidationError" not in document["components"]["schemas"]
    assert "HTTPValidationError" not in json.dumps(document)


def test_the_generations_body_is_the_request_model(document: dict) -> None:
    body = document["paths"][GENERATIONS]["post"]["requestBody"]
    assert body["required"] is True
    assert list(body["content"]) == ["application/json"]
    schema = resolve(document, body["content"]["application/json"]["schema"])
    assert list(schema["properties"]) == list(ImageGenerationRequest.model_fields)
    required = {name for name, info in ImageGenerationRequest.model_fields.items() if info.is_required()}
    assert set(schema["required"]) == required == {"prompt"}  # model: the config's default_model
    assert schema["additionalProperties"] is False  # unknown fields are a 400
    assert schema == ImageGenerationRequest.model_json_schema(ref_template="#/components/schemas/{model}")


def test_the_edits_body_is_openais_multipart_form(document: dict) -> None:
    body = document["paths"][EDITS]["post"]["requestBody"]
    assert list(body["content"]) == ["multipart/form-data"]
    schema = body["content"]["multipart/form-data"]["schema"]
    binary = {"type": "string", "format": "binary"}
    props = schema["properties"]
    assert {k: props["image"][k] for k in binary} == binary
    assert {k: props["mask"][k] for k in binary} == binary
    assert props["image[]"]["type"] == "array" and props["image[]"]["items"] == binary
    assert set(schema["required"]) == {"image", "prompt"}
    # The text fields are the edit model's (its `image` travels as the file part).
    assert set(props) - {"image", "image[]", "mask"} == set(ImageEditRequest.model_fields) - {"image"}
    text = {name: props[name] for name in ImageEditRequest.model_fields if name != "image"}
    assert text["n"]["type"] == "integer" and text["guidance"]["type"] == "number"
    assert text["input_fidelity"]["enum"] == ["high", "low"]
    assert '"null"' not in json.dumps(text)  # a form field is left out, never null


def test_the_variations_body_is_openais_multipart_form(document: dict) -> None:
    body = document["paths"][VARIATIONS]["post"]["requestBody"]
    schema = body["content"]["multipart/form-data"]["schema"]
    props = schema["properties"]
    assert {k: props["image"][k] for k in ("type", "format")} == {"type": "string", "format": "binary"}
    assert schema["required"] == ["image"]
    assert {"model", "n", "size", "response_format", "user", "seed", "strength"} <= set(props)
    assert not {"prompt", "stream", "mask", "enhance_prompt"} & set(props)  # a variation has no prompt


@pytest.mark.parametrize("path", [GENERATIONS, EDITS, VARIATIONS])
def test_post_routes(document: dict, path: str) -> None:
    operation = document["paths"][path]["post"]
    assert set(operation["responses"]) == POST_STATUSES
    ok = operation["responses"]["200"]
    assert ok["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ImagesResponse"}
    for header in ("x-credits-charged", "x-credits-remaining"):
        assert ok["headers"][header]["required"] is True
    assert "x-request-id" in ok["headers"]
    (idempotency,) = [p for p in operation["parameters"] if p["name"] == "Idempotency-Key"]
    assert idempotency["in"] == "header" and idempotency["required"] is False


def test_every_error_status_has_the_error_schema(document: dict) -> None:
    for method, path, operation in operations(document):
        errors = {status: r for status, r in operation["responses"].items() if status != "200"}
        assert errors, (method, path)
        for status, response in errors.items():
            assert 400 <= int(status) <= 599, (method, path, status)
            assert response["description"]
            if method == "head":
                assert "content" not in response  # a HEAD answer has no body
            else:
                assert response["content"] == {"application/json": {"schema": ERROR_REF}}, (method, path, status)
        for status in ("429", "503"):
            if status in errors:
                assert "retry-after" in errors[status]["headers"]


def test_error_descriptions_name_the_codes_of_serve_app_errors(document: dict) -> None:
    described = {
        (status, response["description"])
        for _, _, operation in operations(document)
        for status, response in operation["responses"].items()
    }
    for cls in _error_classes():
        assert any(status == str(cls.status_code) and f"`{cls.code}`" in text for status, text in described), (
            f"no {cls.status_code} names `{cls.code}`"
        )


def test_component_schemas_are_generated_from_the_protocol(document: dict) -> None:
    schemas = document["components"]["schemas"]
    error = ErrorResponse.model_json_schema(mode="serialization", ref_template="#/components/schemas/{model}")
    assert {k: v for k, v in error.items() if k != "$defs"} == schemas["ErrorResponse"]
    assert error["$defs"]["ErrorBody"] == schemas["ErrorBody"]
    for name in ("ImagesResponse", "ImageData", "ModelList", "ModelCard"):
        assert name in schemas


@pytest.mark.parametrize(
    ("method", "path", "statuses", "model"),
    [
        ("get", "/v1/models", {"200", "401", "500", "503"}, "ModelList"),
        ("get", "/v1/models/{model_id}", {"200", "401", "403", "404", "500", "503"}, "ModelCard"),
        ("get", "/v1/usage", {"200", "401", "500", "503"}, None),
        ("get", "/health", {"200", "500", "503"}, None),
    ],
)
def test_get_routes(document: dict, method: str, path: str, statuses: set[str], model: str | None) -> None:
    operation = document["paths"][path][method]
    assert set(operation["responses"]) == statuses
    schema = operation["responses"]["200"]["content"]["application/json"]["schema"]
    if model is not None:
        assert schema == {"$ref": f"#/components/schemas/{model}"}
    else:
        assert schema["type"] == "object"


@pytest.mark.parametrize("method", ["get", "head"])
def test_the_signed_image_route(document: dict, method: str) -> None:
    operation = document["paths"][IMAGE][method]
    assert set(operation["responses"]) == {"200", "403", "404", "500", "503"}
    params = {(p["name"], p["in"]): p for p in operation["parameters"]}
    assert params[("name", "path")]["required"] is True
    assert params[("expires", "query")]["required"] is True
    assert params[("signature", "query")]["required"] is True
    assert "security" not in operation  # the signature is the authorization
    ok = operation["responses"]["200"]
    if method == "get":
        assert set(ok["content"]) == {"image/png", "image/jpeg", "image/webp"}
        assert all(media["schema"]["format"] == "binary" for media in ok["content"].values())
    else:
        assert "content" not in ok and "content-type" in ok["headers"]


def test_bearer_keys_on_the_v1_routes(document: dict) -> None:
    scheme = document["components"]["securitySchemes"][SECURITY_SCHEME]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    for method, path, operation in operations(document):
        if path.startswith("/v1/") and path != IMAGE:
            assert operation["security"] == [{SECURITY_SCHEME: []}], (method, path)
            assert "401" in operation["responses"], (method, path)
        else:
            assert "security" not in operation, (method, path)
    assert "security" not in document  # no global requirement: /health and image URLs are open


def _error_classes() -> list[type[APIError]]:
    found, pending = [], [APIError]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        found.append(cls)
    return [cls for cls in found if cls is not APIError]
