"""Images in, end to end: image-to-image on /v1/images/generations and OpenAI's
/v1/images/edits, on every family of the embedded default, driven by the official OpenAI
clients and plain HTTP."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_node_sdk

pytestmark = pytest.mark.serve

MODELS = ["tiny-sdxl", "tiny-qwen-image", "tiny-flux"]
# Masked edits keep every pixel outside the mask exactly (PNG is lossless).
UNMASKED_TOLERANCE = 0


def scene(width: int = 64, height: int = 64) -> Image.Image:
    """A picture with structure: a colour gradient, a dark square and a light disc."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), np.full_like(x, 96)], -1)
    pixels[height // 4 : height // 2, width // 4 : width // 2] = (20, 30, 40)
    disc = (x - 3 * width // 4) ** 2 + (y - 2 * height // 3) ** 2 < (min(width, height) // 6) ** 2
    pixels[disc] = (240, 230, 200)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def png_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


def data_uri(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def edit_mask(width: int = 64, height: int = 64) -> tuple[bytes, np.ndarray]:
    """An RGBA mask whose transparent left half is to be repainted; and that half as booleans."""
    alpha = np.full((height, width), 255, np.uint8)
    alpha[:, : width // 2] = 0
    rgba = np.zeros((height, width, 4), np.uint8)
    rgba[..., 3] = alpha
    return png_bytes(Image.fromarray(rgba, "RGBA")), alpha == 0


def decoded(item) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item.b64_json))).convert("RGB"), dtype=np.int16)


def distance(a: np.ndarray, b: Image.Image | np.ndarray) -> float:
    return float(np.abs(a - np.asarray(b, dtype=np.int16)).mean())


@pytest.fixture(scope="module")
def client(served):
    return served.client(served.create_key("100000"))


@pytest.mark.parametrize("model", MODELS)
def test_image_to_image_follows_strength(client, model):
    """A low strength keeps the input; a high one moves far from it (same seed, same prompt)."""
    source = scene()
    results = {}
    for strength in (0.3, 1.0):
        result = client.images.generate(
            model=model,
            prompt="a watercolor landscape",
            extra_body={"image": data_uri(source), "strength": strength, "seed": 5, "num_inference_steps": 10},
        )
        assert result.size == "64x64"  # the input's size, fitted to the model
        results[strength] = distance(decoded(result.data[0]), source)
    assert results[0.3] < 0.5 * results[1.0], results
    assert results[0.3] < 40, results  # within ~15% of the range per pixel on average


@pytest.mark.parametrize("model", MODELS)
def test_masked_edit_keeps_the_unmasked_pixels(client, model):
    source = scene()
    mask, repaint = edit_mask()
    result = client.images.edit(
        model=model,
        image=("input.png", png_bytes(source), "image/png"),
        mask=("mask.png", mask, "image/png"),
        prompt="a red circle",
        n=2,
        extra_body={"seed": 3},
    )
    assert len(result.data) == 2 and result.size == "64x64"
    for item in result.data:
        out = decoded(item)
        kept = np.abs(out - np.asarray(source, dtype=np.int16))[~repaint]
        assert kept.max() <= UNMASKED_TOLERANCE
        assert np.abs(out - np.asarray(source, dtype=np.int16))[repaint].mean() > 5, "the masked half is repainted"
    assert [item.model_extra["seed"] for item in result.data] == [3, 4]


def test_edit_without_a_mask_is_image_to_image_and_can_return_urls(served, client):
    source = scene(96, 64)
    result = client.images.edit(
        model="tiny-sdxl",
        image=("input.png", png_bytes(source), "image/png"),
        prompt="the same scene at dusk",
        response_format="url",
        extra_body={"strength": 0.3, "num_inference_steps": 10},
    )
    assert result.size == "96x64"
    image = httpx.get(result.data[0].url)
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    out = np.asarray(Image.open(io.BytesIO(image.content)).convert("RGB"), dtype=np.int16)
    assert out.shape == (64, 96, 3)
    assert distance(out, source) < 40


