"""Fast CPU tests of the built-in tiny models, pipeline loading, the runner and encoding.

The tiny models are built once per checkout into the shared model cache (tests.conftest).
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import builtin_models
from builtin_models import BUILTIN_MODELS, BuiltinModel, ensure_builtin_model
from deployments.encoding import encode_image
from deployments.pipeline_loader import PipelineLoadError, load_pipelines
from deployments.pipeline_runner import run_pipeline
from serve_app.families.qwen_image import prompt_template_prefix_length
from serve_app.work import CallShape, Mode
from tests.conftest import MODEL_CACHE

FAMILIES = {"sdxl": "tiny-sdxl", "qwen-image": "tiny-qwen-image", "flux": "tiny-flux"}
GUIDANCE = {"sdxl": 5.0, "qwen-image": 4.0, "flux": 3.5}

# Different texts and token lengths, so a batch pads them differently from a single call.
PROMPTS = [
    "a cat",
    "a very long prompt about a small brown dog sitting on a red sofa in the warm afternoon sun",
    "",
    "the quick brown fox jumps over the lazy dog",
]
NEGATIVE_PROMPTS = ["blurry", "", "low quality, ugly, deformed hands, watermark, text", "no"]
SEEDS = [7, 1234, 7, 99]


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    # The checkout's model cache, which the other modules and the served app use too, so a
    # session builds each tiny model once. The determinism test still compares these with
    # a fresh build of its own (and so also catches a builder changed without a version bump).
    return MODEL_CACHE


@pytest.fixture(scope="session")
def built(cache_dir) -> dict[str, Path]:
    return {name: ensure_builtin_model(name, cache_dir) for name in BUILTIN_MODELS}


@pytest.fixture(scope="session")
def pipes(built, cache_dir):
    return {
        family: load_pipelines(family, f"builtin:{name}", "cpu", "float32", cache_dir)
        for family, name in FAMILIES.items()
    }


# ----------------------------------------------------------------------------------------
# Building


def _folder_contents(folder: Path) -> dict[str, object]:
    from safetensors.torch import load_file

    contents: dict[str, object] = {}
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        rel = str(path.relative_to(folder))
        if path.suffix == ".safetensors":
            contents[rel] = {k: (str(v.dtype), tuple(v.shape), v.numpy().tobytes()) for k, v in load_file(path).items()}
        else:
            contents[rel] = path.read_bytes()
    return contents


@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
def test_tiny_build_is_deterministic(name, built, tmp_path):
    # A tiny LoRA is built from its tiny model, which it finds in the same cache beside it.
    # That base's own determinism is its own case here; copy the session's build of it in,
    # so this case rebuilds only the adapter and not the (much costlier) base as well.
    base = [f"{name[: -len('-lora')]}-{builtin_models.BUILTIN_VERSION}"] if name.endswith("-lora") else []
    for folder in base:
        shutil.copytree(built[name[: -len("-lora")]], tmp_path / folder)
    torch.manual_seed(2024)
    expected_next = torch.rand(3)
    torch.manual_seed(2024)

    again = ensure_builtin_model(name, tmp_path)

    assert torch.equal(torch.rand(3), expected_next), "building must not disturb the caller's RNG"
    assert again == tmp_path / f"{name}-{builtin_models.BUILTIN_VERSION}"
    first, second = _folder_contents(built[name]), _folder_contents(again)
    assert sorted(first) == sorted(second)
    assert any(rel.endswith(".safetensors") for rel in first)
    for rel in first:
        assert first[rel] == second[rel], f"{rel} differs between two builds"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([again.name, *base]), (
        "no temporary folders are left behind"
    )


def test_existing_folder_is_reused(built, cache_dir):
    folder = built["tiny-sdxl"]
    stamp = (folder / "model_index.json").stat().st_mtime_ns
    assert ensure_builtin_model("tiny-sdxl", cache_dir) == folder
    assert (folder / "model_index.json").stat().st_mtime_ns == stamp


def test_losing_a_build_race_uses_the_winners_folder(tmp_path, monkeypatch):
    target = tmp_path / f"tiny-sdxl-{builtin_models.BUILTIN_VERSION}"

    def build_while_another_process_wins(work: Path) -> None:
        (work / "model_index.json").write_text('{"mine": true}')
        target.mkdir()  # the other process renames its finished folder into place first
        (target / "model_index.json").write_text('{"winner": true}')
        (target / "weights.bin").write_bytes(b"x")

    monkeypatch.setitem(BUILTIN_MODELS, "tiny-sdxl", BuiltinModel("sdxl", build_while_another_process_wins))
    assert ensure_builtin_model("tiny-sdxl", tmp_path) == target
    assert json.loads((target / "model_index.json").read_text()) == {"winner": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_unknown_builtin_name(tmp_path):
    with pytest.raises(ValueError, match="unknown built-in model"):
        ensure_builtin_model("tiny-nope", tmp_path)


# ----------------------------------------------------------------------------------------
# Loading


def test_builtin_folders_load_with_plain_from_pretrained(built):
    from diffusers import QwenImagePipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer, Qwen2Tokenizer

    sdxl = StableDiffusionXLPipeline.from_pretrained(built["tiny-sdxl"])
    assert isinstance(sdxl.tokenizer, CLIPTokenizer) and sdxl.tokenizer.model_max_length == 77
    assert sdxl.text_encoder.config.vocab_size >= len(sdxl.tokenizer)
    assert sdxl.vae_scale_factor == 8

    qwen = QwenImagePipeline.from_pretrained(built["tiny-qwen-image"])
    assert isinstance(qwen.tokenizer, Qwen2Tokenizer)
    text_config = qwen.text_encoder.config.text_config
    assert text_config.vocab_size >= len(qwen.tokenizer)
    for token_id in (text_config.bos_token_id, text_config.eos_token_id, text_config.pad_token_id):
        assert 0 <= token_id < text_config.vocab_size
    for token in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert len(qwen.tokenizer(token, add_special_tokens=False).input_ids) == 1, token
    assert qwen.vae_scale_factor == 8


@pytest.mark.parametrize("mode", [mode for mode in Mode if mode is not Mode.EDIT])
def test_qwen_prompt_template_start_idx_drops_exactly_the_template_prefix(pipes, mode):
    pipe = pipes["qwen-image"][mode]
    template = pipe.prompt_template_encode
    start = pipe.prompt_template_encode_start_idx
    assert start == prompt_template_prefix_length(pipe.tokenizer, template)
    prompt = "a red bicycle"
    full = pipe.tokenizer(template.format(prompt)).input_ids
    suffix = template.split("{}", 1)[1]
    expected = pipe.tokenizer(prompt + suffix, add_special_tokens=False).input_ids
    assert full[start:] == expected


def test_loader_rejects_mismatches(cache_dir, tmp_path):
    with pytest.raises(ValueError, match="is a 'qwen-image' model, not 'sdxl'"):
        load_pipelines("sdxl", "builtin:tiny-qwen-image", "cpu", "float32", cache_dir)
    with pytest.raises(ValueError, match="unknown model family"):
        load_pipelines("dall-e", "builtin:tiny-sdxl", "cpu", "float32", cache_dir)
    with pytest.raises(ValueError, match="unknown dtype"):
        load_pipelines("sdxl", "builtin:tiny-sdxl", "cpu", "float64", cache_dir)
    with pytest.raises(PipelineLoadError, match="does not exist"):
        load_pipelines("sdxl", str(tmp_path / "missing" / "folder"), "cpu", "float32", cache_dir)
    with pytest.raises(PipelineLoadError, match="no model_index.json"):
        load_pipelines("sdxl", str(tmp_path), "cpu", "float32", cache_dir)


def test_loader_rejects_a_folder_of_another_family(built, cache_dir):
    with pytest.raises(ValueError, match="holds a .QwenImagePipeline., not a .sdxl. pipeline"):
        load_pipelines("sdxl", str(built["tiny-qwen-image"]), "cpu", "float32", cache_dir)


# ----------------------------------------------------------------------------------------
# Running


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("size", [(64, 64), (128, 64)])
def test_images_have_the_requested_size(pipes, family, size):
    width, height = size
    shape = CallShape(width=width, height=height, steps=4, guidance=GUIDANCE[family], with_negative_prompt=False)
    images = run_pipeline(pipes[family], shape, ["a cat", "a dog"], None, [1, 2], "cpu")
    assert [im.size for im in images] == [(width, height)] * 2
    assert all(im.mode == "RGB" for im in images)


@pytest.mark.parametrize(
    ("family", "guidance", "with_negative"),
    [
        ("sdxl", 5.0, False),
        ("sdxl", 5.0, True),
        ("qwen-image", 4.0, False),  # true CFG with the blank negative prompt
        ("qwen-image", 4.0, True),
        ("qwen-image", 1.0, False),  # no CFG at all
    ],
)
def test_batch_equals_singles(pipes, family, guidance, with_negative):
    pipe = pipes[family]
    shape = CallShape(width=64, height=64, steps=3, guidance=guidance, with_negative_prompt=with_negative)
    negatives = NEGATIVE_PROMPTS if with_negative else None

    batch = run_pipeline(pipe, shape, PROMPTS, negatives, SEEDS, "cpu")
    singles = [
        run_pipeline(pipe, shape, [PROMPTS[i]], [negatives[i]] if negatives else None, [SEEDS[i]], "cpu")[0]
        for i in range(len(PROMPTS))
    ]

    for i, (b, s) in enumerate(zip(batch, singles)):
        diff = np.abs(pixels(b) - pixels(s)).max()
        assert diff <= 1, f"image {i}: batch differs from single by {diff} levels"
    # The identity means something only if the images depend on prompt and seed:
    # images 0 and 2 share a seed but not a prompt; 0 and 1 differ in both.
    assert np.abs(pixels(batch[0]) - pixels(batch[2])).max() > 1
    assert np.abs(pixels(batch[0]) - pixels(batch[1])).max() > 1


@pytest.mark.parametrize("family", ["sdxl", "qwen-image"])
def test_same_seed_same_image_and_negative_prompt_matters(pipes, family):
    pipe = pipes[family]
    plain = CallShape(width=64, height=64, steps=3, guidance=GUIDANCE[family], with_negative_prompt=False)
    negative = CallShape(width=64, height=64, steps=3, guidance=GUIDANCE[family], with_negative_prompt=True)
    a = run_pipeline(pipe, plain, ["a cat"], None, [5], "cpu")[0]
    b = run_pipeline(pipe, plain, ["a cat"], None, [5], "cpu")[0]
    c = run_pipeline(pipe, negative, ["a cat"], ["a dog in the rain"], [5], "cpu")[0]
    assert np.array_equal(pixels(a), pixels(b))
    assert np.abs(pixels(a) - pixels(c)).max() > 1


def test_flux_same_seed_same_image_and_no_negative_prompt(pipes):
    plain = CallShape(width=64, height=64, steps=3, guidance=3.5, with_negative_prompt=False)
    a = run_pipeline(pipes["flux"], plain, ["a cat"], None, [5], "cpu")[0]
    b = run_pipeline(pipes["flux"], plain, ["a cat"], None, [5], "cpu")[0]
    c = run_pipeline(pipes["flux"], plain, ["a cat"], None, [6], "cpu")[0]
    assert np.array_equal(pixels(a), pixels(b))
    assert np.abs(pixels(a) - pixels(c)).max() > 1
    negative = CallShape(width=64, height=64, steps=3, guidance=3.5, with_negative_prompt=True)
    with pytest.raises(ValueError, match="no negative prompt"):
        run_pipeline(pipes["flux"], negative, ["a cat"], ["a dog"], [5], "cpu")


def test_runner_checks_its_arguments(pipes):
    shape = CallShape(width=64, height=64, steps=2, guidance=5.0, with_negative_prompt=False)
    with pytest.raises(ValueError, match="seeds"):
        run_pipeline(pipes["sdxl"], shape, ["a", "b"], None, [1], "cpu")
    with pytest.raises(ValueError, match="with_negative_prompt"):
        run_pipeline(pipes["sdxl"], shape, ["a"], ["b"], [1], "cpu")
    assert run_pipeline(pipes["sdxl"], shape, [], None, [], "cpu") == []


# ----------------------------------------------------------------------------------------
# Encoding


def _gradient(width: int, height: int, mode: str) -> Image.Image:
    rng = np.random.default_rng(0)
    channels = len(mode)
    data = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(data, mode=mode)


@pytest.mark.parametrize("output_format", ["png", "jpeg", "webp"])
@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_encoding_round_trips(output_format, mode):
    image = _gradient(96, 64, mode)
    data = encode_image(image, output_format, 80)
    decoded = Image.open(io.BytesIO(data))
    assert decoded.format == {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[output_format]
    assert decoded.size == (96, 64)
    if output_format == "png":
        assert decoded.mode == mode
        assert np.array_equal(np.asarray(decoded), np.asarray(image)), "png is lossless"
    if output_format == "jpeg":
        assert decoded.mode == "RGB"


@pytest.mark.parametrize("output_format", ["jpeg", "webp"])
def test_quality_changes_lossy_size(output_format):
    image = _gradient(64, 64, "RGB")
    assert len(encode_image(image, output_format, 10)) < len(encode_image(image, output_format, 95))


def test_encoding_rejects_bad_arguments():
    image = _gradient(8, 8, "RGB")
    with pytest.raises(ValueError, match="output_format"):
        encode_image(image, "gif", 80)
    with pytest.raises(ValueError, match="quality"):
        encode_image(image, "jpeg", 101)


# ----------------------------------------------------------------------------------------
# Images in: image-to-image and inpainting on the same loaded components


def _scene(width: int = 64, height: int = 64, shift: int = 0) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    data = np.stack([(x * 4 + shift) % 256, (y * 4) % 256, np.full_like(x, 90)], -1)
    data[16:40, 8 + shift % 16 : 32 + shift % 16] = (30, 40, 200)
    return Image.fromarray(data.astype(np.uint8), "RGB")


def _input(image: Image.Image):
    from serve_app.work import InputImage

    return InputImage.from_pil(image)


def _left_half_mask(width: int = 64, height: int = 64):
    from serve_app.work import InputImage

    data = np.zeros((height, width), np.uint8)
    data[:, : width // 2] = 255
    return InputImage.from_pil(Image.fromarray(data, "L")), data == 255


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_image_modes_share_the_loaded_modules(pipes, family):
    text = pipes[family].text_to_image
    for mode in (Mode.IMAGE_TO_IMAGE, Mode.INPAINT):
        pipe = pipes[family][mode]
        assert type(pipe).__name__ == pipes[family].family.pipeline_classes[mode]
        for name, module in text.components.items():
            if module is not None and name != "scheduler":
                assert pipe.components[name] is module, f"{mode.value} has its own {name}"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tiny_vae_reconstructs_so_low_strength_keeps_the_input(pipes, family):
    source = _scene()
    distances = {}
    for strength in (0.25, 1.0):
        shape = CallShape(64, 64, 8, GUIDANCE[family], False, mode=Mode.IMAGE_TO_IMAGE, strength=strength)
        out = run_pipeline(pipes[family], shape, ["a cat"], None, [3], "cpu", images=[_input(source)])[0]
        distances[strength] = float(np.abs(pixels(out) - pixels(source)).mean())
    assert distances[0.25] < 35, distances
    assert distances[0.25] < 0.5 * distances[1.0], distances


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("mode", [Mode.IMAGE_TO_IMAGE, Mode.INPAINT])
def test_image_modes_batch_equals_singles(pipes, family, mode):
    mask, _ = _left_half_mask()
    shape = CallShape(64, 64, 6, GUIDANCE[family], False, mode=mode, strength=0.7)
    images = [_input(_scene(shift=17 * i)) for i in range(3)]
    masks = [mask] * 3 if mode is Mode.INPAINT else None
    prompts, seeds = PROMPTS[:3], SEEDS[:3]
    batch = run_pipeline(pipes[family], shape, prompts, None, seeds, "cpu", images=images, masks=masks)
    for i in range(3):
        single = run_pipeline(
            pipes[family],
            shape,
            [prompts[i]],
            None,
            [seeds[i]],
            "cpu",
            images=[images[i]],
            masks=None if masks is None else [masks[i]],
        )[0]
        assert np.abs(pixels(batch[i]) - pixels(single)).max() <= 1, f"image {i}"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_inpainting_keeps_the_pixels_outside_the_mask(pipes, family):
    source = _scene()
    mask, repaint = _left_half_mask()
    shape = CallShape(64, 64, 4, GUIDANCE[family], False, mode=Mode.INPAINT, strength=1.0)
    out = run_pipeline(pipes[family], shape, ["a dog"], None, [9], "cpu", images=[_input(source)], masks=[mask])[0]
    diff = np.abs(pixels(out) - pixels(source))
    assert diff[~repaint].max() == 0
    assert diff[repaint].mean() > 5


def test_runner_checks_image_inputs(pipes):
    img2img = CallShape(64, 64, 4, 5.0, False, mode=Mode.IMAGE_TO_IMAGE, strength=0.5)
    with pytest.raises(ValueError, match="input images"):
        run_pipeline(pipes["sdxl"], img2img, ["a"], None, [1], "cpu")
    inpaint = CallShape(64, 64, 4, 5.0, False, mode=Mode.INPAINT, strength=0.5)
    with pytest.raises(ValueError, match="masks"):
        run_pipeline(pipes["sdxl"], inpaint, ["a"], None, [1], "cpu", images=[_input(_scene())])


def test_flux_refuses_a_guidance_setting_its_weights_cannot_honour(built, cache_dir):
    from serve_app.config import ModelConfig

    schnell_like = ModelConfig.model_validate(
        {"id": "f", "family": "flux", "weights": "builtin:tiny-flux", "defaults": {"size": "64x64", "guidance": 0.0}}
    )
    with pytest.raises(ValueError, match="defaults.guidance must be above 0"):
        load_pipelines("flux", "builtin:tiny-flux", "cpu", "float32", cache_dir, model=schnell_like)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_previews_decode_the_latents_and_leave_the_images_alone(pipes, family):
    """The linear latent-to-RGB map fitted at load reproduces what the VAE would show for
    latents of real images (held-out ones), and the step callback that takes previews
    changes nothing in the generated images."""
    import torch.nn.functional as F

    from deployments.grouping import group_jobs
    from deployments.previews import build_relay
    from deployments.vae_latents import encode_like_pipeline, synthetic_images
    from serve_app.work import GenerationJob

    relay = build_relay(pipes[family], "cpu")
    vae = pipes[family].text_to_image.vae
    held_out = synthetic_images(4, 64, torch.Generator().manual_seed(123)).clamp(-1, 1)
    with torch.inference_mode():
        latents = encode_like_pipeline(vae, held_out, sample=False)
    if latents.dim() == 5:
        latents = latents[:, :, 0]
    decoded = relay._to_rgb.to_pixels(latents).astype(np.float32)
    blocks = ((F.adaptive_avg_pool2d(held_out, latents.shape[-2:]) + 1) * 127.5).permute(0, 2, 3, 1).numpy()
    # Measured: 0.7 to 2.2 levels of 255 (an image against its own mean colour: 44).
    assert np.abs(decoded - blocks).mean() < 6, "the linear preview does not follow the VAE"

    shape = CallShape(width=128, height=64, steps=4, guidance=GUIDANCE[family], with_negative_prompt=False)
    job = GenerationJob("r", "a cat", None, shape, (3, 4), partial_images=2)
    seen = []
    relay.register(job, lambda *args: seen.append(args))
    call = group_jobs([job])[0]
    with_previews = run_pipeline(
        pipes[family], shape, call.prompts, None, call.seeds, "cpu", on_step_end=relay.for_call([job], call)
    )
    without = run_pipeline(pipes[family], shape, call.prompts, None, call.seeds, "cpu")
    for a, b in zip(with_previews, without):
        assert np.array_equal(pixels(a), pixels(b))
    assert [(image, partial, step) for image, partial, _, step, _ in seen] == [
        (0, 0, 2),
        (1, 0, 2),
        (0, 1, 3),
        (1, 1, 3),
    ]
    assert all(preview.shape == (8, 16, 3) and preview.dtype == np.uint8 for _, _, preview, _, _ in seen)
