"""``usage`` on the served graph, read by clients nobody here wrote: LiteLLM's SDK (which
prices image calls from it) and the official OpenAI client, JSON and streamed. The text
counts are those of the built-in tiny tokenizers (tests/test_usage.py has the units)."""

from __future__ import annotations

import io
import os

import pytest
from PIL import Image

pytestmark = pytest.mark.serve

PROMPT = "a small red apple"
# PROMPT's tokens under each tiny model's tokenizer: CLIP (SDXL), T5 (FLUX), Qwen2 (Qwen-Image).
TEXT_TOKENS = {"tiny-sdxl": 13, "tiny-flux": 12, "tiny-qwen-image": 15}
IMAGE_64 = 16  # a 64x64 image: 4 x 4 patches of 16x16 pixels


@pytest.fixture(scope="module")
def key(served):
    return served.create_key("100000")


def test_litellm_reads_the_usage(served, key):
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch of LiteLLM's price list
    litellm = pytest.importorskip("litellm", reason="LiteLLM's SDK (the test extra) is not installed")

    response = litellm.image_generation(
        model="openai/tiny-sdxl", prompt=PROMPT, n=2, size="64x64", api_base=f"{served.base_url}/v1", api_key=key
    )
    assert len(response.data) == 2
    usage = response.usage
    # LiteLLM keeps the details as the dict it was sent (its own cost code reads both forms).
    details = usage.input_tokens_details
    details = details if isinstance(details, dict) else details.model_dump()
    assert details == {"text_tokens": TEXT_TOKENS["tiny-sdxl"], "image_tokens": 0}
    assert usage.input_tokens == TEXT_TOKENS["tiny-sdxl"]
    assert usage.output_tokens == 2 * IMAGE_64
    assert usage.total_tokens == TEXT_TOKENS["tiny-sdxl"] + 2 * IMAGE_64


@pytest.mark.parametrize("model", sorted(TEXT_TOKENS))
def test_each_model_counts_with_its_own_tokenizer(served, key, model):
    response = served.client(key).images.with_raw_response.generate(model=model, prompt=PROMPT, size="64x64")
    usage = response.parse().usage
    assert usage.input_tokens_details.text_tokens == TEXT_TOKENS[model]
    assert usage.output_tokens == IMAGE_64
    assert usage.total_tokens == TEXT_TOKENS[model] + IMAGE_64
    assert response.headers["x-credits-charged"]  # the credits beside it


def test_streamed_images_and_edits_carry_their_usage(served, key):
    client = served.client(key)
    stream = client.images.generate(model="tiny-sdxl", prompt=PROMPT, size="64x64", n=2, stream=True)
    completed = [event for event in stream if event.type == "image_generation.completed"]
    assert len(completed) == 2
    for event in completed:  # each image's: the whole input, its own output
        assert event.usage.input_tokens_details.text_tokens == TEXT_TOKENS["tiny-sdxl"]
        assert event.usage.output_tokens == IMAGE_64

    picture = io.BytesIO()
    Image.new("RGB", (128, 128), (30, 120, 200)).save(picture, "PNG")
    edited = client.images.edit(
        model="tiny-sdxl", image=("in.png", picture.getvalue(), "image/png"), prompt=PROMPT, size="64x64"
    )
    assert edited.usage.input_tokens_details.image_tokens == IMAGE_64  # the input as the model saw it: 64x64
    assert edited.usage.input_tokens == TEXT_TOKENS["tiny-sdxl"] + IMAGE_64
    assert edited.usage.total_tokens == TEXT_TOKENS["tiny-sdxl"] + 2 * IMAGE_64
