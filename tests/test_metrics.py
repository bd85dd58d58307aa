"""The service's metrics as an operator sees them: on Ray's Prometheus endpoint."""

from __future__ import annotations

import re
import time

import httpx
import pytest

pytestmark = pytest.mark.serve

EXPECTED = (
    'imagegen_requests_total{.*endpoint="generations".*model="tiny-sdxl".*status="200"',
    'imagegen_requests_total{.*endpoint="generations".*model="unknown".*status="404"',
    'imagegen_images_total{.*model="tiny-sdxl"',
    'imagegen_credits_charged_total{.*model="tiny-sdxl"',
    'imagegen_queue_wait_seconds_bucket{.*model="tiny-sdxl"',
    'imagegen_generation_seconds_bucket{.*model="tiny-sdxl"',
    'imagegen_pipeline_batch_images_bucket{.*model="tiny-sdxl"',
)


def prometheus_text(ray_session) -> str:
    node = ray_session._private.worker.global_worker.node
    return httpx.get(f"http://127.0.0.1:{node.metrics_export_port}/metrics", timeout=10).text


def test_requests_images_credits_and_latencies_reach_prometheus(served, ray_session):
    client = served.client(served.create_key("10"))
    client.images.generate(model="tiny-sdxl", prompt="counted", n=2)
    httpx.post(f"{served.base_url}/v1/images/generations", json={"model": "no-such", "prompt": "x"},
               headers={"authorization": f"Bearer {client.api_key}"})
    deadline = time.monotonic() + 60  # metrics are exported every few seconds
    missing = list(EXPECTED)
    while missing and time.monotonic() < deadline:
        text = prometheus_text(ray_session)
        missing = [pattern for pattern in EXPECTED if not re.search(pattern, text)]
        if missing:
            time.sleep(2)
    assert not missing, missing
    assert "qbt_" not in text  # no key material in any label
