"""Retries and failures as a client meets them: an Idempotency-Key retried through the official
SDK, and an ingress replica that dies mid-request."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

pytestmark = pytest.mark.serve


def balance(served, key) -> float:
    return float(httpx.get(f"{served.base_url}/v1/usage", headers={"authorization": f"Bearer {key}"}).json()["balance"])


def test_an_sdk_retry_with_an_idempotency_key_is_charged_once(served):
    key = served.create_key("10")
    client = served.client(key)
    headers = {"Idempotency-Key": "order-1234"}
    first = client.images.with_raw_response.generate(
        model="tiny-sdxl", prompt="a kite", n=2, extra_headers=headers, extra_body={"seed": 3}
    )
    again = client.images.with_raw_response.generate(
        model="tiny-sdxl", prompt="a kite", n=2, extra_headers=headers, extra_body={"seed": 3}
    )
    assert [d.b64_json for d in first.parse().data] == [d.b64_json for d in again.parse().data]
    assert again.headers["idempotent-replayed"] == "true"
    assert first.headers["x-credits-charged"] == again.headers["x-credits-charged"] == "2"
    assert balance(served, key) == 8
    with pytest.raises(openai.ConflictError) as caught:
        client.images.generate(model="tiny-sdxl", prompt="another kite", extra_headers=headers)
    assert caught.value.code == "idempotency_key_reused"
    assert balance(served, key) == 8


def _ingress_actor(served):
    import ray
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    replicas = details["applications"]["imagegen"]["deployments"]["ImageGenerationIngress"]["replicas"]
    assert len(replicas) == 1
    return ray.get_actor(replicas[0]["actor_name"], namespace="serve")


def test_an_ingress_replica_that_dies_mid_request_gives_its_credits_back(served):
    import ray

    key = served.create_key("20")
    client = served.client(key, timeout=120)
    outcome = {}

    def slow_request():
        try:
            client.images.generate(
                model="tiny-sdxl",
                prompt="slow",
                n=2,
                size="128x128",
                extra_body={"num_inference_steps": 40, "go_fast": False},
            )
            outcome["result"] = "delivered"
        except openai.APIStatusError as exc:
            outcome["result"] = exc
        except openai.APIConnectionError as exc:
            outcome["result"] = exc

    thread = threading.Thread(target=slow_request)
    thread.start()
    deadline = time.monotonic() + 30
    while balance(served, key) != 18:  # reserved: the request is running
        assert time.monotonic() < deadline and thread.is_alive(), "the request never started"
        time.sleep(0.05)
    ray.kill(_ingress_actor(served))
    killed_at = time.monotonic()
    thread.join(120)
    result = outcome["result"]
    assert result != "delivered"
    if isinstance(result, openai.APIStatusError):  # an answer, not a cut connection: our shape
        assert result.status_code >= 500 and result.response.headers["content-type"] == "application/json"
        assert result.body["code"] in ("internal_error", "upstream_error")
    # Serve replaces the ingress; the live replica refunds what the dead one held.
    while True:
        try:
            if httpx.get(f"{served.base_url}/health", timeout=5).status_code == 200 and balance(served, key) == 20:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() - killed_at < 90, "the dead replica's reservation was never refunded"
        time.sleep(0.5)
    print(f"refunded {time.monotonic() - killed_at:.1f} s after the ingress replica was killed")
