"""Extract OpenAI's images endpoints from its published OpenAPI document, patched to this service.

    python tests/data/openai_images/vendor.py path/to/openai-openapi/openapi.json

writes ``openapi.json`` beside this file: the three ``/images/*`` POST operations of
github.com/openai/openai-openapi (``openapi.json``; the commit is recorded in the output's
``info.x-vendored-from``) and the component schemas they reach, nothing else. The patch (and
only it; see README.md here):

- ``model``: OpenAI's free string-or-enum of its own models becomes an enum of the served
  default's models (serve_config.yaml), as the request must name one of ours;
- ``size``: OpenAI's sizes become the sizes the served tiny models generate.

Everything else (fields, types, ranges, the response and streaming event schemas) is OpenAI's.
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
    for name in (
        "CreateImageRequest",
        "CreateImageEditRequest",
        "CreateImageVariationRequest",
        "EditImageBodyJsonParam",
    ):
        properties = out["components"]["schemas"].get(name, {}).get("properties", {})
        if "model" in properties:
            properties["model"] = _patched(properties["model"], OUR_MODELS, "model ids")
        if "size" in properties:
            properties["size"] = _patched(properties["size"], OUR_SIZES, "sizes")
    return out


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


if __name__ == "__main__":
    main(sys.argv[1])