@pytest.mark.parametrize("model", MODELS)
def test_seeded_image_to_image_equals_single_requests_while_batched(client, model):
    """Image i of a seeded n=3 request is the n=1 request with seed S+i, also when other work
    (other inputs, other prompts) is batched beside it."""
    source, other = scene(), scene().transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    body = {"image": data_uri(source), "strength": 0.6, "num_inference_steps": 6}

    def generate(n, seed, image=None, prompt="a stone bridge"):
        extra = {**body, "seed": seed, **({"image": data_uri(image)} if image is not None else {})}
        return client.images.generate(model=model, prompt=prompt, n=n, extra_body=extra)

    with ThreadPoolExecutor(6) as pool:
        together = pool.submit(generate, 3, 100)
        noise = [pool.submit(generate, 2, 7 + i, other, "a forest") for i in range(4)]
        batched = together.result()
        for future in noise:
            future.result()
    singles = [generate(1, 100 + i) for i in range(3)]
    for i, single in enumerate(singles):
        assert batched.data[i].model_extra["seed"] == 100 + i
        assert np.abs(decoded(batched.data[i]) - decoded(single.data[0])).max() <= 1, f"image {i}"
    assert np.abs(decoded(batched.data[0]) - decoded(batched.data[1])).max() > 1


def _balance(served, key: str) -> float:
    usage = httpx.get(f"{served.base_url}/v1/usage", headers={"authorization": f"Bearer {key}"}).json()
    return float(usage["balance"])


def _bomb() -> bytes:
    """A PNG that declares 30000x30000 pixels in a few kilobytes."""
    return png_bytes(Image.new("L", (30000, 30000)), optimize=False)


