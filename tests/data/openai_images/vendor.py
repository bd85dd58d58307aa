"""Extract OpenAI's images endpoints from its published OpenAPI document, patched to this service.

    python tests/data/openai_images/vendor.py path/to/openai-openapi/openapi.json

writes ``openapi.json`` beside this file: the three ``/images/*`` POST operations of
github.com/openai/openai-openapi (``openapi.json``; the commit is recorded in the output's
``info.x-vendored-from``) and the component schemas they reach, nothing else. The patch (and
only it; see README.md here):

- ``model``: OpenAI's free string-or-enum of its own models becomes an enum of the served
  default's models (serve_config.yaml), as the request must name one of ours;
- ``size``: OpenAI's sizes become the sizes the served tiny models generate.

and, recorded in README.md with the reason for each, the values this service refuses on
purpose with a 400 naming the field (DESIGN: a value the service cannot honour is a 400, never
a silent ignore), so that a schema-valid request is one the service takes. Everything else
(fields, types, ranges, the response and streaming event schemas) is OpenAI's.

    python tests/data/openai_images/vendor.py --repatch

applies the patch again to the vendored ``openapi.json`` (idempotent), without the source.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
PATHS = ("/images/generations", "/images/edits", "/images/variations")
OUR_MODELS = ["tiny-sdxl", "tiny-qwen-image", "tiny-flux"]
OUR_SIZES = ["auto", "64x64", "128x128", "256x256"]
PATCH_NOTE = "Patched by tests/data/openai_images/vendor.py: the served default's {what}."


def extract(document: dict[str, Any], source: str) -> dict[str, Any]:
    schemas = document["components"]["schemas"]
    reached: dict[str, Any] = {}

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            ref = value.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
                name = ref.rsplit("/", 1)[1]
                if name not in reached:
                    reached[name] = schemas[name]
                    walk(schemas[name])
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    paths = {}
    for path in PATHS:
        item = {
            method: {k: v for k, v in op.items() if k != "x-oaiMeta"} for method, op in document["paths"][path].items()
        }
        paths[path] = item
        walk(item)
    out = {
        "openapi": document["openapi"],
        "info": {**document["info"], "x-vendored-from": source},
        "servers": [{"url": "http://127.0.0.1:8000/v1"}],
        "security": [{"ApiKeyAuth": []}],
        "paths": paths,
        "components": {
            "schemas": dict(sorted(reached.items())),
            "securitySchemes": {"ApiKeyAuth": document["components"]["securitySchemes"]["ApiKeyAuth"]},
        },
    }
    patch(out["components"]["schemas"])
    wrap_events(out["paths"], out["components"]["schemas"])
    return out


REQUESTS = ("CreateImageRequest", "CreateImageEditRequest", "CreateImageVariationRequest", "EditImageBodyJsonParam")
# Schemas whose ``size`` is the size of an answer (JSON or a streamed event).
ANSWERS = (
    "ImagesResponse",
    "ImageGenPartialImageEvent",
    "ImageGenCompletedEvent",
    "ImageEditPartialImageEvent",
    "ImageEditCompletedEvent",
)
MULTIPART = ("CreateImageEditRequest", "CreateImageVariationRequest")
REFUSED = "Patched by tests/data/openai_images/vendor.py: refused with a 400 naming the field ({why})."


def patch(schemas: dict[str, Any]) -> None:
    """The patch, in place (README.md gives the reason for each step)."""
    for name in REQUESTS:
        schema = schemas[name]
        properties = schema["properties"]
        if "model" in properties:
            properties["model"] = _patched(properties["model"], OUR_MODELS, "model ids")
        if "size" in properties:
            properties["size"] = _patched(properties["size"], OUR_SIZES, "sizes")
        # 1. Unknown fields are a 400 ("Unrecognized request argument supplied", as OpenAI's own API says).
        schema["additionalProperties"] = False
        # 2. Transparent backgrounds: these models paint every pixel.
        if "background" in properties:
            _drop_values(properties["background"], {"transparent"}, "transparent backgrounds")
        # 3. output_compression: a percentage, 0-100, as OpenAI's description and its JSON edit schema say.
        compression = properties.get("output_compression")
        if compression is not None and compression.get("type") == "integer":
            compression.update({"minimum": 0, "maximum": 100})
        # 4. Fields refused whatever their value: dall-e-3's style presets, GPT image's input_fidelity.
        for field in ("style", "input_fidelity"):
            if field in properties:
                del properties[field]
                schema.setdefault("x-patched-removed", {})[field] = REFUSED.format(why=f"{field} is not supported")
        # 5. One input image: the patched models each take one (a second is a 400 naming image / images).
        if name == "CreateImageEditRequest":
            properties["image"]["anyOf"][1].update({"minItems": 1, "maxItems": 1})  # and an edit needs one
        if name == "EditImageBodyJsonParam":
            properties["images"]["maxItems"] = 1
        # 6. Combinations refused: previews need a stream, and a stream carries b64_json, not URLs.
        if "stream" in properties:
            # not (previews without a stream), and not (a stream of URLs)
            schema["not"] = {
                "anyOf": [
                    {
                        "required": ["partial_images"],
                        "properties": {
                            "partial_images": {"type": "integer", "minimum": 1},
                            "stream": {"not": {"const": True}},
                        },
                    },
                    {
                        "required": ["stream", "response_format"],
                        "properties": {"stream": {"const": True}, "response_format": {"const": "url"}},
                    },
                ],
                "x-patched": REFUSED.format(why="partial_images > 0 needs stream: true; url needs stream: false"),
            }
    # 7. A multipart form has no null: a field left out takes its default.
    for name in MULTIPART:
        properties = schemas[name]["properties"]
        for field in properties.values():
            field.pop("nullable", None)
        if "partial_images" in properties:  # OpenAI's integer-or-null, as the integer
            properties["partial_images"] = dict(schemas["PartialImages"]["anyOf"][0])
    # 8. The sizes of answers: ours, as for requests.
    for name in ANSWERS:
        properties = schemas[name]["properties"]
        properties["size"] = {
            **{k: v for k, v in properties["size"].items() if k == "description"},
            "type": "string",
            "enum": [size for size in OUR_SIZES if size != "auto"],
            "x-patched": PATCH_NOTE.format(what="sizes"),
        }


def wrap_events(paths: dict[str, Any], schemas: dict[str, Any]) -> None:
    """9. OpenAI's ``text/event-stream`` schema is the payload of one event; OpenAPI 3.2 (and
    schemathesis) read that place as the event object (``event``, ``data``, ``id``, ``retry``),
    whose ``data`` is that payload as JSON text. Written so, the payload schema inlined."""
    for item in paths.values():
        for op in item.values():
            for response in op.get("responses", {}).values():
                media = response.get("content", {}).get("text/event-stream")
                if media is None or "contentSchema" in json.dumps(media):
                    continue
                media["schema"] = {
                    "type": "object",
                    "required": ["data"],
                    "properties": {
                        "data": {
                            "type": "string",
                            "contentMediaType": "application/json",
                            "contentSchema": _inlined(media["schema"], schemas),
                        }
                    },
                    "x-patched": "Patched by tests/data/openai_images/vendor.py: OpenAI's event payload as an "
                    "event's `data` (OpenAPI 3.2's reading of a text/event-stream schema).",
                }


def _inlined(value: Any, schemas: dict[str, Any]) -> Any:
    if isinstance(value, dict):
        ref = value.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
            return _inlined(schemas[ref.rsplit("/", 1)[1]], schemas)
        return {key: _inlined(item, schemas) for key, item in value.items() if key != "x-oaiMeta"}
    if isinstance(value, list):
        return [_inlined(item, schemas) for item in value]
    return value


def _drop_values(field: dict[str, Any], refused: set[str], what: str) -> None:
    """Remove ``refused`` from an enum field (plain or ``anyOf`` with null)."""
    for option in [field, *field.get("anyOf", [])]:
        if "enum" in option:
            option["enum"] = [value for value in option["enum"] if value not in refused]
    field["x-patched"] = REFUSED.format(why=f"{what} are not supported")


def _patched(field: dict[str, Any], values: list[str], what: str) -> dict[str, Any]:
    kept = {k: v for k, v in field.items() if k in ("nullable", "description")}
    return {**kept, "type": "string", "enum": values, "default": values[0], "x-patched": PATCH_NOTE.format(what=what)}


def main(source_path: str) -> None:
    document = json.loads(Path(source_path).read_text())
    try:
        commit = subprocess.run(
            ["git", "-C", str(Path(source_path).parent), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    out = extract(document, f"https://github.com/openai/openai-openapi/blob/{commit}/openapi.json")
    (HERE / "openapi.json").write_text(json.dumps(out, indent=1) + "\n")


def repatch() -> None:
    """The patch applied again to the vendored document (it is idempotent)."""
    path = HERE / "openapi.json"
    document = json.loads(path.read_text())
    patch(document["components"]["schemas"])
    wrap_events(document["paths"], document["components"]["schemas"])
    path.write_text(json.dumps(document, indent=1) + "\n")


if __name__ == "__main__":
    repatch() if sys.argv[1] == "--repatch" else main(sys.argv[1])
