"""Edits in OpenAI's JSON form (``images: [{image_url | file_id}]``, ``mask``) and with
several input images: the same plan as the multipart form, images read only after the
reservation, each family's own limit of input images. Serving against fakes."""

from __future__ import annotations

import asyncio
import base64
import io
from types import SimpleNamespace

import pytest
from PIL import Image

from serve_app.accounts import Accounts, LocalRateLimiter, issue_key, open_store
from serve_app.config import CREDIT_UNITS, AppConfig
from serve_app.edit_inputs import from_json
from serve_app.errors import InvalidRequest, NotFound
from serve_app.planning import MAX_REFERENCE_PIXELS, plan_generation
from serve_app.protocol import parse_edit_request, parse_generation_request
from serve_app.serving import EditUpload, ImageGenerationService
from serve_app.work import Mode
from tests.fakes import FakeRouter, answer, serve

MODEL_LIMITS = {"max_pixels": 65536, "min_side": 32, "max_side": 256}
CONFIG = AppConfig.model_validate(
    {
        "models": [
            {
                "id": "m",
                "family": "sdxl",
                "weights": "builtin:tiny-sdxl",
                "defaults": {"size": "64x64", "steps": 2},
                "limits": MODEL_LIMITS,
                "price_per_image": "1",
            },
            {
                "id": "edit",
                "family": "qwen-image-edit",
                "weights": "builtin:tiny-qwen-image-edit",
                "defaults": {"size": "64x64", "steps": 4, "guidance": 4.0},
                "limits": MODEL_LIMITS,
                "price_per_image": "2",
            },
        ],
        "image_input": {"allowed_url_hosts": ["images.example"]},
    }
)


