"""The family registry: each family's rules in one module, read by config and planning."""

from __future__ import annotations

import subprocess
import sys

import pytest

from serve_app.config import ModelConfig
from serve_app.errors import InvalidRequest
from serve_app.families import FAMILIES, GuidanceKind, get_family
from serve_app.families.base import Family
from serve_app.planning import plan_generation
from serve_app.protocol import parse_generation_request
from serve_app.work import CallShape, Mode


def model(family: str, **fields) -> ModelConfig:
    return ModelConfig.model_validate(
        {"id": f"m-{family}", "family": family, "weights": "x", "defaults": {"size": "64x64", "steps": 4}, **fields}
    )


def test_the_registry_holds_four_families_with_their_rules():
    assert sorted(FAMILIES) == ["flux", "qwen-image", "qwen-image-edit", "sdxl"]
    assert {name: (f.size_multiple, f.min_steps, f.guidance) for name, f in FAMILIES.items()} == {
        "sdxl": (8, 1, GuidanceKind.CLASSIFIER_FREE),
        "qwen-image": (16, 2, GuidanceKind.TRUE_CFG),
        "flux": (16, 1, GuidanceKind.DISTILLED),
        "qwen-image-edit": (16, 2, GuidanceKind.TRUE_CFG),
    }
    assert not FAMILIES["flux"].takes_negative_prompt
    for family in FAMILIES.values():
        assert family.tiny_model == f"tiny-{family.name}"
        if family.name == "qwen-image-edit":  # multi-reference edits only
            assert set(family.pipeline_classes) == {Mode.EDIT} == {family.base_mode}
            assert family.max_reference_images == 3 and family.max_images_per_call == 1
            continue
        assert set(family.pipeline_classes) == {Mode.TEXT_TO_IMAGE, Mode.IMAGE_TO_IMAGE, Mode.INPAINT}
        assert family.base_mode is Mode.TEXT_TO_IMAGE
        assert family.max_reference_images == 1


def test_unknown_family_is_a_config_error_naming_the_choices():
    with pytest.raises(ValueError, match="unknown model family 'dall-e'.*flux.*qwen-image.*sdxl"):
        model("dall-e")


def test_min_steps_are_checked_per_family():
    with pytest.raises(ValueError, match="a qwen-image model needs at least 2"):
        model("qwen-image", defaults={"size": "64x64", "steps": 1})
    assert model("flux", defaults={"size": "64x64", "steps": 1, "guidance": 3.5}).defaults.steps == 1


def test_size_multiple_comes_from_the_family():
    with pytest.raises(ValueError, match="multiple of 16"):
        model("flux", defaults={"size": "72x72"})
    assert model("sdxl", defaults={"size": "72x72"}).defaults.size == "72x72"


def test_call_arguments_say_what_guidance_means():
    shape = CallShape(64, 64, 4, 4.0, False)
    assert FAMILIES["sdxl"].call_arguments(shape, ["a"], ["b"]) == {
        "prompt": ["a"], "guidance_scale": 4.0, "negative_prompt": ["b"]
    }
    qwen = FAMILIES["qwen-image"].call_arguments(shape, ["a", "b"], None)
    assert qwen["true_cfg_scale"] == 4.0 and qwen["negative_prompt"] == [" ", " "]  # true CFG needs one
    no_cfg = FAMILIES["qwen-image"].call_arguments(CallShape(64, 64, 4, 1.0, False), ["a"], None)
    assert no_cfg["negative_prompt"] is None
    flux = FAMILIES["flux"].call_arguments(shape, ["a"], None)
    assert flux == {"prompt": ["a"], "guidance_scale": 4.0, "max_sequence_length": 512}
    assert "negative_prompt" not in flux
    schnell = FAMILIES["flux"].call_arguments(CallShape(64, 64, 4, 0.0, False), ["a"], None)
    assert schnell["max_sequence_length"] == 256


def test_denoising_steps_follow_each_pipelines_arithmetic():
    assert FAMILIES["sdxl"].denoising_steps(10, 0.35) == 3  # int(3.5)
    assert FAMILIES["qwen-image"].denoising_steps(10, 0.35) == 4  # 10 - int(6.5)
    assert FAMILIES["flux"].denoising_steps(4, 0.1) == 1
    assert FAMILIES["sdxl"].denoising_steps(4, 0.1) == 0


def test_every_family_has_a_built_in_tiny_model_and_lora():
    """A family's tiny builder is no part of the product: its module in ``builtin_models``
    and one line in ``builtin_models.FAMILY_BUILDERS``."""
    from builtin_models import BUILTIN_MODELS, FAMILY_BUILDERS

    assert sorted(FAMILY_BUILDERS) == sorted(FAMILIES)
    for family in FAMILIES.values():
        assert BUILTIN_MODELS[family.tiny_model].family == family.name
        assert BUILTIN_MODELS[f"{family.tiny_model}-lora"].family is None


class TinyDiT(Family):
    """A family added the documented way: one class and one registry line."""

    name = "tiny-dit"
    size_multiple = 32
    min_steps = 3
    guidance = GuidanceKind.CLASSIFIER_FREE
    pipeline_classes = {Mode.TEXT_TO_IMAGE: "DiTPipeline"}
    class_name_prefix = "DiT"
    tiny_model = "tiny-dit"


def test_adding_a_family_is_one_module_and_one_registry_line(monkeypatch):
    monkeypatch.setitem(FAMILIES, "tiny-dit", TinyDiT())
    dit = model("tiny-dit", defaults={"size": "64x64", "steps": 3})
    assert dit.rules is get_family("tiny-dit")
    request = parse_generation_request({"model": dit.id, "prompt": "x", "size": "80x64"})
    with pytest.raises(InvalidRequest, match="multiples of 32"):
        plan_generation(request, dit)
    request = parse_generation_request({"model": dit.id, "prompt": "x", "num_inference_steps": 2})
    with pytest.raises(InvalidRequest, match="at least 3"):
        plan_generation(request, dit)


def test_family_modules_import_without_torch():
    code = (
        "import sys, serve_app.families, serve_app.planning, serve_app.image_input, builtin_models; "
        "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
