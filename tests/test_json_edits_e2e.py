"""OpenAI's JSON edits and multi-reference edits, end to end on the served embedded default:
the official SDK's multipart ``images.edit`` and its ``client.post`` of the JSON form (the SDK's
``images.edit`` sends multipart only) give the same images for the same inputs and seed."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import openai
import pytest
from openai.types import ImagesResponse
from PIL import Image

from tests.test_images_in_e2e import png_bytes, scene

pytestmark = pytest.mark.serve

EDIT_MODEL = "tiny-qwen-image-edit"


def pixels(item) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item.b64_json))).convert("RGB"), dtype=np.int16)


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def mask_png() -> bytes:
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 32, 64))
    return png_bytes(mask)


@pytest.fixture(scope="module")
def client(served):
    return served.client(served.create_key("100000"))


def json_edit(client, **body) -> ImagesResponse:
    return client.post("/images/edits", body=body, cast_to=ImagesResponse)


def test_json_and_multipart_edits_give_the_same_images(client):
    source = png_bytes(scene())
    form = client.images.edit(
        model="tiny-sdxl",
        image=("input.png", source, "image/png"),
        mask=("mask.png", mask_png(), "image/png"),
        prompt="a red circle",
        n=2,
        extra_body={"seed": 11},
    )
    body = client.post(
        "/images/edits",
        body={
            "model": "tiny-sdxl",
            "images": [{"image_url": data_url(source)}],
            "mask": {"image_url": data_url(mask_png())},
            "prompt": "a red circle",
            "n": 2,
            "seed": 11,
        },
        cast_to=ImagesResponse,
    )
    assert [item.model_extra["seed"] for item in body.data] == [11, 12]
    assert body.size == form.size == "64x64" and body.usage is not None
    for ours, theirs in zip(body.data, form.data):
        assert np.abs(pixels(ours) - pixels(theirs)).max() <= 1


def test_several_images_in_one_edit_through_both_forms(client):
    first, second, third = (png_bytes(scene(*size)) for size in ((64, 64), (48, 80), (64, 32)))
    form = client.images.edit(
        model=EDIT_MODEL,
        image=[("a.png", first, "image/png"), ("b.png", second, "image/png"), ("c.png", third, "image/png")],
        prompt="put the three together",
        extra_body={"seed": 5},
    )
    body = json_edit(
        client,
        model=EDIT_MODEL,
        images=[{"image_url": data_url(each)} for each in (first, second, third)],
        prompt="put the three together",
        seed=5,
    )
    assert form.size == body.size == "64x64"
    assert np.abs(pixels(form.data[0]) - pixels(body.data[0])).max() <= 1
    fewer = json_edit(client, model=EDIT_MODEL, images=[{"image_url": data_url(first)}], prompt="x", seed=5)
    assert np.abs(pixels(fewer.data[0]) - pixels(body.data[0])).max() > 1  # the references matter
    # 3 input images of 64x64 (or their own shapes) counted in usage
    assert body.usage.input_tokens_details.image_tokens > fewer.usage.input_tokens_details.image_tokens


def test_an_image_uploaded_to_the_files_api_edits_as_its_data_url(served, client):
    """files.create(purpose="vision") keeps an image; a JSON edit naming its file_id gives
    the same image as the same edit with a data URL (same seed); another key cannot use it."""
    source = png_bytes(scene())
    uploaded = client.files.create(file=("scene.png", source, "image/png"), purpose="vision")
    assert isinstance(uploaded, openai.types.FileObject)
    assert (uploaded.purpose, uploaded.bytes, uploaded.filename) == ("vision", len(source), "scene.png")
    assert client.files.content(uploaded.id).content == source
    edit = {"model": "tiny-sdxl", "prompt": "a red circle", "n": 2, "seed": 21, "strength": 0.6}
    by_file = json_edit(client, images=[{"file_id": uploaded.id}], **edit)
    by_url = json_edit(client, images=[{"image_url": data_url(source)}], **edit)
    assert [item.model_extra["seed"] for item in by_file.data] == [21, 22]
    for ours, theirs in zip(by_file.data, by_url.data, strict=True):
        assert np.abs(pixels(ours) - pixels(theirs)).max() <= 1
    stranger = served.client(served.create_key("10"))
    with pytest.raises(openai.BadRequestError) as caught:
        json_edit(stranger, images=[{"file_id": uploaded.id}], **edit)
    assert caught.value.body["param"] == "images[0].file_id"
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("notes.txt", b"not an image", "text/plain"), purpose="user_data")
    assert caught.value.body["param"] == "file"


def test_limits_and_unsupported_inputs_are_400s_naming_the_field(served, client):
    image = png_bytes(scene())
    cases = [
        # a single-image family refuses a second image, in either form
        (
            lambda: client.images.edit(model="tiny-sdxl", image=[("a.png", image), ("b.png", image)], prompt="x"),
            "image",
        ),
        (
            lambda: json_edit(client, model="tiny-sdxl", images=[{"image_url": data_url(image)}] * 2, prompt="x"),
            "images",
        ),
        # the edit family's own limit, 3
        (
            lambda: json_edit(client, model=EDIT_MODEL, images=[{"image_url": data_url(image)}] * 4, prompt="x"),
            "images",
        ),
        (
            lambda: json_edit(client, model="tiny-sdxl", images=[{"file_id": "file-nope"}], prompt="x"),
            "images[0].file_id",
        ),
        (
            lambda: json_edit(
                client, model="tiny-sdxl", images=[{"image_url": "https://example.com/a.png"}], prompt="x"
            ),
            "images[0].image_url",
        ),
        (
            lambda: json_edit(
                client, model=EDIT_MODEL, images=[{"image_url": data_url(image)}], prompt="x", strength=0.5
            ),
            "strength",
        ),
        (lambda: client.images.generate(model=EDIT_MODEL, prompt="x"), "image"),
    ]
    for call, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            call()
        assert caught.value.body["param"] == param, caught.value.body


def test_a_json_edit_by_plain_http_names_its_content_type(served):
    key = served.create_key("10")
    response = httpx.post(
        f"{served.base_url}/v1/images/edits",
        headers={"authorization": f"Bearer {key}"},
        json={"model": "tiny-sdxl", "prompt": "x", "images": [{"image_url": data_url(png_bytes(scene()))}], "seed": 1},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.json()["data"][0]["seed"] == 1
    assert response.headers["x-credits-charged"] == "1"
