"""The served API fuzzed by schemathesis from OpenAI's own images API document.

tests/data/openai_images/openapi.json is OpenAI's published document for the three
``/images/*`` operations, with ``model`` and ``size`` patched to the served default's models
and sizes, and the values the service refuses on purpose (each a 400 naming the field) left
out, each with its reason (tests/data/openai_images/README.md). Requests schemathesis generates as valid
from it must be accepted, answered without a 5xx, and their 200s (JSON and streamed) must
match OpenAI's response schemas. The one accepted kind of failure: a 400 naming ``size``
(the patched sizes are the union over the models; each model takes its own).

Binary parts (``image``, ``mask``) are one small PNG: random bytes are no image. For the
same reason a JSON edit's ``image_url`` is that PNG as a data URL, and its ``file_id`` that
PNG uploaded to the Files API (purpose ``vision``): a random URL or id names no image.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.serve

DOCUMENT = Path(__file__).parent / "data" / "openai_images" / "openapi.json"
EXAMPLES_PER_OPERATION = 12
ACCEPTED_PARAMS = {"size"}


def _png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGBA", (64, 64), (200, 80, 40, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_openais_images_document_finds_nothing_beyond_sizes(served) -> None:
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from schemathesis.checks import not_a_server_error
    from schemathesis.core.failures import FailureGroup
    from schemathesis.specs.openapi.checks import positive_data_acceptance, response_schema_conformance

    schemathesis.openapi.format("binary", st.just(_png()))
    schemathesis.openapi.format("uri", st.just("data:image/png;base64," + base64.b64encode(_png()).decode()))
    schema = schemathesis.openapi.from_path(DOCUMENT)
    headers = {"Authorization": f"Bearer {served.create_key('100000')}"}
    file_id = _uploaded_png(served.base_url, headers)
    base_url = f"{served.base_url}/v1"
    checks = [not_a_server_error, response_schema_conformance, positive_data_acceptance]
    found: dict[str, list[str]] = {}
    accepted: dict[str, int] = {}

    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def run(case) -> None:
            _name_the_uploaded_file(case.body, file_id)
            response = case.call(base_url=base_url, headers=headers, timeout=60)
            try:
                case.validate_response(response, checks=checks)
            except (Exception, FailureGroup) as exc:  # noqa: BLE001 - classified below, never shrunk
                param = _error_param(response)
                if response.status_code == 400 and param in ACCEPTED_PARAMS:
                    accepted[param] = accepted.get(param, 0) + 1
                    return
                body = json.dumps(case.body if not isinstance(case.body, dict) else _short(case.body))[:400]
                found.setdefault(case.operation.label, []).append(
                    f"{response.status_code} param={param}: {str(exc)[:300]}\n  body: {body}"
                )

        run()

    assert not found, "schemathesis with OpenAI's document found:\n" + "\n".join(
        f"{label}:\n  " + "\n  ".join(items) for label, items in found.items()
    )


def _uploaded_png(base_url: str, headers: dict[str, str]) -> str:
    import httpx

    response = httpx.post(
        f"{base_url}/v1/files",
        headers=headers,
        data={"purpose": "vision"},
        files={"file": ("in.png", _png(), "image/png")},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return response.json()["id"]


def _name_the_uploaded_file(body, file_id: str) -> None:
    """Every ``file_id`` of a JSON edit's image references (``images[]``, ``mask``) names ``file_id``."""
    if not isinstance(body, dict):
        return
    references = [*body.get("images", []), body.get("mask")] if isinstance(body.get("images"), list) else []
    for reference in references:
        if isinstance(reference, dict) and "file_id" in reference:
            reference["file_id"] = file_id


def _error_param(response) -> str | None:
    try:
        return response.json()["error"]["param"]
    except Exception:  # noqa: BLE001 - not our error body
        return None


def _short(body: dict) -> dict:
    return {k: (v if not isinstance(v, (bytes, str)) or len(v) < 80 else f"<{len(v)}>") for k, v in body.items()}
