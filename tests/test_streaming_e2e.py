"""``stream: true`` against the served graph: OpenAI's image streaming events as the official
SDKs iterate them (Python here, Node through tests/node/stream.mjs), and billing per image
whose ``completed`` event was handed over."""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from tests.conftest import run_node_sdk

pytestmark = pytest.mark.serve


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def balance(served, key: str) -> float:
    usage = httpx.get(f"{served.base_url}/v1/usage", headers={"Authorization": f"Bearer {key}"}).json()
    return float(usage["balance"])


def check_order(events, prefix: str, n: int, partial_images: int) -> dict[int, list]:
    """Every image: its partial images in index order, then exactly one completed event."""
    by_image: dict[int, list] = {}
    for event in events:
        assert event.type in (f"{prefix}.partial_image", f"{prefix}.completed")
        seen = by_image.setdefault(event.model_extra["image_index"], [])
        assert not seen or seen[-1].type.endswith("partial_image"), "nothing follows an image's completed event"
        seen.append(event)
    assert sorted(by_image) == list(range(n))
    for seen in by_image.values():
        partials, completed = seen[:-1], seen[-1]
        assert completed.type == f"{prefix}.completed"
        assert [p.partial_image_index for p in partials] == list(range(partial_images))
    return by_image


def test_python_sdk_iterates_a_streamed_generation_and_is_charged_per_image(served):
    key = served.create_key("100")
    client = served.client(key)
    stream = client.images.generate(
        model="tiny-qwen-image",
        prompt="a small red apple",
        n=2,
        size="64x64",
        stream=True,
        partial_images=2,
        extra_body={"seed": 11, "num_inference_steps": 6},
    )
    events = list(stream)
    by_image = check_order(events, "image_generation", n=2, partial_images=2)
    for index, seen in by_image.items():
        completed = seen[-1]
        assert completed.model_extra["seed"] == 11 + index
        assert (completed.size, completed.output_format, completed.background) == ("64x64", "png", "opaque")
        assert decode(completed.b64_json).size == (64, 64)
        steps = [p.model_extra["step"] for p in seen[:-1]]
        assert steps == [2, 4] and all(p.model_extra["total_steps"] == 6 for p in seen[:-1])
        for partial in seen[:-1]:
            assert decode(partial.b64_json).size == (64, 64)
    # The streamed image is the image the same request gives without streaming.
    plain = client.images.generate(
        model="tiny-qwen-image",
        prompt="a small red apple",
        n=2,
        size="64x64",
        extra_body={"seed": 11, "num_inference_steps": 6},
    )
    for index in range(2):
        streamed = np.asarray(decode(by_image[index][-1].b64_json), dtype=np.int16)
        assert np.abs(streamed - np.asarray(decode(plain.data[index].b64_json), dtype=np.int16)).max() <= 1
    # 2 credits per image: 4 for the stream, 4 for the plain request.
    last = [e for e in events if e.type.endswith("completed")][-1]
    assert last.model_extra["credits_charged"] == "4" and last.model_extra["credits_remaining"] == "96"
    assert balance(served, key) == 92


def test_python_sdk_iterates_a_streamed_edit(served):
    key = served.create_key("10")
    client = served.client(key)
    source = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(source, format="PNG")
    stream = client.images.edit(
        model="tiny-sdxl",
        image=("red.png", source.getvalue(), "image/png"),
        prompt="a red square",
        stream=True,
        partial_images=1,
        output_format="jpeg",
        extra_body={"num_inference_steps": 8, "strength": "0.5"},
    )
    events = list(stream)
    check_order(events, "image_edit", n=1, partial_images=1)
    assert decode(events[-1].b64_json).format == "JPEG"
    assert balance(served, key) == 9


def test_node_sdk_iterates_a_streamed_generation(served):
    key = served.create_key("10")
    seen = run_node_sdk("stream.mjs", f"{served.base_url}/v1", key, "tiny-sdxl")
    events = seen["events"]
    for index in (0, 1):
        mine = [e for e in events if e["imageIndex"] == index]
        assert [e["type"] for e in mine] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
        assert [e["partialImageIndex"] for e in mine[:2]] == [0, 1]
        assert all(e["signature"] == "PNG" and e["size"] == "64x64" for e in mine)
        assert mine[-1]["seed"] == 21 + index
    assert [e["creditsCharged"] for e in events if e["type"].endswith("completed")] == ["1", "2"]
    assert balance(served, key) == 8


def _events(lines):
    """(event, data) pairs of a server-sent event stream."""
    name = None
    for line in lines:
        if line.startswith("event: "):
            name = line[len("event: ") :]
        elif line.startswith("data: "):
            yield name, json.loads(line[len("data: ") :])


def test_a_dropped_stream_is_refunded(served):
    key = served.create_key("20")
    body = {
        "model": "tiny-sdxl",
        "prompt": "a long, slow picture",
        "n": 2,
        "size": "256x256",
        "num_inference_steps": 50,
        "stream": True,
        "partial_images": 3,
    }
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.stream(
        "POST", f"{served.base_url}/v1/images/generations", json=body, headers=headers, timeout=60
    ) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-credits-reserved"] == "2"
        name, first = next(_events(response.iter_lines()))
        assert name == "image_generation.partial_image" and first["partial_image_index"] == 0
    # Gone after one preview: both images refunded.
    deadline = time.monotonic() + 20
    while balance(served, key) != 20:
        assert time.monotonic() < deadline, "the dropped stream was not refunded"
        time.sleep(0.2)


def test_refusals_before_the_stream_are_plain_http_errors(served):
    client = served.client(served.create_key("1"))
    with pytest.raises(openai.APIStatusError) as caught:  # 402: the SDK has no class of its own for it
        client.images.generate(model="tiny-sdxl", prompt="x", n=2, stream=True)
    assert caught.value.status_code == 402
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(model="tiny-sdxl", prompt="x", stream=True, response_format="url")
    assert caught.value.body["param"] == "response_format"


def test_an_error_after_the_stream_started_is_an_error_event(served, failure_app):
    # tight-deadline gives up after 0.5 s; 256x256 at 50 steps takes longer.
    key = served.create_key("10")
    client = openai.OpenAI(base_url=f"{failure_app}/v1", api_key=key, max_retries=0)
    stream = client.images.generate(
        model="tight-deadline",
        prompt="too slow",
        size="256x256",
        stream=True,
        partial_images=3,
        extra_body={"num_inference_steps": 50, "go_fast": False},
    )
    with pytest.raises(openai.APIError) as caught:
        for _ in stream:
            pass
    assert caught.value.body["code"] == "timeout" and caught.value.body["type"] == "server_error"
    assert caught.value.body["request_id"]
    deadline = time.monotonic() + 10
    while balance(served, key) != 10:
        assert time.monotonic() < deadline, "the failed stream was charged"
        time.sleep(0.2)
