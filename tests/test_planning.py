"""Model-dependent validation: sizes, steps, seeds and encoding are resolved per model."""

import pytest

from serve_app.config import ModelConfig
from serve_app.errors import InvalidRequest
from serve_app.planning import plan_generation
from serve_app.protocol import parse_generation_request

SDXL = ModelConfig.model_validate(
    {
        "id": "tiny-sdxl",
        "family": "sdxl",
        "weights": "builtin:tiny-sdxl",
        "defaults": {"size": "64x64", "steps": 4, "guidance": 5.0},
        "limits": {"max_pixels": 65536, "min_side": 32, "max_side": 256, "max_steps": 50, "max_n": 10},
    }
)
QWEN = ModelConfig.model_validate(
    {**SDXL.model_dump(), "id": "tiny-qwen-image", "family": "qwen-image", "weights": "builtin:tiny-qwen-image"}
)


def plan(model=SDXL, **fields):
    # go_fast off: these tests are about the steps asked for (tests/test_extensions_planning.py
    # covers what go_fast does to them).
    body = {"model": model.id, "prompt": "apple", "go_fast": False, **fields}
    return plan_generation(parse_generation_request(body), model)


def test_defaults_come_from_the_model():
    result = plan()
    assert (result.shape.width, result.shape.height, result.shape.steps) == (64, 64, 4)
    assert result.shape.guidance == 5.0
    assert result.output_format == "png"
    assert result.response_format == "b64_json"
    assert len(result.seeds) == 1


def test_seeds_are_consecutive_from_the_given_seed():
    assert plan(n=3, seed=41).seeds == (41, 42, 43)


def test_random_seed_when_none_given():
    drawn = {plan(n=2).seeds for _ in range(5)}
    assert len(drawn) > 1
    assert all(second == first + 1 for first, second in drawn)


def test_explicit_size_and_auto():
    assert plan(size="128x96").size == "128x96"
    assert plan(size="auto").size == "64x64"


@pytest.mark.parametrize("size", ["65x64", "16x16", "512x512", "1024", "x64", "64x64x64"])
def test_unsupported_size_is_a_400(size):
    with pytest.raises(InvalidRequest) as caught:
        plan(size=size)
    assert caught.value.param == "size"


def test_qwen_needs_multiples_of_16():
    with pytest.raises(InvalidRequest):
        plan(QWEN, size="72x72")
    assert plan(QWEN, size="80x64").size == "80x64"


def test_aspect_ratio_and_image_size():
    wide = plan(aspect_ratio="16:9")
    assert wide.shape.width > wide.shape.height
    assert wide.shape.width % 8 == 0 and wide.shape.height % 8 == 0
    fast = plan(image_size="optimize_for_speed")
    assert fast.shape.width * fast.shape.height < 64 * 64
    with pytest.raises(InvalidRequest) as caught:
        plan(aspect_ratio="wide")
    assert caught.value.param == "aspect_ratio"
    with pytest.raises(InvalidRequest) as caught:
        plan(image_size="huge")
    assert caught.value.param == "image_size"


def test_a_derived_size_moves_within_the_limits_rather_than_failing():
    # Production SDXL: a quarter of 1024x1024 at 16:9 would be 680x384, under its 512 side.
    sdxl = SDXL.model_copy(update={
        "defaults": SDXL.defaults.model_copy(update={"size": "1024x1024"}),
        "limits": SDXL.limits.model_copy(update={"min_side": 512, "max_side": 2048, "max_pixels": 1572864}),
    })
    assert plan(sdxl, aspect_ratio="16:9", image_size="optimize_for_speed").size == "912x512"
    assert plan(sdxl, aspect_ratio="9:16", image_size="optimize_for_speed").size == "512x912"
    assert plan(sdxl, aspect_ratio="16:9", image_size="optimize_for_quality").size == "1368x768"  # unchanged
    assert plan(sdxl, aspect_ratio="4:1").size == "2048x512"  # the only 4:1 within 512..2048
    with pytest.raises(InvalidRequest) as caught:
        plan(sdxl, aspect_ratio="5:1")  # 512 high would need 2560 wide
    assert caught.value.param == "aspect_ratio" and "between 512 and 2048" in caught.value.message
    with pytest.raises(InvalidRequest):
        plan(sdxl, size="1024x384")  # a size the client spelled out is not moved


def test_quality_maps_to_steps():
    assert plan(quality="low").shape.steps == 2
    assert plan(quality="medium").shape.steps == 4
    assert plan(quality="high").shape.steps == 8
    assert plan(quality="hd").quality_label == "high"
    assert plan(quality="standard").shape.steps == 4


def test_num_inference_steps_and_its_limit():
    assert plan(num_inference_steps=7).shape.steps == 7
    with pytest.raises(InvalidRequest) as caught:
        plan(num_inference_steps=51)
    assert caught.value.param == "num_inference_steps"
    with pytest.raises(InvalidRequest):
        plan(num_inference_steps=7, quality="low")


def test_a_qwen_image_model_needs_two_steps():
    # One flow-match step with Qwen-Image's terminal shift gives an all-NaN (black) image.
    assert plan(num_inference_steps=1).shape.steps == 1
    with pytest.raises(InvalidRequest) as caught:
        plan(QWEN, num_inference_steps=1)
    assert caught.value.param == "num_inference_steps" and "at least 2" in caught.value.message
    assert plan(QWEN, num_inference_steps=2).shape.steps == 2
    assert plan(QWEN.model_copy(update={"defaults": QWEN.defaults.model_copy(update={"steps": 3})}),
                quality="low").shape.steps == 2


