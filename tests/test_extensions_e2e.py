"""The qubrid document's LoRA, enhance_prompt, go_fast and disable_safety_checker fields on
the embedded default under `serve.run`, through the official OpenAI client (``extra_body``)
and plain HTTP."""

from __future__ import annotations

import base64
import io
import math
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from builtin_models.safety_checker import flag_pattern
from tests.conftest import run_cli

pytestmark = pytest.mark.serve

MODELS = ["tiny-sdxl", "tiny-qwen-image", "tiny-flux"]


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a - b).astype(np.float64) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def key(served):
    return served.create_key("100000")


def post(served, key, body, **headers):
    return httpx.post(
        f"{served.base_url}/v1/images/generations",
        json=body,
        headers={"Authorization": f"Bearer {key}", **headers},
        timeout=120,
    )


def balance(served, key) -> float:
    return httpx.get(f"{served.base_url}/v1/usage", headers={"Authorization": f"Bearer {key}"}).json()["balance"]


@pytest.mark.parametrize("model", MODELS)
def test_a_lora_changes_the_image_and_never_the_next_plain_one(served, key, model):
    client = served.client(key)

    def image(**extra):
        result = client.images.generate(model=model, prompt="a red apple", extra_body={"seed": 5, **extra})
        return pixels(result.data[0].b64_json)

    plain = image()
    styled = image(lora_weights="tiny-style", lora_scale=1.0)
    assert np.abs(styled - plain).mean() > 1.0
    # Within 1 level of uint8, the design's rule: once loaded, the adapter's peft layers stay
    # on the denoiser's path and on some CPUs round differently (README, LoRA).
    assert np.abs(image(lora_weights="tiny-style", lora_scale=0) - plain).max() <= 1
    assert np.abs(image() - plain).max() <= 1


def test_lora_fields_over_plain_http(served, key):
    # The seed document's full example: no adapters.
    example = {"lora_weights": None, "lora_scale": 1, "extra_lora_weights": [], "extra_lora_scale": [1, 1]}
    ok = post(served, key, {"model": "tiny-sdxl", "prompt": "a boat", "seed": 1, **example})
    assert ok.status_code == 200
    for body, param in [
        ({"lora_weights": "https://example.com/lora.safetensors"}, "lora_weights"),
        ({"extra_lora_weights": ["tiny-style"], "extra_lora_scale": [1, 1]}, "extra_lora_scale"),
        ({"lora_weights": "tiny-style", "lora_scale": "strong"}, "lora_scale"),
    ]:
        response = post(served, key, {"model": "tiny-sdxl", "prompt": "a boat", **body})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param
    both = post(
        served,
        key,
        {
            "model": "tiny-flux",
            "prompt": "a boat",
            "seed": 2,
            "extra_lora_weights": ["tiny-style"],
            "extra_lora_scale": [0.5],
        },
    )
    assert both.status_code == 200


def test_the_model_card_lists_its_adapters(served, key):
    card = served.client(key).models.retrieve("tiny-qwen-image")
    assert card.model_extra["adapters"] == ["tiny-style"]
    assert card.model_extra["safety_checker"] is True


def test_enhance_prompt_uses_the_in_graph_enhancer(served, key):
    result = served.client(key).images.generate(
        model="tiny-sdxl", prompt="a red apple", extra_body={"enhance_prompt": True, "seed": 3}
    )
    revised = result.data[0].revised_prompt
    assert revised and revised != "a red apple" and revised.isprintable()
    response = post(served, key, {"model": "tiny-sdxl", "prompt": "a red apple", "enhance_prompt": True, "seed": 3})
    assert response.status_code == 200
    assert response.headers["x-prompt-enhancement"] == "applied"
    assert response.json()["data"][0]["revised_prompt"] == revised  # greedy: the same rewrite


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sdxl"])
def test_go_fast_is_a_different_but_close_image(served, key, model):
    client = served.client(key)
    fast, slow = (
        pixels(
            client.images.generate(
                model=model, prompt="a lighthouse", extra_body={"seed": 9, "go_fast": go_fast, "num_inference_steps": 8}
            )
            .data[0]
            .b64_json
        )
        for go_fast in (True, False)
    )
    assert not np.array_equal(fast, slow)
    assert psnr(fast, slow) > 12
    # The default is go_fast: true, as in the qubrid document.
    default = post(served, key, {"model": model, "prompt": "a lighthouse", "seed": 9, "num_inference_steps": 8})
    assert np.array_equal(pixels(default.json()["data"][0]["b64_json"]), fast)


def flagged_request(model="tiny-sdxl", **extra):
    """An image-to-image request that keeps the pattern the tiny safety checker flags."""
    return {
        "model": model,
        "prompt": "a picture",
        "image": data_uri(flag_pattern(64, 64)),
        "strength": 0.5,
        "num_inference_steps": 4,
        "go_fast": False,
        "n": 2,
        "seed": 1,
        **extra,
    }


def test_flagged_images_are_a_400_with_nothing_charged(served):
    key = served.create_key("10")
    response = post(served, key, flagged_request())
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "content_policy_violation" and error["type"] == "invalid_request_error"
    assert balance(served, key) == 10
    with pytest.raises(openai.BadRequestError) as caught:
        served.client(key).images.generate(
            model="tiny-qwen-image", prompt="x", extra_body=flagged_request("tiny-qwen-image")
        )
    assert caught.value.code == "content_policy_violation"
    assert balance(served, key) == 10
    # Ordinary images pass the same checker.
    assert post(served, key, {"model": "tiny-sdxl", "prompt": "a picture", "n": 2}).status_code == 200


def test_disable_safety_checker_only_for_keys_an_operator_allowed(served):
    plain = served.create_key("10", name="safety-plain")
    denied = post(served, plain, flagged_request(disable_safety_checker=True))
    assert denied.status_code == 403
    assert denied.json()["error"]["param"] == "disable_safety_checker"
    assert denied.json()["error"]["type"] == "permission_error"

    allowed = served.create_key("10", "--allow-disable-safety-checker", name="safety-allowed")
    client = served.client(allowed)
    result = client.images.generate(
        model="tiny-sdxl", prompt="x", extra_body=flagged_request(disable_safety_checker=True)
    )
    assert len(result.data) == 2 and balance(served, allowed) == 8

    # The operator changes the permission; the key cache notices within seconds.
    run_cli("keys", "safety-checker", "safety-plain", "allow-disable", database_url=served.database_url)
    deadline = time.monotonic() + 15
    while (response := post(served, plain, flagged_request(disable_safety_checker=True))).status_code == 403:
        assert time.monotonic() < deadline, "the permission change never reached the ingress"
        time.sleep(0.5)
    assert response.status_code == 200 and len(response.json()["data"]) == 2


def test_an_edit_takes_extra_loras_as_the_sdk_sends_lists(served, key):
    """The OpenAI SDK sends a list in a form as repeated `name[]` parts."""
    client = served.client(key)
    source = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(source, format="PNG")

    def edit(**extra):
        source.seek(0)
        result = client.images.edit(
            model="tiny-sdxl",
            image=("in.png", source, "image/png"),
            prompt="a red apple",
            extra_body={"seed": 5, "strength": 0.9, **extra},
        )
        return pixels(result.data[0].b64_json)

    plain = edit()
    styled = edit(extra_lora_weights=["tiny-style"], extra_lora_scale=[1.0])
    assert not np.array_equal(styled, plain)  # the adapter ran (its effect on an edit is small)
    assert np.array_equal(edit(extra_lora_weights=["tiny-style"], extra_lora_scale=[0.0]), plain)
