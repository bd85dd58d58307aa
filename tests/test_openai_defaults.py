"""OpenAI's defaults and nulls, and /v1/images/variations, in the serving logic against fakes
(real accounts on SQLite, a fake model router and store)."""

from __future__ import annotations

import asyncio
import io

import pytest
from pydantic import ValidationError

from serve_app.accounts import Accounts, LocalRateLimiter, issue_key, open_store
from serve_app.config import CREDIT_UNITS, AppConfig
from serve_app.errors import InvalidRequest
from serve_app.serving import EditUpload, ImageGenerationService
from serve_app.work import Mode
from tests.fakes import FakeRouter, FakeStore, answer, serve


def model(model_id: str, **overrides) -> dict:
    return {
        "id": model_id,
        "family": "sdxl",
        "weights": "builtin:tiny-sdxl",
        "defaults": {"size": "64x64", "steps": 4},
        "limits": {"max_pixels": 65536, "min_side": 32},
        "price_per_image": "1",
        **overrides,
    }


CONFIG = AppConfig.model_validate(
    {
        "models": [
            model("first"),
            model("urls", defaults={"size": "64x64", "steps": 4, "response_format": "url"}),
            model("varied", defaults={"size": "64x64", "steps": 10, "variation_strength": 0.3}, price_per_image="2"),
        ]
    }
)


@pytest.fixture
def accounts(tmp_path):
    store = open_store(f"sqlite:///{tmp_path}/ledger.db")
    accounts = Accounts(store, default_rpm=1000, default_ipm=1000, rate_limiter=LocalRateLimiter())
    yield accounts
    accounts.close()


def make_key(accounts, credits):
    return issue_key(accounts.store, "k", credits_units=int(credits * CREDIT_UNITS)).secret


async def balance(accounts, key):
    api_key = await accounts.authenticate(f"Bearer {key}")
    return (await accounts.usage(api_key)).balance_units / CREDIT_UNITS


def run(svc, key, fields, endpoint="generate", **options):
    async def go():
        served = await serve(svc, key, fields, endpoint=endpoint, **options)
        await answer(served)
        return served

    return asyncio.run(go())


def png(width=48, height=32) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


# --- the default model ----------------------------------------------------------------------


def test_a_request_without_a_model_or_with_null_gets_the_default_model(accounts):
    key = make_key(accounts, 10)
    router = FakeRouter()
    svc = ImageGenerationService(CONFIG, router, accounts)
    run(svc, key, {"prompt": "x"})
    run(svc, key, {"prompt": "x", "model": None, "n": None})
    run(svc, key, EditUpload({"prompt": "x"}, [png()]), endpoint="edit")
    assert [job.shape.width for call in router.calls for job in call] == [64, 64, 48]
    configured = CONFIG.model_copy(update={"default_model": "varied"})
    svc = ImageGenerationService(configured, router, accounts)
    run(svc, key, {"prompt": "x", "model": None})
    assert router.calls[-1][0].shape.steps == 10 // 2  # varied's steps, halved by go_fast
    assert asyncio.run(balance(accounts, key)) == 10 - 3 - 2


def test_default_model_must_be_a_configured_model():
    assert CONFIG.default_model_id == "first"
    assert AppConfig.model_validate({**CONFIG.model_dump(), "default_model": "urls"}).default_model_id == "urls"
    with pytest.raises(ValidationError, match="default_model 'nope' is not one of models"):
        AppConfig.model_validate({**CONFIG.model_dump(), "default_model": "nope"})


# --- the default response_format ------------------------------------------------------------


@pytest.mark.parametrize(
    "model_id, base_url, needs_base_url, expected",
    [
        ("first", "http://127.0.0.1:8000", False, "b64_json"),  # the model's default is b64_json
        ("urls", "http://127.0.0.1:8000", True, "url"),  # a trusted base URL: URLs work
        ("urls", None, False, "url"),  # storage with its own public URLs (S3, public_base_url)
        ("urls", None, True, "b64_json"),  # local files through a non-loopback address: no URL to give
    ],
)
def test_the_default_response_format_is_the_models_where_urls_work(
    accounts, model_id, base_url, needs_base_url, expected
):
    key = make_key(accounts, 10)
    store = FakeStore()
    store.needs_request_base_url = needs_base_url
    svc = ImageGenerationService(CONFIG, FakeRouter(), accounts, store=store)
    served = run(svc, key, {"model": model_id, "prompt": "x"}, base_url=base_url)
    item = served.body.data[0]
    assert (item.url is not None, item.b64_json is not None) == (expected == "url", expected == "b64_json")