def _animated(fmt: str) -> bytes:
    frames = [scene(), scene().transpose(Image.Transpose.FLIP_TOP_BOTTOM)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><rect width="64" height="64"/></svg>'


@pytest.mark.parametrize(
    "image, strength, param",
    [
        ("bm90IGFuIGltYWdl", None, "image"),  # "not an image"
        ("data:image/svg+xml;base64," + base64.b64encode(SVG).decode(), None, "image"),
        (base64.b64encode(SVG).decode(), None, "image"),
        (base64.b64encode(png_bytes(Image.new("RGB", (1100, 1000)))).decode(), None, "image"),  # > 1 Mpx limit
        (base64.b64encode(_animated("PNG")).decode(), None, "image"),
        (base64.b64encode(_animated("WEBP")).decode(), None, "image"),
        (base64.b64encode(png_bytes(scene())[:300]).decode(), None, "image"),  # truncated
        ("https://images.example.com/cat.png", None, "image"),  # no host is allowed by default
        ("http://127.0.0.1:9/cat.png", None, "image"),
        (data_uri(scene()), 0, "strength"),
        (data_uri(scene()), 1.5, "strength"),
        (data_uri(scene()), -0.5, "strength"),
    ],
)
def test_hostile_image_inputs_are_400s_naming_the_field_and_cost_nothing(served, image, strength, param):
    key = served.create_key("50")
    body = {"model": "tiny-sdxl", "prompt": "x", "image": image}
    if strength is not None:
        body["strength"] = strength
    response = httpx.post(
        f"{served.base_url}/v1/images/generations", json=body, headers={"authorization": f"Bearer {key}"}, timeout=30
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["code"] == "invalid_request"
    assert response.headers["x-request-id"] == error["request_id"]
    assert _balance(served, key) == 50


def test_a_decompression_bomb_is_refused_quickly(served):
    key = served.create_key("5")
    response = httpx.post(
        f"{served.base_url}/v1/images/generations",
        json={"model": "tiny-sdxl", "prompt": "x", "image": base64.b64encode(_bomb()).decode()},
        headers={"authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "image"
    assert response.elapsed.total_seconds() < 5
    assert _balance(served, key) == 5


def _edit(served, key, files, data):
    return httpx.post(
        f"{served.base_url}/v1/images/edits",
        files=files,
        data=data,
        headers={"authorization": f"Bearer {key}"},
        timeout=60,
    )


def test_edit_refusals_name_their_field_and_cost_nothing(served):
    key = served.create_key("50")
    image = ("image", ("in.png", png_bytes(scene()), "image/png"))
    rgb_mask = ("mask", ("m.png", png_bytes(Image.new("RGB", (64, 64))), "image/png"))
    small_mask = ("mask", ("m.png", png_bytes(Image.new("RGBA", (32, 32))), "image/png"))
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64)).save(jpeg, format="JPEG")
    jpeg_mask = ("mask", ("m.jpg", jpeg.getvalue(), "image/jpeg"))
    two = [("image[]", ("a.png", png_bytes(scene()), "image/png")), ("image[]", ("b.png", png_bytes(scene()), "image/png"))]
    cases = [
        ([image, rgb_mask], {}, "mask"),
        ([image, small_mask], {}, "mask"),
        ([image, jpeg_mask], {}, "mask"),
        (two, {}, "image"),  # the families use one input image: not a silent drop
        ([small_mask], {}, "image"),  # a mask but no image
        ([("image", ("in.svg", SVG, "image/svg+xml"))], {}, "image"),
        ([image], {"strength": "0"}, "strength"),
        ([image], {"n": "many"}, "n"),
        ([image], {"input_fidelity": "high"}, "input_fidelity"),
        ([image], {"colour": "red"}, "colour"),
        ([image], {"negative_prompt": "blurry"}, None),  # tiny-flux takes no negative prompt
    ]
    for files, data, param in cases:
        model = "tiny-flux" if param is None else "tiny-sdxl"
        response = _edit(served, key, files, {"model": model, "prompt": "x", **data})
        assert response.status_code == 400, (param, response.text)
        assert response.json()["error"]["param"] == (param or "negative_prompt"), response.text
    # JSON is OpenAI's other form of an edit (tests/test_json_edits_e2e.py); anything else is a 400.
    json_edit = httpx.post(
        f"{served.base_url}/v1/images/edits", json={"model": "tiny-sdxl"}, headers={"authorization": f"Bearer {key}"}
    )
    assert json_edit.status_code == 400 and json_edit.json()["error"]["param"] == "images"
    not_multipart = httpx.post(
        f"{served.base_url}/v1/images/edits",
        content=b"model=tiny-sdxl",
        headers={"authorization": f"Bearer {key}", "content-type": "application/x-www-form-urlencoded"},
    )
    assert not_multipart.status_code == 400
    assert not_multipart.json()["error"]["code"] == "invalid_request"
    assert "multipart/form-data" in not_multipart.json()["error"]["message"]
    assert _balance(served, key) == 50


def test_edits_are_billed_per_image_delivered(served):
    key = served.create_key("20")
    response = _edit(
        served,
        key,
        [("image", ("in.png", png_bytes(scene()), "image/png"))],
        {"model": "tiny-qwen-image", "prompt": "x", "n": "3", "strength": "0.5"},
    )
    assert response.status_code == 200, response.text
    assert len(response.json()["data"]) == 3
    # tiny-qwen-image costs 2 credits an image
    assert response.headers["x-credits-charged"] == "6" and _balance(served, key) == 14


def test_node_sdk_edits_with_a_mask(served, tmp_path):
    source = scene()
    mask, repaint = edit_mask()
    (tmp_path / "in.png").write_bytes(png_bytes(source))
    (tmp_path / "mask.png").write_bytes(mask)
    seen = run_node_sdk(
        "edit.mjs", f"{served.base_url}/v1", served.create_key("10"), "tiny-sdxl",
        str(tmp_path / "in.png"), str(tmp_path / "mask.png"),
    )
    assert seen["count"] == 2 and seen["seeds"] == [11, 12] and seen["size"] == "64x64"
    for b64 in seen["images"]:
        out = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)
        assert np.abs(out - np.asarray(source, dtype=np.int16))[~repaint].max() <= UNMASKED_TOLERANCE
