"""The official OpenAI Node SDK against the served graph (skipped only where node or the
SDK is missing; .ci/run installs the SDK into .cache/node)."""

from __future__ import annotations

import pytest

from tests.conftest import run_node_sdk

pytestmark = pytest.mark.serve


def test_node_sdk_generates_and_reads_errors(served):
    seen = run_node_sdk("generate.mjs", f"{served.base_url}/v1", served.create_key("10"), "tiny-sdxl")
    assert seen["count"] == 2
    assert seen["pngSignatures"] == ["PNG", "PNG"]
    assert seen["seeds"][1] == seen["seeds"][0] + 1
    assert (seen["size"], seen["outputFormat"]) == ("64x64", "png")
    assert seen["notFound"]["status"] == 404 and seen["notFound"]["code"] == "model_not_found"
    assert seen["notFound"]["requestId"]


def test_node_sdk_drives_the_batch_api(served):
    seen = run_node_sdk("batch.mjs", f"{served.base_url}/v1", served.create_key("10"), "tiny-sdxl")
    assert seen["uploadedPurpose"] == "batch" and seen["createdStatus"] in ("validating", "in_progress")
    assert seen["status"] == "completed"
    assert (seen["counts"]["total"], seen["counts"]["completed"], seen["counts"]["failed"]) == (2, 1, 1)
    assert seen["output"] == [{"customId": "valid", "status": 200, "seeds": [11, 12]}]
    assert seen["errors"] == [{"customId": "invalid", "status": 400, "param": "size"}]
    assert seen["listedFirst"] and seen["deleted"]
