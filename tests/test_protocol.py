"""Protocol units: every field of the union is accepted, every invalid one is a 400 naming it."""

import pytest

from serve_app.errors import InvalidRequest
from serve_app.protocol import ImagesResponse, parse_generation_request

BASE = {"model": "tiny-sdxl", "prompt": "a red apple"}

QUBRID_FULL = {
    "model": "qwen-image",
    "prompt": "A cyberpunk city street with neon reflections, flying cars overhead",
    "enhance_prompt": False,
    "go_fast": True,
    "guidance": 3,
    "negative_prompt": "",
    "num_inference_steps": 30,
    "seed": None,
    "disable_safety_checker": False,
    "image": None,
    "strength": 0,
    "lora_weights": None,
    "lora_scale": 1,
    "extra_lora_weights": [],
    "extra_lora_scale": [1, 1],
    "aspect_ratio": "16:9",
    "image_size": "optimize_for_quality",
    "output_format": "webp",
    "output_quality": 80,
}

OPENAI_FULL = {
    **BASE,
    "n": 2,
    "size": "1024x1024",
    "quality": "high",
    "response_format": "b64_json",
    "output_format": "jpeg",
    "output_compression": 50,
    "background": "opaque",
    "moderation": "auto",
    "user": "user-1234",
    "safety_identifier": "abc",
    "stream": False,
    "partial_images": 0,
}


def test_qubrid_full_example_is_accepted():
    request = parse_generation_request(QUBRID_FULL)
    assert request.aspect_ratio == "16:9"
    assert request.resolved_output_format() == "webp"
    assert request.output_quality_value == 80


def test_openai_full_request_is_accepted():
    request = parse_generation_request(OPENAI_FULL)
    assert request.n == 2
    assert request.output_quality_value == 50


def test_jpg_is_an_alias_of_jpeg():
    assert parse_generation_request({**BASE, "output_format": "jpg"}).resolved_output_format() == "jpeg"


@pytest.mark.parametrize(
    "field, value",
    [
        ("n", 0),
        ("n", 11),
        ("n", "2"),
        ("n", 1.5),
        ("n", True),
        ("seed", 7.5),
        ("num_inference_steps", 4.5),
        ("output_compression", 50.5),
        ("prompt", 5),
        ("model", ""),
        ("size", 1024),
        ("quality", "ultra"),
        ("response_format", "base64"),
        ("output_format", "gif"),
        ("output_compression", 101),
        ("output_quality", -1),
        ("background", "transparent"),
        ("background", "green"),
        ("style", "vivid"),
        ("moderation", "none"),
        ("stream", "yes"),
        ("partial_images", 2),  # without stream: true
        ("partial_images", 4),
        ("enhance_prompt", "yes"),
        ("go_fast", "yes"),
        ("guidance", -1),
        ("guidance", "high"),
        ("negative_prompt", 3),
        ("num_inference_steps", 0),
        ("seed", -1),
        ("seed", 2**63),
        ("seed", "42"),
        ("disable_safety_checker", 1),
        ("image", ""),
        ("strength", -0.1),
        ("strength", 2),
        ("lora_weights", 3),
        ("extra_lora_weights", "a/b"),
        ("extra_lora_scale", "1"),
        ("lora_scale", "x"),
        ("user", "u" * 300),
    ],
)
def test_invalid_field_is_a_400_naming_it(field, value):
    with pytest.raises(InvalidRequest) as caught:
        parse_generation_request({**BASE, field: value})
    assert caught.value.status_code == 400
    assert caught.value.param == field
    assert field in caught.value.message


@pytest.mark.parametrize("prompt", ["", "  "])
def test_an_empty_prompt_is_taken_but_not_enhanced(prompt):
    """OpenAI's schema allows an empty prompt: the model generates unconditionally (as for a variation)."""
    assert parse_generation_request({**BASE, "prompt": prompt}).prompt == prompt
    with pytest.raises(InvalidRequest) as caught:
        parse_generation_request({**BASE, "prompt": prompt, "enhance_prompt": True})
    assert caught.value.param == "enhance_prompt"