def test_guidance_negative_prompt_and_output():
    result = plan(guidance=2.5, negative_prompt="blurry", output_format="webp", output_quality=60)
    assert result.shape.guidance == 2.5
    assert result.negative_prompt == "blurry" and result.shape.with_negative_prompt
    assert (result.output_format, result.output_quality) == ("webp", 60)
    assert plan(negative_prompt="").negative_prompt is None
    with pytest.raises(InvalidRequest) as caught:
        plan(negative_prompt="blurry", guidance=1.0)
    assert caught.value.param == "negative_prompt"


def test_n_above_model_limit():
    small = SDXL.model_copy(update={"limits": SDXL.limits.model_copy(update={"max_n": 2})})
    with pytest.raises(InvalidRequest) as caught:
        plan(small, n=3)
    assert caught.value.param == "n"


def test_seed_overflow_is_rejected():
    with pytest.raises(InvalidRequest) as caught:
        plan(n=2, seed=2**63 - 1)
    assert caught.value.param == "seed"


def test_jobs_split_by_batch_size():
    jobs = plan(n=10, seed=1).jobs("req_1", max_images_per_job=4)
    assert [job.seeds for job in jobs] == [(1, 2, 3, 4), (5, 6, 7, 8), (9, 10)]
    assert {job.request_id for job in jobs} == {"req_1"}


# ----------------------------------------------------------------------------------------
# Image input: the mode, strength and size follow the input image


FLUX = ModelConfig.model_validate(
    {**SDXL.model_dump(), "id": "tiny-flux", "family": "flux", "weights": "builtin:tiny-flux", "defaults": {
        "size": "64x64", "steps": 4, "guidance": 3.5}}
)
SCHNELL = FLUX.model_copy(update={"id": "schnell", "defaults": FLUX.defaults.model_copy(update={"guidance": 0.0})})


def _picture(width, height, mode="RGB"):
    from PIL import Image

    return Image.new(mode, (width, height), 128)


def plan_with(model=SDXL, image=None, mask=None, **fields):
    request = parse_generation_request({"model": model.id, "prompt": "apple", **fields})
    return plan_generation(request, model, image, mask)


def test_strength_needs_an_image_and_an_image_needs_a_strength_above_zero():
    from serve_app.work import Mode

    assert plan_with(strength=0).shape.mode is Mode.TEXT_TO_IMAGE  # the qubrid default
    with pytest.raises(InvalidRequest) as caught:
        plan_with(strength=0.5)
    assert caught.value.param == "strength"
    with pytest.raises(InvalidRequest) as caught:
        plan_with(image=_picture(64, 64), strength=0)
    assert caught.value.param == "strength"
    default = plan_with(image=_picture(64, 64))
    assert default.shape.mode is Mode.IMAGE_TO_IMAGE and default.shape.strength == SDXL.defaults.strength
    inpaint = plan_with(image=_picture(64, 64), mask=_picture(64, 64, "L"))
    assert inpaint.shape.mode is Mode.INPAINT and inpaint.shape.strength == 1.0
    assert plan_with(image=_picture(64, 64), strength=0.3).shape.strength == 0.3


def test_a_strength_too_small_for_the_steps_is_a_400():
    # SDXL runs int(4 * 0.2) = 0 steps; a flow-match family runs 4 - int(3.2) = 1.
    with pytest.raises(InvalidRequest) as caught:
        plan_with(image=_picture(64, 64), strength=0.2)
    assert caught.value.param == "strength"
    assert plan_with(QWEN, image=_picture(64, 64), strength=0.2).shape.strength == 0.2


def test_the_output_size_follows_the_input_unless_a_size_is_given():
    assert plan_with(image=_picture(96, 64)).size == "96x64"
    assert plan_with(image=_picture(97, 61)).size == "104x64"  # onto the 8-pixel grid, closest ratio
    assert plan_with(image=_picture(1000, 1000)).size == "256x256"  # within max_pixels 65536
    assert plan_with(image=_picture(20, 20)).size == "32x32"  # within min_side 32
    resized = plan_with(image=_picture(96, 64), size="64x64")
    assert resized.size == "64x64" and (resized.image.width, resized.image.height) == (64, 64)
    with pytest.raises(InvalidRequest) as caught:
        plan_with(image=_picture(4000, 10))  # no allowed size has that shape
    assert caught.value.param == "image"


def test_input_image_and_mask_are_fitted_to_the_output_as_raw_pixels():
    result = plan_with(image=_picture(128, 128, "RGBA"), mask=_picture(128, 128, "L"), size="64x32")
    assert (result.image.mode, result.image.width, result.image.height) == ("RGB", 64, 32)
    assert len(result.image.pixels) == 64 * 32 * 3
    assert (result.mask.mode, len(result.mask.pixels)) == ("L", 64 * 32)
    job = result.jobs("req", 8)[0]
    assert job.image == result.image and job.mask == result.mask


def test_flux_guidance_is_distilled():
    assert plan(FLUX).shape.guidance == 3.5
    assert plan(FLUX, guidance=2.0).shape.guidance == 2.0
    for model, fields in [(FLUX, {"negative_prompt": "blurry"}), (SCHNELL, {"negative_prompt": "blurry"})]:
        with pytest.raises(InvalidRequest, match="distilled") as caught:
            plan(model, **fields)
        assert caught.value.param == "negative_prompt"
    with pytest.raises(InvalidRequest, match="takes no guidance") as caught:
        plan(SCHNELL, guidance=3.5)
    assert caught.value.param == "guidance"
    with pytest.raises(InvalidRequest, match="above 0"):
        plan(FLUX, guidance=0)
    assert plan(SCHNELL).shape.guidance == 0.0
