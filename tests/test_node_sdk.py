"""The official OpenAI Node SDK against the served graph (skipped only where node or the
SDK is missing; .ci/run installs the SDK into .cache/node)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.serve

ROOT = Path(__file__).resolve().parents[1]
NODE_MODULES = Path(os.environ.get("OPENAI_NODE_MODULES", ROOT / ".cache" / "node" / "node_modules"))


def test_node_sdk_generates_and_reads_errors(served):
    node = shutil.which("node")
    if node is None or not (NODE_MODULES / "openai").is_dir():
        pytest.skip("needs node and `npm install --prefix .cache/node openai@6` (done by .ci/run)")
    key = served.create_key("10")
    result = subprocess.run(
        [node, str(ROOT / "tests" / "node" / "generate.mjs"), f"{served.base_url}/v1", key, "tiny-sdxl"],
        env={**os.environ, "OPENAI_NODE_MODULES": str(NODE_MODULES)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["count"] == 2
    assert seen["pngSignatures"] == ["PNG", "PNG"]
    assert seen["seeds"][1] == seen["seeds"][0] + 1
    assert (seen["size"], seen["outputFormat"]) == ("64x64", "png")
    assert seen["notFound"]["status"] == 404 and seen["notFound"]["code"] == "model_not_found"
    assert seen["notFound"]["requestId"]
