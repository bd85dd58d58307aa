"""The real graph under `serve.run`, driven the way users drive it: the official OpenAI client
and plain HTTP."""

from __future__ import annotations

import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

pytestmark = pytest.mark.serve

MODELS = ["tiny-sdxl", "tiny-qwen-image", "tiny-flux"]


def decode(item) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
    image.load()
    return image


@pytest.fixture(scope="module")
def client(served):
    return served.client(served.create_key("100000"))


@pytest.mark.parametrize("model", MODELS)
def test_generates_images_with_the_openai_client(client, model):
    result = client.images.generate(model=model, prompt="a small red apple", n=2, size="64x64")
    assert len(result.data) == 2
    for item in result.data:
        image = decode(item)
        assert image.format == "PNG" and image.size == (64, 64)
        assert item.revised_prompt == "a small red apple"
    assert result.output_format == "png" and result.size == "64x64"
    seeds = [item.model_extra["seed"] for item in result.data]
    assert seeds[1] == seeds[0] + 1


@pytest.mark.parametrize("model, fmt, pil_format", [("tiny-sdxl", "jpeg", "JPEG"), ("tiny-qwen-image", "webp", "WEBP")])
def test_output_formats_and_sizes(client, model, fmt, pil_format):
    result = client.images.generate(
        model=model, prompt="a lighthouse", size="96x64", output_format=fmt, extra_body={"output_quality": 70}
    )
    image = decode(result.data[0])
    assert image.format == pil_format and image.size == (96, 64)
    assert result.output_format == fmt


def test_a_fast_wide_image_is_fitted_to_the_model_not_refused(client):
    # A quarter of 64x64 at 16:9 would be 40x24, under tiny-sdxl's 32-pixel minimum side.
    result = client.images.generate(
        model="tiny-sdxl", prompt="a wide field", extra_body={"aspect_ratio": "16:9", "image_size": "optimize_for_speed"}
    )
    assert decode(result.data[0]).size == (56, 32) and result.size == "56x32"


def test_qubrid_fields_are_honoured(client):
    body = {"num_inference_steps": 2, "guidance": 3.0, "negative_prompt": "blurry", "seed": 7,
            "aspect_ratio": "2:1", "image_size": "optimize_for_quality"}
    first = client.images.generate(model="tiny-sdxl", prompt="a boat", extra_body=body)
    again = client.images.generate(model="tiny-sdxl", prompt="a boat", extra_body=body)
    assert first.data[0].model_extra["seed"] == 7
    assert decode(first.data[0]).size[0] == 2 * decode(first.data[0]).size[1]
    assert first.data[0].b64_json == again.data[0].b64_json  # same seed, same image
    other = client.images.generate(model="tiny-sdxl", prompt="a boat", extra_body={**body, "negative_prompt": "sharp"})
    assert other.data[0].b64_json != first.data[0].b64_json


@pytest.mark.parametrize("model", MODELS)
def test_seeded_batch_equals_single_requests_under_load(client, model):
    """Image i of a seeded n=3 request is the n=1 image with seed S+i, even amid other work."""
    seed = 1234
    def one(s):
        return client.images.generate(model=model, prompt="a green pear", n=1, size="64x64", extra_body={"seed": s})

    def noise(i):
        return client.images.generate(model=model, prompt=f"noise {i} " * (i + 1), n=2, size="64x64")

    with ThreadPoolExecutor(max_workers=8) as pool:
        background = [pool.submit(noise, i) for i in range(4)]
        batched = pool.submit(
            client.images.generate, model=model, prompt="a green pear", n=3, size="64x64", extra_body={"seed": seed}
        )
        singles = [pool.submit(one, seed + i) for i in range(3)]
        for future in background:
            future.result()
        batched_images = [np.asarray(decode(item), dtype=np.int16) for item in batched.result().data]
        single_images = [np.asarray(decode(future.result().data[0]), dtype=np.int16) for future in singles]
    assert [item.model_extra["seed"] for item in batched.result().data] == [seed, seed + 1, seed + 2]
    for got, want in zip(batched_images, single_images):
        assert np.abs(got - want).max() <= 1
    assert np.abs(batched_images[0] - batched_images[1]).max() > 1  # different seeds, different images


def test_models_list_and_health(served, client):
    listed = client.models.list()
    assert sorted(model.id for model in listed.data) == sorted([*MODELS, "tiny-qwen-image-edit"])  # edits only
    one = client.models.retrieve("tiny-sdxl")
    assert (one.id, one.object, one.owned_by) == ("tiny-sdxl", "model", "imagegen")
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("dall-e-9")
    assert caught.value.code == "model_not_found"
    health = httpx.get(f"{served.base_url}/health")
    assert health.status_code == 200


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.images.generate(model="dall-e-9", prompt="x")
    error = caught.value
    assert error.status_code == 404
    assert error.code == "model_not_found"
    assert error.body["param"] == "model"
    assert error.request_id and error.request_id == error.body["request_id"]


@pytest.mark.parametrize(
    "field, value",
    [("n", 0), ("size", "65x64"), ("size", "4096x4096"), ("quality", "ultra"), ("style", "vivid"),
     ("num_inference_steps", 500), ("output_format", "gif"), ("seed", "x"), ("aspect_ratio", "wide"),
     ("image", "aGk="), ("bogus_field", 1)],
)
def test_invalid_fields_are_400_in_the_documented_shape(served, client, field, value):
    response = httpx.post(
        f"{served.base_url}/v1/images/generations",
        json={"model": "tiny-sdxl", "prompt": "x", field: value},
        headers={"Authorization": f"Bearer {client.api_key}"},
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_request"
    assert error["param"] == field and field in error["message"]
    assert error["request_id"] == response.headers["x-request-id"]


def test_openai_client_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(model="tiny-sdxl", prompt="x", size="1x1")
    assert caught.value.body["param"] == "size"


def test_one_step_is_refused_where_the_model_cannot_make_an_image_with_it(client):
    """A one-step Qwen-Image generation is all NaN (a black image): refused, not sold."""
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(model="tiny-qwen-image", prompt="x", extra_body={"num_inference_steps": 1})
    assert caught.value.body["param"] == "num_inference_steps"
    one_step = client.images.generate(model="tiny-sdxl", prompt="x", extra_body={"num_inference_steps": 1})
    assert decode(one_step.data[0]).getextrema() != ((0, 0), (0, 0), (0, 0))


def test_malformed_and_oversized_bodies(served, client):
    headers = {"Authorization": f"Bearer {client.api_key}", "Content-Type": "application/json"}
    url = f"{served.base_url}/v1/images/generations"
    bad = httpx.post(url, content=b"{not json", headers=headers)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_request"
    huge = httpx.post(url, content=b'{"prompt": "' + b"a" * (served.config.max_body_bytes + 10) + b'"}', headers=headers)
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"
    missing = httpx.get(f"{served.base_url}/v1/nothing-here", headers=headers)
    assert missing.status_code == 404 and "error" in missing.json()


def test_a_model_without_replicas_answers_503_fast(served, failure_app):
    """A deployment that asks for a GPU this machine lacks stays pending; requests must not hang."""
    key = served.create_key("10")
    started = time.monotonic()
    response = httpx.post(f"{failure_app}/v1/images/generations", json={"model": "needs-gpu", "prompt": "x"},
                          headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert time.monotonic() - started < 5
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "model_unavailable"
    assert int(response.headers["retry-after"]) >= 1