def test_without_storage_a_url_default_answers_base64_and_an_explicit_url_is_a_400(accounts):
    key = make_key(accounts, 10)
    svc = ImageGenerationService(CONFIG, FakeRouter(), accounts, store=None)
    assert run(svc, key, {"model": "urls", "prompt": "x"}).body.data[0].b64_json is not None
    with pytest.raises(InvalidRequest) as caught:
        run(svc, key, {"model": "urls", "prompt": "x", "response_format": "url"})
    assert caught.value.param == "response_format"


def test_a_stream_ignores_a_url_default(accounts):
    key = make_key(accounts, 10)
    svc = ImageGenerationService(CONFIG, FakeRouter(), accounts, store=FakeStore())
    served = run(svc, key, {"model": "urls", "prompt": "x", "stream": True})
    assert served.media_type == "text/event-stream"


def test_png_with_output_compression_and_integral_floats_are_served(accounts):
    key = make_key(accounts, 10)
    router = FakeRouter()
    svc = ImageGenerationService(CONFIG, router, accounts)
    served = run(svc, key, {"prompt": "x", "output_format": "png", "output_compression": 100, "n": 2.0, "seed": 5.0})
    assert served.body.output_format == "png"
    assert [item.seed for item in served.body.data] == [5, 6]


# --- variations -----------------------------------------------------------------------------


def test_a_variation_is_image_to_image_with_an_empty_prompt_at_the_configured_strength(accounts):
    key = make_key(accounts, 20)
    router = FakeRouter()
    svc = ImageGenerationService(CONFIG, router, accounts)
    served = run(svc, key, EditUpload({"model": "varied", "n": "2", "seed": "9"}, [png()]), endpoint="variation")
    (job,) = router.calls[0]
    assert job.prompt == "" and job.negative_prompt is None
    assert job.shape.mode is Mode.IMAGE_TO_IMAGE and job.shape.strength == 0.3
    assert (job.shape.width, job.shape.height) == (48, 32)  # the input's size, fitted
    assert job.image is not None and job.seeds == (9, 10)
    assert [item.seed for item in served.body.data] == [9, 10]
    assert served.headers["x-credits-charged"] == "4"  # billed like a generation: 2 images at 2
    assert asyncio.run(balance(accounts, key)) == 16

    run(svc, key, EditUpload({"strength": "0.9", "size": "64x64"}, [png()]), endpoint="variation")
    job = router.calls[-1][0]
    assert job.shape.strength == 0.9 and job.shape.width == 64  # the default model, the strength sent
    assert asyncio.run(balance(accounts, key)) == 15


@pytest.mark.parametrize(
    "upload, param",
    [
        (EditUpload({"model": "first"}, []), "image"),
        (EditUpload({"model": "first"}, [png(), png()]), "image"),
        (EditUpload({"model": "first", "prompt": "a cat"}, [png()]), "prompt"),
        (EditUpload({"model": "first", "stream": "true"}, [png()]), "stream"),
        (EditUpload({"model": "first", "strength": "0"}, [png()]), "strength"),
        (EditUpload({"model": "first", "size": "7x7"}, [png()]), "size"),
        (EditUpload({"model": "first"}, [b"not an image"]), "image"),
    ],
)
def test_variation_refusals_name_their_field_and_cost_nothing(accounts, upload, param):
    key = make_key(accounts, 5)
    router = FakeRouter()
    svc = ImageGenerationService(CONFIG, router, accounts)
    with pytest.raises(InvalidRequest) as caught:
        run(svc, key, upload, endpoint="variation")
    assert caught.value.param == param
    assert not router.calls
    assert asyncio.run(balance(accounts, key)) == 5


def test_a_variation_retried_with_its_idempotency_key_is_charged_once(accounts):
    key = make_key(accounts, 5)
    router = FakeRouter()
    svc = ImageGenerationService(CONFIG, router, accounts, store=FakeStore())
    upload = EditUpload({"model": "first", "seed": "3"}, [png()])
    first = run(svc, key, upload, endpoint="variation", idempotency_key="v-1")
    again = run(svc, key, upload, endpoint="variation", idempotency_key="v-1", request_id="req_test_2")
    assert again.headers["idempotent-replayed"] == "true"
    assert [d.b64_json for d in again.body.data] == [d.b64_json for d in first.body.data]
    assert len(router.calls) == 1
    assert asyncio.run(balance(accounts, key)) == 4
