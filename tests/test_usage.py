"""OpenAI's ``usage`` on JSON answers and ``completed`` events (serve_app/usage.py): the
units, the counts under the built-in tiny tokenizers, and responses that parse as
openai-python's types with it."""

from __future__ import annotations

import asyncio
import io
import json
from types import SimpleNamespace

import openai.types
import pytest
from PIL import Image

from serve_app.families import get_family
from serve_app.protocol import ImagesResponse
from serve_app.serving import EditUpload
from serve_app.usage import count_usage, image_tokens
from serve_app.work import CallShape
from tests.fakes import FakeRouter, FakeStore, answer, serve
from tests.test_serving import accounts, make_key, service  # noqa: F401 - the accounts fixture

# --- the units ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, tokens",
    [((1024, 1024), 4096), ((64, 64), 16), ((1536, 1024), 6144), ((1032, 1024), 65 * 64), ((8, 8), 1)],
)
def test_an_image_is_one_token_per_16x16_patch(size, tokens):
    assert image_tokens(*size) == tokens


def test_total_is_input_plus_output():
    usage = count_usage(7, [(64, 64)], [(64, 64), (128, 64)])
    assert usage.input_tokens_details.text_tokens == 7
    assert usage.input_tokens_details.image_tokens == 16
    assert usage.input_tokens == 23
    assert usage.output_tokens == 16 + 32 == usage.output_tokens_details.image_tokens
    assert usage.output_tokens_details.text_tokens == 0
    assert usage.total_tokens == 23 + 48


# --- text tokens under each family's own tokenizer(s) ------------------------------------------


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from builtin_models.flux import build_t5_tokenizer
    from builtin_models.parts import build_clip_tokenizer, build_qwen_tokenizer

    work = tmp_path_factory.mktemp("tokenizers")
    return SimpleNamespace(
        clip=build_clip_tokenizer(work / "clip"), qwen=build_qwen_tokenizer(work / "qwen"), t5=build_t5_tokenizer()
    )


def shape(guidance: float = 5.0) -> CallShape:
    return CallShape(width=64, height=64, steps=2, guidance=guidance, with_negative_prompt=False)


def test_sdxl_counts_its_clip_tokens_without_start_end_or_padding(tokenizers):
    pipe = SimpleNamespace(tokenizer=tokenizers.clip, tokenizer_2=tokenizers.clip)
    # The tiny CLIP vocabulary: 'a</w>', 'p', 'h', 'o', 't', 'o</w>', 'o', 'f</w>', 'a</w>', 'c', 'at</w>'.
    assert get_family("sdxl").count_text_tokens(pipe, shape(), "a photo of a cat") == 11


class OneTokenPerWord:
    model_max_length = 77

    def __call__(self, text, **_):
        return {"input_ids": text.split()}


def test_sdxl_counts_the_longer_of_its_two_tokenizers(tokenizers):
    pipe = SimpleNamespace(tokenizer=OneTokenPerWord(), tokenizer_2=tokenizers.clip)
    assert get_family("sdxl").count_text_tokens(pipe, shape(), "a photo of a cat") == 11
    pipe = SimpleNamespace(tokenizer=tokenizers.clip, tokenizer_2=OneTokenPerWord())
    assert get_family("sdxl").count_text_tokens(pipe, shape(), "a photo of a cat") == 11


def test_a_prompt_past_what_clip_reads_counts_only_what_it_reads(tokenizers):
    pipe = SimpleNamespace(tokenizer=tokenizers.clip, tokenizer_2=tokenizers.clip)
    assert get_family("sdxl").count_text_tokens(pipe, shape(), "cat " * 400) == 75  # 77 less start and end


def test_flux_counts_t5_tokens_up_to_its_sequence_length(tokenizers):
    pipe = SimpleNamespace(tokenizer=tokenizers.clip, tokenizer_2=tokenizers.t5)
    flux = get_family("flux")
    assert flux.count_text_tokens(pipe, shape(), "a photo of a cat") == 5  # whole words in the tiny T5 vocabulary
    assert flux.count_text_tokens(pipe, shape(guidance=3.5), "cat " * 600) == 511  # dev: 512 with </s>
    assert flux.count_text_tokens(pipe, shape(guidance=0), "cat " * 600) == 255  # schnell: 256 with </s>


def test_qwen_image_counts_the_prompt_not_its_template(tokenizers):
    pipe = SimpleNamespace(tokenizer=tokenizers.qwen)
    qwen = get_family("qwen-image")
    assert qwen.count_text_tokens(pipe, shape(), "a photo of a cat") == 14
    assert qwen.count_text_tokens(pipe, shape(), "cat " * 600) == 512


# --- the service: JSON answers and stream events ------------------------------------------------

# FakeRouter counts one text token per word and returns 64x64 images (16 tokens each).
PROMPT = "a red apple on a table"


