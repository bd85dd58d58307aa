"""The OpenAPI document: FastAPI's, from the routes' declarations (serve_app.openapi) and the
wire models; valid and complete. No Ray: the routes are on the ingress's FastAPI object once
its module is imported."""

from __future__ import annotations

import json

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from serve_app.errors import APIError
from serve_app.openapi import SECURITY_SCHEME, install_openapi
from serve_app.protocol import ErrorResponse, ImageEditJSONRequest, ImageEditRequest, ImageGenerationRequest
from serve_app.streaming import CompletedEvent, PartialImageEvent, StreamErrorEvent

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


def test_every_route_declares_its_answers(api: FastAPI, document: dict) -> None:
    """Each documented route declares its 200 and its errors on its decorator (``responses=``):
    none is left with FastAPI's placeholder answer."""
    assert len(list(operations(document))) >= 18
    for method, path, operation in operations(document):
        ok = operation["responses"]["200"]
        assert ok["description"] != "Successful Response", (method, path)
        assert "x-request-id" in ok["headers"], (method, path)
        assert any(400 <= int(status) < 600 for status in operation["responses"]), (method, path)
        for media in ok.get("content", {}).values():
            assert media["schema"], (method, path)  # no empty placeholder schema
    assert "head" in document["paths"][IMAGE]
    ids = [operation["operationId"] for _, _, operation in operations(document)]
    assert len(ids) == len(set(ids))


def test_every_ref_resolves(document: dict) -> None:
    text = json.dumps(document)
    for name in set(__import__("re").findall(r'"#/components/schemas/([^"]+)"', text)):
        assert name in document["components"]["schemas"], name


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


def test_the_edits_json_body_is_openais_json_form(document: dict) -> None:
    body = document["paths"][EDITS]["post"]["requestBody"]
    assert set(body["content"]) == {"multipart/form-data", "application/json"}
    schema = resolve(document, body["content"]["application/json"]["schema"])
    assert set(schema["required"]) == {"prompt", "images"}
    assert "image" not in schema["properties"]  # the form's file part; JSON sends images
    assert schema["properties"]["images"]["maxItems"] == 16
    reference = document["components"]["schemas"]["ImageReference"]
    assert set(reference["properties"]) == {"image_url", "file_id"}
    assert reference["additionalProperties"] is False
    assert schema == {
        k: v
        for k, v in ImageEditJSONRequest.model_json_schema(ref_template="#/components/schemas/{model}").items()
        if k != "$defs"
    }


def test_the_edits_body_is_openais_multipart_form(document: dict) -> None:
    body = document["paths"][EDITS]["post"]["requestBody"]
    assert list(body["content"]) == ["multipart/form-data", "application/json"]
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
    # One 200 answers JSON (charged / remaining) and streams (reserved): none is required.
    for header in ("x-credits-charged", "x-credits-remaining", "x-credits-reserved"):
        assert not ok["headers"][header].get("required", False)
    assert "x-request-id" in ok["headers"]
    assert ("text/event-stream" in ok["content"]) is (path != VARIATIONS)  # variations are not streamed
    (idempotency,) = [p for p in operation["parameters"] if p["name"] == "Idempotency-Key"]
    assert idempotency["in"] == "header" and idempotency["required"] is False


@pytest.mark.parametrize(("path", "prefix"), [(GENERATIONS, "image_generation"), (EDITS, "image_edit")])
def test_streamed_answers_are_event_objects(document: dict, path: str, prefix: str) -> None:
    from jsonschema import Draft202012Validator

    from serve_app.errors import UpstreamError
    from serve_app.streaming import error_event, sse
    from serve_app.usage import Usage

    schema = document["paths"][path]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
    events = {event["properties"]["event"]["const"]: event for event in schema["oneOf"]}
    assert set(events) == {f"{prefix}.partial_image", f"{prefix}.completed", "error"}
    models = {
        f"{prefix}.partial_image": PartialImageEvent,
        f"{prefix}.completed": CompletedEvent,
        "error": StreamErrorEvent,
    }
    for name, event in events.items():
        data = event["properties"]["data"]
        assert data["contentMediaType"] == "application/json"
        assert data["contentSchema"]["allOf"][0]["title"] == models[name].__name__
        assert "$ref" not in json.dumps(data)  # self-contained: tools resolve no refs there

    # What the service sends validates against the event payload schemas (and a wrong type does not).
    common = {
        "b64_json": "AA==",
        "background": "opaque",
        "created_at": 1,
        "output_format": "png",
        "quality": "low",
        "size": "64x64",
    }
    common["image_index"] = 0
    completed = CompletedEvent(
        type=f"{prefix}.completed",
        usage=Usage.model_validate(_usage()),
        seed=1,
        credits_charged="1",
        credits_remaining="9",
        **common,
    )
    partial = PartialImageEvent(type=f"{prefix}.partial_image", partial_image_index=0, step=1, total_steps=4, **common)
    sent = [sse(partial), sse(completed), error_event(UpstreamError("the model failed"), "req_1")]
    for chunk in sent:
        name, data = (line.split(": ", 1)[1] for line in chunk.decode().strip().split("\n"))
        content = {**events[name]["properties"]["data"]["contentSchema"], "$defs": document["components"]["schemas"]}
        resolved = json.loads(json.dumps(content).replace("#/components/schemas/", "#/$defs/"))
        Draft202012Validator(resolved).validate(json.loads(data))
        wrong = {**json.loads(data), "type": "something.else"}
        assert not Draft202012Validator(resolved).is_valid(wrong)


def _usage() -> dict:
    return {
        "input_tokens": 1,
        "input_tokens_details": {"text_tokens": 1, "image_tokens": 0},
        "output_tokens": 4,
        "total_tokens": 5,
    }


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
    assert set(error["$defs"]["ErrorBody"]["properties"]) == set(schemas["ErrorBody"]["properties"])
    assert set(error["$defs"]["ErrorBody"]["required"]) == set(schemas["ErrorBody"]["required"])
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
