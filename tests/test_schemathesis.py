"""The served API against its own OpenAPI document, fuzzed by schemathesis.

Every operation in ``/openapi.json`` is exercised, none excluded: schemathesis generates
valid and invalid requests from the document (with a real key on every call) and fails
the test on any 5xx, any status the operation does not document, and any response body
that does not match its documented schema. The run is bounded: a few examples per
operation (plus schemathesis's boundary-value "coverage" cases) and a hard wall-clock cap.

Reached only as rejections, and so checked only on those paths:
- ``GET`` / ``HEAD /v1/files/images/{name}``: a valid signature cannot be generated, so
  every call is a 403 (or a 404); the 200 path is covered by tests/test_url_delivery.py.
- the POST routes' 200: generated model ids are never a served model (404), so no image
  is generated here; tests/test_serve_e2e.py drives those paths with the OpenAI SDKs.

Run it alone with ``python -m pytest -q -m serve tests/test_schemathesis.py``. Set
``SCHEMATHESIS_SEED`` to explore other inputs (the default seed keeps CI deterministic).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.serve

# Wall-clock cap of the whole run: about 750 requests, 5 s against the bare ingress app.
BUDGET_S = 90
MAX_EXAMPLES = 10
CHECKS = ("not_a_server_error", "status_code_conformance", "response_schema_conformance")


def schemathesis_command(base_url: str, api_key: str, report_dir: Path) -> list[str]:
    """``schemathesis run`` against ``base_url``'s document, with ``api_key`` on every call."""
    return [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        f"{base_url}/openapi.json",
        "--checks",
        ",".join(CHECKS),
        "--header",
        f"Authorization: Bearer {api_key}",
        # The key above is the only credential: none generated from the security scheme.
        "--generation-with-security-parameters",
        "false",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        os.environ.get("SCHEMATHESIS_SEED", "20260101"),
        "--generation-database",
        "none",
        "--workers",
        "1",
        "--request-timeout",
        "30",
        "--no-color",
        "--report",
        "junit",
        "--report-dir",
        str(report_dir),
    ]


def test_the_served_api_keeps_its_openapi_contract(served, tmp_path: Path) -> None:
    key = served.create_key("1000")
    command = schemathesis_command(served.base_url, key, tmp_path / "report")
    try:
        # cwd: schemathesis reads a schemathesis.toml from there; there is none in tmp_path.
        result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=BUDGET_S, check=False)
    except subprocess.TimeoutExpired as exc:  # the child is killed; show what it printed
        output = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        pytest.fail(f"schemathesis ran over its {BUDGET_S} s budget:\n{output[-6000:]}")
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"schemathesis found contract violations:\n{output[-12000:]}"
    assert "passed" in output, output[-4000:]


def _png(size: int = 64) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 80, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("path", "body", "media_type"),
    [
        ("/v1/images/generations", {"prompt": "a red fox", "stream": True, "partial_images": 1, "n": 2}, None),
        (
            "/v1/images/edits",
            {"prompt": "make it blue", "stream": "true", "partial_images": "1"},
            "multipart/form-data",
        ),
    ],
)
def test_streamed_answers_keep_the_documented_events(served, path: str, body: dict, media_type: str | None) -> None:
    """The ``text/event-stream`` 200s, checked by schemathesis against our own document: every
    event's ``event:`` name and JSON ``data:`` (the fuzzing above never reaches a 200)."""
    import schemathesis
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import response_headers_conformance, response_schema_conformance

    schema = schemathesis.openapi.from_url(f"{served.base_url}/openapi.json")
    operation = schema[path]["POST"]
    if media_type == "multipart/form-data":
        body = {**body, "image": _png()}
    case = operation.Case(body=body, media_type=media_type or "application/json")
    headers = {"Authorization": f"Bearer {served.create_key('100')}"}
    response = case.call(base_url=served.base_url, headers=headers)
    assert response.status_code == 200, response.text[:2000]
    assert response.headers["content-type"][0].startswith("text/event-stream")
    events = [line.split(": ", 1)[1] for line in response.text.splitlines() if line.startswith("event: ")]
    assert events.count(events[-1]) >= 1 and events[-1].endswith(".completed"), events
    case.validate_response(
        response, checks=[not_a_server_error, response_schema_conformance, response_headers_conformance]
    )
    # The same check fails a stream whose events do not match (so it did look at them). Its
    # failures come as a FailureGroup, a BaseExceptionGroup: `pytest.raises(Exception)` misses it.
    from schemathesis.core.failures import FailureGroup
    from schemathesis.core.transport import Response

    broken = Response(
        status_code=200,
        headers={k: v for k, v in response.headers.items()},
        content=response.content.replace(b'"seed":', b'"seed":"x","was":'),
        request=response.request,
        elapsed=response.elapsed,
        verify=response.verify,
    )
    with pytest.raises(FailureGroup) as rejected:
        case.validate_response(broken, checks=[response_schema_conformance])
    failures = [str(failure) for failure in rejected.value.exceptions]
    assert failures and all("SSE event violates schema" in failure for failure in failures), failures
    assert all(f'"event": "{events[-1]}"' in failure for failure in failures), failures  # the completed events