def test_unknown_field_is_named():
    with pytest.raises(InvalidRequest) as caught:
        parse_generation_request({**BASE, "steps": 4})
    assert caught.value.param == "steps"
    assert "Unrecognized request argument supplied: steps" == caught.value.message


@pytest.mark.parametrize("missing", ["prompt"])
def test_missing_required_field(missing):
    body = dict(BASE)
    del body[missing]
    with pytest.raises(InvalidRequest) as caught:
        parse_generation_request(body)
    assert caught.value.param == missing


def test_openai_nulls_mean_the_default():
    """The SDK types allow null for model and n: the default model (chosen by the service), one image."""
    request = parse_generation_request({"prompt": "x", "model": None, "n": None})
    assert request.model is None and request.n == 1
    assert parse_generation_request({"prompt": "x"}).model is None


def test_integral_floats_are_integers():
    fields = {"n": 2.0, "seed": 42.0, "num_inference_steps": 8.0, "output_compression": 70.0, "output_quality": 70.0}
    request = parse_generation_request({**BASE, "output_format": "jpeg", **fields, "partial_images": 1.0, "stream": True})
    for name, value in {**fields, "partial_images": 1}.items():
        assert getattr(request, name) == value and type(getattr(request, name)) is int, name


def test_output_compression_is_ignored_for_png_as_openai_does():
    request = parse_generation_request({**BASE, "output_format": "png", "output_compression": 100})
    assert request.resolved_output_format() == "png" and request.output_compression == 100
    unset = {k: v for k, v in BASE.items() if k not in ("output_format", "output_quality")}
    assert parse_generation_request({**unset, "output_compression": 5}).resolved_output_format() == "png"


def test_variation_form_fields():
    from serve_app.protocol import parse_variation_request

    request = parse_variation_request({"model": "m", "n": "2", "size": "64x64", "response_format": "url", "user": "u"})
    assert (request.prompt, request.n, request.size, request.response_format) == ("", 2, "64x64", "url")
    assert parse_variation_request({"n": "3.0", "seed": "7"}).n == 3
    assert parse_variation_request({}).model is None
    refused = [
        ({"prompt": "a cat"}, "prompt"),
        ({"stream": "true"}, "stream"),
        ({"enhance_prompt": "true"}, "enhance_prompt"),
        ({"image": "aGk="}, "image"),
        ({"mask": "x"}, "mask"),
        ({"n": "1.5"}, "n"),
        ({"n": "11"}, "n"),
    ]
    for fields, param in refused:
        with pytest.raises(InvalidRequest) as caught:
            parse_variation_request(fields)
        assert caught.value.param == param, fields


def test_body_must_be_an_object():
    with pytest.raises(InvalidRequest):
        parse_generation_request(["prompt"])


def test_conflicting_fields_are_rejected():
    cases = [
        ({"output_compression": 50, "output_quality": 60}, "output_compression"),
        ({"size": "64x64", "aspect_ratio": "1:1"}, "size"),
    ]
    for extra, param in cases:
        with pytest.raises(InvalidRequest) as caught:
            parse_generation_request({**BASE, **extra})
        assert caught.value.param == param


def test_response_parses_with_the_openai_sdk_strictly():
    from openai.types import ImagesResponse as SDKImagesResponse

    body = ImagesResponse(
        created=1,
        data=[{"b64_json": "aGk=", "revised_prompt": "p", "seed": 3}],
        output_format="png",
        size="64x64",
        quality="medium",
    ).model_dump(exclude_none=True)
    parsed = SDKImagesResponse.model_validate(body, strict=True)
    assert parsed.data[0].b64_json == "aGk="
    assert parsed.size == "64x64"

