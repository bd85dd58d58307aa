"""What the qubrid fields become in a plan: LoRA adapters from the model's registry, and
go_fast as the model's speed mode."""

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
        "loras": {
            "style": {"source": "builtin:tiny-sdxl-lora", "family": "sdxl"},
            "ink": {"source": "/loras/ink", "family": "sdxl"},
        },
    }
)
FLUX = ModelConfig.model_validate(
    {"id": "tiny-flux", "family": "flux", "weights": "builtin:tiny-flux", "defaults": {"size": "64x64", "steps": 8}}
)


def plan(model=SDXL, **fields):
    return plan_generation(parse_generation_request({"model": model.id, "prompt": "apple", **fields}), model)


def test_the_seed_documents_example_means_no_adapters():
    shape = plan(lora_weights=None, lora_scale=1, extra_lora_weights=[], extra_lora_scale=[1, 1]).shape
    assert shape.adapters == ()


def test_adapters_and_scales_become_the_call_shape():
    shape = plan(lora_weights="style", lora_scale=0.7, extra_lora_weights=["ink"], extra_lora_scale=[0.3]).shape
    assert shape.adapters == (("style", 0.7), ("ink", 0.3))
    assert plan(lora_weights="style").shape.adapters == (("style", 1.0),)
    # Extra adapters without their scales get the document's default scale, 1 each.
    assert plan(extra_lora_weights=["ink"]).shape.adapters == (("ink", 1.0),)


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"lora_weights": "nope"}, "lora_weights"),
        ({"lora_weights": "https://example.com/x.safetensors"}, "lora_weights"),
        ({"extra_lora_weights": ["style", "nope"], "extra_lora_scale": [1, 1]}, "extra_lora_weights"),
        ({"extra_lora_weights": ["ink"], "extra_lora_scale": [1, 1]}, "extra_lora_scale"),
        ({"extra_lora_weights": ["ink", "style"], "extra_lora_scale": [1]}, "extra_lora_scale"),
        ({"extra_lora_scale": [0.5]}, "extra_lora_scale"),
        ({"lora_scale": 0.5}, "lora_scale"),
        ({"lora_weights": "style", "extra_lora_weights": ["style"], "extra_lora_scale": [1]}, "extra_lora_weights"),
        ({"lora_weights": "style", "lora_scale": float("inf")}, "lora_scale"),
    ],
)
def test_a_bad_adapter_field_is_a_400_naming_it(fields, param):
    with pytest.raises(InvalidRequest) as caught:
        plan(**fields)
    assert caught.value.param == param


def test_an_adapter_of_another_family_is_a_config_error():
    with pytest.raises(ValueError, match="loras.style"):
        ModelConfig.model_validate(
            {**FLUX.model_dump(), "loras": {"style": {"source": "builtin:tiny-sdxl-lora", "family": "sdxl"}}}
        )


def test_go_fast_is_part_of_the_shape_and_defaults_to_the_model():
    assert plan(FLUX).shape.go_fast is True  # the qubrid default
    assert plan(FLUX, go_fast=False).shape.go_fast is False
    assert plan(FLUX).shape.steps == 8  # FLUX caches instead of cutting steps
    off_by_default = FLUX.model_copy(update={"go_fast": FLUX.speed_mode.model_copy(update={"default": False})})
    assert plan(off_by_default).shape.go_fast is False


def test_go_fast_halves_sdxl_steps_but_keeps_an_image_to_image_step():
    assert plan(go_fast=True).shape.steps == 2
    assert plan(go_fast=False).shape.steps == 4
    assert plan(go_fast=True, num_inference_steps=9).shape.steps == 5


def test_a_cache_on_a_unet_family_is_a_config_error():
    with pytest.raises(ValueError, match="go_fast.cache"):
        ModelConfig.model_validate({**SDXL.model_dump(), "go_fast": {"cache": "taylorseer"}})