def png(size=(48, 32), colour=(200, 30, 30, 255), clear_left=False) -> bytes:
    image = Image.new("RGBA", size, colour)
    if clear_left:
        image.paste((0, 0, 0, 0), (0, 0, size[0] // 2, size[1]))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


class FakeFiles:
    """The Files API as an edit reads it: per key, a purpose and bytes per id."""

    def __init__(self, files):
        self.files = files  # {(key id, file id): (purpose, bytes)}
        self.reads = []

    async def retrieve_file(self, key, file_id):
        if (key.id, file_id) not in self.files:
            raise NotFound(f"No such File object: {file_id}", param="file_id")
        purpose, data = self.files[(key.id, file_id)]
        return SimpleNamespace(id=file_id, purpose=purpose, bytes=len(data))

    async def file_content(self, key, file_id):
        self.reads.append(file_id)
        return self.files[(key.id, file_id)][1]


@pytest.fixture
def accounts(tmp_path):
    store = open_store(f"sqlite:///{tmp_path}/ledger.db")
    accounts = Accounts(store, default_rpm=1000, default_ipm=1000, rate_limiter=LocalRateLimiter())
    yield accounts
    accounts.close()


def make_key(accounts, credits=20):
    return issue_key(accounts.store, "k", credits_units=int(credits * CREDIT_UNITS)).secret


async def balance(accounts, secret):
    key = await accounts.authenticate(f"Bearer {secret}")
    return (await accounts.usage(key)).balance_units / CREDIT_UNITS


def edit(svc, secret, body, **options):
    async def run():
        served = await serve(svc, secret, body, endpoint="edit", **options)
        await answer(served)
        return served

    return asyncio.run(run())


# ----------------------------------------------------------------------------------------
# The JSON form's shape


def test_json_edit_members_are_checked_and_named():
    cases = [
        ({"prompt": "x"}, "images", "Missing required parameter: 'images'"),
        ({"prompt": "x", "images": []}, "images", "1 to 16"),
        ({"prompt": "x", "images": [{"image_url": "data:,"}] * 17}, "images", "at most 16"),
        ({"prompt": "x", "images": ["data:image/png;base64,AA=="]}, "images[0]", "object with image_url or file_id"),
        ({"prompt": "x", "images": [{"image_url": "a", "file_id": "b"}]}, "images[0]", "exactly one"),
        ({"prompt": "x", "images": [{"url": "a"}]}, "images[0].url", "Unrecognized"),
        ({"prompt": "x", "images": [{"image_url": ""}]}, "images[0].image_url", "non-empty"),
        ({"prompt": "x", "images": [{"image_url": "a"}], "mask": "m"}, "mask", "object"),
        ({"prompt": "x", "image": "abc", "images": [{"image_url": "a"}]}, "image", "images: ["),
    ]
    for body, param, message in cases:
        with pytest.raises(InvalidRequest, match=message.replace("[", r"\[")) as caught:
            from_json(body)
        assert caught.value.param == param, body
    with pytest.raises(InvalidRequest, match="JSON object"):
        from_json([1])


def test_json_fields_are_typed_as_json_and_form_fields_as_text():
    inputs = from_json({"prompt": "x", "n": 2.0, "model": None, "images": [{"image_url": "u"}]})
    assert parse_edit_request(inputs.fields, strict=inputs.json).n == 2
    with pytest.raises(InvalidRequest) as caught:
        parse_edit_request(from_json({"prompt": "x", "n": "2", "images": [{"file_id": "f"}]}).fields, strict=True)
    assert caught.value.param == "n"
    assert parse_edit_request({"prompt": "x", "n": "2"}).n == 2  # a form's text


# ----------------------------------------------------------------------------------------
# The same plan from either form


def test_json_and_multipart_edits_make_the_same_jobs(accounts):
    secret = make_key(accounts)
    image, mask = png(), png(clear_left=True)
    form_router, json_router = FakeRouter(), FakeRouter()
    fields = {"model": "m", "prompt": "a red box", "n": "2", "seed": "7", "size": "64x64"}
    edit(ImageGenerationService(CONFIG, form_router, accounts), secret, EditUpload(fields, [image], mask))
    body = {
        "model": "m",
        "prompt": "a red box",
        "n": 2,
        "seed": 7,
        "size": "64x64",
        "images": [{"image_url": data_url(image)}],
        "mask": {"image_url": data_url(mask)},
    }
    served = edit(ImageGenerationService(CONFIG, json_router, accounts), secret, body)
    assert form_router.jobs == json_router.jobs  # prompt, shape, seeds, image and mask pixels
    job = json_router.jobs[0]
    assert job.shape.mode is Mode.INPAINT and job.mask is not None and job.references == ()
    assert [item.seed for item in served.body.data] == [7, 8]
    assert asyncio.run(balance(accounts, secret)) == 16


def test_a_url_is_fetched_under_the_generation_allow_list_after_the_reservation(accounts, monkeypatch):
    from serve_app import image_input

    fetched = []

    def fetch(url, *, param, policy):
        fetched.append((url, param, policy.allowed_url_hosts))
        return png()

    monkeypatch.setattr(image_input, "fetch_image_bytes", fetch)
    secret = make_key(accounts)
    router = FakeRouter()
    svc = ImageGenerationService(CONFIG, router, accounts)
    body = {"model": "m", "prompt": "x", "images": [{"image_url": "https://images.example/a.png"}]}
    edit(svc, secret, body)
    assert fetched == [("https://images.example/a.png", "images[0].image_url", ("images.example",))]
    assert router.jobs[0].shape.mode is Mode.IMAGE_TO_IMAGE

    # An unreadable image is a 400 naming it, found after the reservation: refunded.
    with pytest.raises(InvalidRequest) as caught:
        edit(svc, secret, {"model": "m", "prompt": "x", "images": [{"image_url": "data:image/png;base64,AAAA"}]})
    assert caught.value.param == "images[0].image_url"
    assert asyncio.run(balance(accounts, secret)) == 19
    assert accounts.store.inconsistencies() == []


def test_a_host_off_the_allow_list_is_refused_by_the_real_fetcher(accounts):
    secret = make_key(accounts)
    svc = ImageGenerationService(CONFIG, FakeRouter(), accounts)
    with pytest.raises(InvalidRequest, match="hosts the operator allows") as caught:
        edit(svc, secret, {"model": "m", "prompt": "x", "images": [{"image_url": "https://elsewhere.example/a.png"}]})
    assert caught.value.param == "images[0].image_url"


def test_file_ids_without_a_files_api_are_a_clear_400(accounts):
    secret = make_key(accounts)
    svc = ImageGenerationService(CONFIG, FakeRouter(), accounts)
    with pytest.raises(InvalidRequest, match="file inputs are not supported") as caught:
        edit(svc, secret, {"model": "m", "prompt": "x", "images": [{"file_id": "file-abc"}]})
    assert caught.value.param == "images[0].file_id"
    assert asyncio.run(balance(accounts, secret)) == 20


def test_file_ids_are_read_through_the_files_api_as_the_key_sees_them(accounts):
    secret = make_key(accounts)
    key = asyncio.run(accounts.authenticate(f"Bearer {secret}"))
    image = png()
    files = FakeFiles(
        {
            (key.id, "file-img"): ("vision", image),
            (key.id, "file-mask"): ("user_data", png(clear_left=True)),
            (key.id, "file-batch"): ("batch", b'{"custom_id": "a"}\n'),
        }
    )
    router = FakeRouter()
    svc = ImageGenerationService(CONFIG, router, accounts, files=files)
    body = {"model": "m", "prompt": "x", "images": [{"file_id": "file-img"}], "mask": {"file_id": "file-mask"}}
    edit(svc, secret, body)
    assert router.jobs[0].shape.mode is Mode.INPAINT and files.reads == ["file-img", "file-mask"]

    for file_id, message in [("file-batch", "purpose 'batch'"), ("file-other-key", "no such file")]:
        with pytest.raises(InvalidRequest, match=message) as caught:
            edit(svc, secret, {"model": "m", "prompt": "x", "images": [{"file_id": file_id}]})
        assert caught.value.param == "images[0].file_id"


def test_json_edits_replay_by_their_body(accounts):
    from tests.fakes import FakeStore

    secret = make_key(accounts)
    router = FakeRouter()
    svc = ImageGenerationService(CONFIG, router, accounts, store=FakeStore())
    body = {"model": "m", "prompt": "x", "seed": 1, "images": [{"image_url": data_url(png())}]}
    first = edit(svc, secret, body, idempotency_key="k-1")
    again = edit(svc, secret, dict(body), idempotency_key="k-1")
    assert again.headers.get("idempotent-replayed") == "true"
    assert [d.seed for d in again.body.data] == [d.seed for d in first.body.data]
    assert len(router.calls) == 1


# ----------------------------------------------------------------------------------------
# Several input images


def test_single_image_families_refuse_a_second_image_before_anything_is_held(accounts):
    secret = make_key(accounts)
    svc = ImageGenerationService(CONFIG, FakeRouter(), accounts)
    with pytest.raises(InvalidRequest, match="at most 1 input image") as caught:
        edit(svc, secret, EditUpload({"model": "m", "prompt": "x"}, [png(), png()]))
    assert caught.value.param == "image"
    body = {"model": "m", "prompt": "x", "images": [{"image_url": data_url(png())}] * 2}
    with pytest.raises(InvalidRequest, match="at most 1 input image") as caught:
        edit(svc, secret, body)
    assert caught.value.param == "images"
    assert asyncio.run(balance(accounts, secret)) == 20


@pytest.mark.parametrize("form", ["multipart", "json"])
def test_a_multi_reference_family_takes_up_to_its_limit(accounts, form):
    secret = make_key(accounts)
    router = FakeRouter()
    svc = ImageGenerationService(CONFIG, router, accounts)
    images = [png((48, 32), (200, 0, 0, 255)), png((40, 80), (0, 200, 0, 255)), png((64, 64), (0, 0, 200, 255))]

    def body(parts):
        if form == "multipart":
            return EditUpload({"model": "edit", "prompt": "put them together", "seed": "3"}, parts)
        return {
            "model": "edit",
            "prompt": "put them together",
            "seed": 3,
            "images": [{"image_url": data_url(p)} for p in parts],
        }

    served = edit(svc, secret, body(images))
    job = router.jobs[0]
    assert job.shape.mode is Mode.EDIT and job.shape.strength is None
    # The first image is fitted to the output size (its own shape), the others keep theirs.
    assert (job.image.width, job.image.height) == (job.shape.width, job.shape.height) == (48, 32)
    assert [(r.width, r.height) for r in job.references] == [(40, 80), (64, 64)]
    assert job.shape.reference_sizes == ((40, 80), (64, 64))
    assert job.references[0].pixels[:3] == bytes([0, 200, 0])
    # usage counts every input image
    assert served.body.usage.input_tokens_details.image_tokens > 0
    with pytest.raises(InvalidRequest, match="at most 3 input image") as caught:
        edit(svc, secret, body([*images, images[0]]))
    assert caught.value.param == ("image" if form == "multipart" else "images")


def test_multi_reference_jobs_are_the_same_from_either_form(accounts):
    secret = make_key(accounts)
    images = [png((48, 32)), png((40, 80), (0, 200, 0, 255))]
    form_router, json_router = FakeRouter(), FakeRouter()
    edit(
        ImageGenerationService(CONFIG, form_router, accounts),
        secret,
        EditUpload({"model": "edit", "prompt": "x", "seed": "1"}, images),
    )
    body = {"model": "edit", "prompt": "x", "seed": 1, "images": [{"image_url": data_url(p)} for p in images]}
    edit(ImageGenerationService(CONFIG, json_router, accounts), secret, body)
    assert form_router.jobs == json_router.jobs


def test_an_edit_family_takes_no_mask_no_strength_and_needs_an_image():
    model = CONFIG.model("edit")
    image = Image.new("RGB", (64, 64))
    request = parse_edit_request({"model": "edit", "prompt": "x"})
    assert plan_generation(request, model, image).shape.mode is Mode.EDIT
    with pytest.raises(InvalidRequest) as caught:
        plan_generation(request, model, image, Image.new("L", (64, 64)))
    assert caught.value.param == "mask"
    with pytest.raises(InvalidRequest) as caught:
        plan_generation(parse_edit_request({"model": "edit", "prompt": "x", "strength": "0.5"}), model, image)
    assert caught.value.param == "strength"
    with pytest.raises(InvalidRequest, match="needs at least one input image") as caught:
        plan_generation(parse_generation_request({"model": "edit", "prompt": "x"}), model)
    assert caught.value.param == "image"


def test_large_references_are_scaled_down_keeping_their_shape():
    model = CONFIG.model("edit")
    request = parse_edit_request({"model": "edit", "prompt": "x"})
    plan = plan_generation(request, model, Image.new("RGB", (64, 64)), None, [Image.new("RGB", (2048, 1024))])
    (reference,) = plan.references
    assert reference.width * reference.height <= MAX_REFERENCE_PIXELS
    assert abs(reference.width / reference.height - 2) < 0.01
