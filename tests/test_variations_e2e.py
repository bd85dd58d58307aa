"""OpenAI's defaults and nulls, /v1/images/variations, and image parts without a filename,
end to end through the official OpenAI SDK (and LangChain's DALL-E wrapper) against the
served embedded default."""

from __future__ import annotations

import base64
import io
import time

import httpx
import numpy as np
import pytest
from PIL import Image

# openai-python marks images.create_variation deprecated (OpenAI's DALL-E 2 endpoint); it is
# the SDK's way to this endpoint all the same.
pytestmark = [pytest.mark.serve, pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")]

MODELS = ["tiny-sdxl", "tiny-qwen-image", "tiny-flux"]


def scene(width: int = 64, height: int = 64) -> bytes:
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), np.full_like(x, 96)], -1).astype(np.uint8)
    pixels[height // 4 : height // 2, width // 4 : width // 2] = (20, 30, 40)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def balance(served, key: str) -> float:
    response = httpx.get(f"{served.base_url}/v1/usage", headers={"authorization": f"Bearer {key}"})
    return float(response.json()["balance"])


@pytest.mark.parametrize("model", MODELS)
def test_create_variation_through_the_sdk_on_every_family(served, model):
    key = served.create_key("100")
    client = served.client(key)
    raw = client.images.with_raw_response.create_variation(
        image=("in.png", scene(), "image/png"), model=model, n=2, size="64x64", extra_body={"seed": 11}
    )
    result = raw.parse()
    assert [item.model_extra["seed"] for item in result.data] == [11, 12]
    images = [decoded(item.b64_json) for item in result.data]
    assert all(image.size == (64, 64) and image.format == "PNG" for image in images)
    assert images[0].tobytes() != images[1].tobytes()  # two seeds, two variations
    price = float(served.config.model(model).price_per_image)
    assert float(raw.headers["x-credits-charged"]) == 2 * price  # billed like a generation
    assert balance(served, key) == 100 - 2 * price
    # The same seed again: the same variation (deterministic, as generations are).
    again = client.images.create_variation(
        image=("in.png", scene(), "image/png"), model=model, size="64x64", extra_body={"seed": 11}
    )
    assert again.data[0].b64_json == result.data[0].b64_json


def test_a_variation_as_url_and_its_refusals(served):
    key = served.create_key("10")
    client = served.client(key)
    result = client.images.create_variation(image=("in.png", scene(), "image/png"), response_format="url")
    response = httpx.get(result.data[0].url)  # the default model, a URL through 127.0.0.1
    assert response.status_code == 200 and Image.open(io.BytesIO(response.content)).size == (64, 64)
    refusals = [
        ({"prompt": "a cat"}, [("image", ("in.png", scene(), "image/png"))], "prompt"),
        ({}, [], "image"),
        ({"model": "tiny-sdxl"}, [("image", ("in.svg", b"<svg/>", "image/svg+xml"))], "image"),
        ({"n": "1.5"}, [("image", ("in.png", scene(), "image/png"))], "n"),
    ]
    for data, files, param in refusals:
        response = httpx.post(
            f"{served.base_url}/v1/images/variations",
            data=data,
            files=files or {"n": (None, b"1")},
            headers={"authorization": f"Bearer {key}"},
            timeout=60,
        )
        assert response.status_code == 400, (param, response.text)
        assert response.json()["error"]["param"] == param, response.text
    assert balance(served, key) == 9


def test_openai_nulls_and_numbers_mean_what_openai_says(served):
    key = served.create_key("100")
    client = served.client(key)
    # No model, n: null, output_compression with png, integral floats: all accepted.
    result = client.images.generate(
        prompt="a red apple",
        n=None,
        size="64x64",
        output_format="png",
        output_compression=100,
        extra_body={"seed": 5.0, "num_inference_steps": 4.0},
    )
    assert len(result.data) == 1 and result.data[0].model_extra["seed"] == 5
    assert result.output_format == "png" and decoded(result.data[0].b64_json).format == "PNG"
    named = client.images.generate(
        model=served.config.default_model_id,
        prompt="a red apple",
        size="64x64",
        extra_body={"seed": 5, "num_inference_steps": 4},
    )
    assert named.data[0].b64_json == result.data[0].b64_json  # the default model
    response = httpx.post(
        f"{served.base_url}/v1/images/generations",
        json={"model": None, "prompt": "x", "n": 1.5},
        headers={"authorization": f"Bearer {key}"},
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "n"


def test_image_parts_without_a_filename_are_files(served):
    """curl -F image=<in.png sends the file's bytes as a part without a filename."""
    key = served.create_key("10")
    headers = {"authorization": f"Bearer {key}"}
    form = {"image": (None, scene(), "image/png"), "prompt": (None, b"a cat"), "model": (None, b"tiny-sdxl")}
    response = httpx.post(f"{served.base_url}/v1/images/edits", files=form, headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    assert len(response.json()["data"]) == 1
    as_text = {**form, "image": (None, base64.b64encode(scene()))}
    response = httpx.post(f"{served.base_url}/v1/images/edits", files=as_text, headers=headers, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "image"
    assert "not base64" in response.json()["error"]["message"]
    assert balance(served, key) == 9


@pytest.fixture(scope="module")
def url_default_app(served):
    """The embedded default's tiny SDXL with ``defaults.response_format: url``, as a second
    application on the same database and image folder (the embedded default keeps b64_json:
    its README examples read base64)."""
    from ray import serve

    from serve_app.app import build_app
    from serve_app.config import AppConfig

    tiny = served.config.model("tiny-sdxl")
    urls = tiny.model_copy(
        update={
            "defaults": tiny.defaults.model_copy(update={"response_format": "url"}),
            "deployment": tiny.deployment.model_copy(update={"autoscaling_config": None, "num_replicas": 1}),
        }
    )
    config = AppConfig.model_validate(
        {**served.config.model_dump(), "models": [urls.model_dump()], "prompt_enhancer": None}
    )
    serve.run_many(
        [serve.RunTarget(build_app(config), name="url-default", route_prefix="/url-default")],
        wait_for_applications_running=False,
    )
    base_url = f"{served.base_url}/url-default"
    deadline = time.monotonic() + 120
    key = served.create_key("100")
    while True:
        response = httpx.post(
            f"{base_url}/v1/images/generations",
            json={"prompt": "warm-up", "size": "64x64"},
            headers={"authorization": f"Bearer {key}"},
            timeout=60,
        )
        if response.status_code == 200:
            break
        assert time.monotonic() < deadline, f"url-default never came up: {response.status_code} {response.text}"
        time.sleep(1)
    yield base_url
    serve.delete("url-default", _blocking=False)


def test_langchain_dalle_wrapper_gets_urls_from_a_url_default_model(served, url_default_app):
    """LangChain's DallEAPIWrapper joins ``item.url`` without sending response_format."""
    dalle = pytest.importorskip("langchain_community.utilities.dalle_image_generator")
    wrapper = dalle.DallEAPIWrapper(
        model="tiny-sdxl", size="64x64", n=2, api_key=served.create_key("10"), base_url=f"{url_default_app}/v1"
    )
    urls = wrapper.run("a lighthouse at dusk").split("\n")
    assert len(urls) == 2
    for url in urls:
        response = httpx.get(url)
        assert response.status_code == 200, url
        assert Image.open(io.BytesIO(response.content)).size == (64, 64)