def png(width: int = 64, height: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def run(svc, key, fields, **options):
    async def go():
        served = await serve(svc, key, fields, **options)
        return served, b"".join(await answer(served))

    return asyncio.run(go())


def test_a_json_answer_carries_usage_that_openai_python_reads(accounts):  # noqa: F811
    svc = service(accounts, FakeRouter())
    served, body = run(svc, make_key(accounts, 10), {"model": "m", "prompt": PROMPT, "n": 3})
    parsed = openai.types.ImagesResponse.model_validate(json.loads(body))
    assert parsed.usage is not None
    assert parsed.usage.input_tokens_details.text_tokens == 6
    assert parsed.usage.input_tokens_details.image_tokens == 0
    assert parsed.usage.input_tokens == 6  # the prompt once, however many images
    assert parsed.usage.output_tokens == 3 * 16
    assert parsed.usage.total_tokens == 6 + 48
    assert served.headers["x-credits-charged"] == "4.5"  # the credits beside it, per image


def test_usage_counts_the_negative_prompt(accounts):  # noqa: F811
    svc = service(accounts, FakeRouter())
    fields = {"model": "m", "prompt": PROMPT, "negative_prompt": "blurry dark"}
    _, body = run(svc, make_key(accounts, 10), fields)
    assert json.loads(body)["usage"]["input_tokens_details"]["text_tokens"] == 6 + 2


def test_withheld_images_are_not_output(accounts):  # noqa: F811
    svc = service(accounts, FakeRouter(flag_seeds={11}))
    _, body = run(svc, make_key(accounts, 10), {"model": "m", "prompt": PROMPT, "n": 3, "seed": 10})
    answer_ = json.loads(body)
    assert len(answer_["data"]) == 2
    assert answer_["usage"]["output_tokens"] == 2 * 16
    assert answer_["usage"]["input_tokens"] == 6


def test_an_edit_counts_its_input_image_at_the_size_the_model_sees(accounts):  # noqa: F811
    svc = service(accounts, FakeRouter())
    # 128x128 in, fitted to the 64x64 output: 16 tokens, not 64.
    upload = EditUpload(fields={"model": "m", "prompt": PROMPT, "size": "64x64"}, images=[png(128, 128)])
    _, body = run(svc, make_key(accounts, 10), upload, endpoint="edit")
    usage = openai.types.ImagesResponse.model_validate(json.loads(body)).usage
    assert usage.input_tokens_details.image_tokens == 16
    assert usage.input_tokens == 6 + 16
    assert usage.output_tokens == 16
    assert usage.total_tokens == 6 + 16 + 16


def test_a_replay_repeats_the_usage(accounts):  # noqa: F811
    svc = service(accounts, FakeRouter(), store=FakeStore())
    key = make_key(accounts, 10)
    fields = {"model": "m", "prompt": PROMPT, "n": 2}
    _, first = run(svc, key, fields, idempotency_key="k1")
    served, again = run(svc, key, fields, idempotency_key="k1")
    assert served.headers.get("idempotent-replayed") == "true"
    assert json.loads(again)["usage"] == json.loads(first)["usage"]


def events(body: bytes) -> list[dict]:
    return [json.loads(line[6:]) for line in body.decode().splitlines() if line.startswith("data: ")]


@pytest.mark.parametrize("endpoint", ["generate", "edit"])
def test_each_completed_event_carries_its_images_usage(accounts, endpoint):  # noqa: F811
    svc = service(accounts, FakeRouter())
    fields = {"model": "m", "prompt": PROMPT, "n": 2, "stream": True, "partial_images": 1}
    event_type = openai.types.ImageGenCompletedEvent
    image_tokens_in = 0
    if endpoint == "edit":
        form = {"model": "m", "prompt": PROMPT, "n": "2", "stream": "true", "partial_images": "1"}
        fields = EditUpload(fields=form, images=[png()])
        event_type = openai.types.ImageEditCompletedEvent
        image_tokens_in = 16
    _, body = run(svc, make_key(accounts, 10), fields, endpoint=endpoint)
    completed = [event for event in events(body) if event["type"].endswith(".completed")]
    assert len(completed) == 2
    for event in completed:
        usage = event_type.model_validate(event).usage
        assert usage.input_tokens_details.text_tokens == 6
        assert usage.input_tokens_details.image_tokens == image_tokens_in
        assert usage.output_tokens == 16  # this image's
        assert usage.total_tokens == 6 + image_tokens_in + 16
    assert [event["credits_charged"] for event in completed] == ["1.5", "3"]


def test_the_response_model_carries_usage_in_the_api_document():
    schema = ImagesResponse.model_json_schema()
    assert "usage" in schema["properties"]


# --- the replica: its images carry the count ------------------------------------------------------


def test_the_replica_counts_the_prompt_with_the_models_own_tokenizer():
    """The tiny SDXL replica (as Serve would build it, without Ray): every image of a job,
    in every part of it, carries the prompt's and the negative prompt's tokens."""
    from deployments.model_deployment import ImageModelDeployment
    from serve_app.config import load_app_config
    from serve_app.work import GenerationJob, StreamedImage
    from tests.conftest import MODEL_CACHE, ROOT

    base = next(m for m in load_app_config(ROOT / "serve_config.yaml").models if m.family == "sdxl")
    data = base.model_dump(mode="json") | {"warmup": False, "safety_checker": None}
    replica = ImageModelDeployment(data, str(MODEL_CACHE))

    async def gather(work):
        return replica._coalescer.submit(work)

    replica._gather_batch = gather
    replica._max_batch_images = 2  # three images: two parts
    shape = CallShape(width=64, height=64, steps=1, guidance=5.0, with_negative_prompt=True)
    job = GenerationJob("r", "a photo of a cat", "blurry", shape, (1, 2, 3))

    async def collect():
        return [item for chunk in [chunk async for chunk in replica.generate_stream(job)] for item in chunk]

    items = asyncio.run(collect())
    assert sorted(item.image_index for item in items if isinstance(item, StreamedImage)) == [0, 1, 2]
    assert {item.image.text_tokens for item in items} == {11 + 6}  # the tiny CLIP's counts, as above
