"""LoRA adapters, go_fast, the safety checker and the prompt enhancer on the tiny models,
without Ray: the code the model deployment and the enhancer deployment run
(``deployments.model_deployment.run_call``, ``deployments.adapters``, ``speed_mode``,
``safety_checker``, ``prompt_enhancer``)."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

from builtin_models.safety_checker import flag_pattern, ordinary_images
from deployments.adapters import AdapterCache
from deployments.grouping import run_grouped
from deployments.model_deployment import run_call
from deployments.pipeline_loader import load_pipelines
from deployments.safety_checker import SafetyChecker
from serve_app.config import GoFastConfig, LoraAdapterConfig
from serve_app.families import get_family
from serve_app.work import CallShape, GenerationJob, InputImage, Mode
from tests.conftest import MODEL_CACHE

GUIDANCE = {"sdxl": 5.0, "qwen-image": 4.0, "flux": 3.5}
FAMILIES = list(GUIDANCE)


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def psnr(a, b) -> float:
    mse = float(((pixels(a) - pixels(b)).astype(np.float64) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


@functools.cache
def pipelines(name: str):
    """Each family's tiny pipelines, loaded once for this module."""
    return load_pipelines(name, f"builtin:{get_family(name).tiny_model}", "cpu", "float32", MODEL_CACHE)


@functools.cache
def checker() -> SafetyChecker:
    return SafetyChecker("builtin:tiny-safety-checker", "cpu", MODEL_CACHE)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    name = request.param
    pipes = pipelines(name)
    source = f"builtin:{get_family(name).tiny_model}-lora"
    # Two names for the one tiny LoRA: enough to watch the LRU load and evict.
    registry = {n: LoraAdapterConfig(source=source, family=name) for n in ("style-a", "style-b")}
    return name, pipes, registry


def fresh_cache(pipes, registry, capacity=4) -> AdapterCache:
    """A replica's adapter cache on these (shared) pipelines, none loaded yet."""
    loaded = {n for names in pipes.text_to_image.get_list_adapters().values() for n in names}
    if loaded:
        pipes.text_to_image.delete_adapters(sorted(loaded))
    return AdapterCache(pipes.text_to_image, registry, capacity=capacity, cache_dir=MODEL_CACHE)


def shape(family_name: str, **fields) -> CallShape:
    return CallShape(width=64, height=64, steps=4, guidance=GUIDANCE[family_name], with_negative_prompt=False, **fields)


def job(request_id: str, shape_: CallShape, seeds=(3,), prompt="a red apple") -> GenerationJob:
    return GenerationJob(request_id=request_id, prompt=prompt, negative_prompt=None, shape=shape_, seeds=tuple(seeds))


def generate(pipes, adapters, jobs, speed=None):
    """What the model deployment does with one batch of jobs."""
    speed = speed or GoFastConfig(cache="none")
    outcomes = run_grouped(jobs, lambda call: run_call(pipes, adapters, speed, call, "cpu"))
    for outcome in outcomes:
        assert outcome.error is None, outcome.error
    return [outcome.images for outcome in outcomes]


def test_a_lora_changes_the_image_scale_zero_does_not_and_it_never_leaks(family):
    name, pipes, registry = family
    adapters = fresh_cache(pipes, registry)
    ((plain,),) = generate(pipes, adapters, [job("plain", shape(name))])
    ((styled,),) = generate(pipes, adapters, [job("lora", shape(name, adapters=(("style-a", 1.0),)))])
    ((zero,),) = generate(pipes, adapters, [job("zero", shape(name, adapters=(("style-a", 0.0),)))])
    ((after,),) = generate(pipes, adapters, [job("after", shape(name))])
    assert np.abs(pixels(styled) - pixels(plain)).mean() > 1.0
    # Scale 0 and the next plain request are the plain image within 1 level of uint8 (the
    # design's rule, as for batching): a loaded adapter's peft layers stay on the denoiser's
    # path, and on some CPUs (SDXL) a matmul through them rounds differently.
    assert np.abs(pixels(zero) - pixels(plain)).max() <= 1
    assert np.abs(pixels(after) - pixels(plain)).max() <= 1  # the adapter stayed with its request


def test_a_batch_of_mixed_adapters_gives_each_request_its_own_image(family):
    name, pipes, registry = family
    adapters = fresh_cache(pipes, registry)
    shapes = [
        shape(name),
        shape(name, adapters=(("style-a", 1.0),)),
        shape(name, adapters=(("style-a", 1.0), ("style-b", -0.5))),
    ]
    jobs = [job(f"r{i}", s, seeds=(11 + i,)) for i, s in enumerate(shapes)]
    batched = generate(pipes, adapters, jobs)
    alone = [generate(pipes, adapters, [j])[0] for j in reversed(jobs)][::-1]
    for together, single in zip(batched, alone):
        assert np.abs(pixels(together[0]) - pixels(single[0])).max() <= 1


def test_the_replica_keeps_a_bounded_lru_of_adapters(family):
    name, pipes, registry = family
    adapters = fresh_cache(pipes, registry, capacity=1)
    generate(pipes, adapters, [job("a", shape(name, adapters=(("style-a", 1.0),)))])
    assert adapters.loaded == ["style-a"]
    generate(pipes, adapters, [job("b", shape(name, adapters=(("style-b", 1.0),)))])
    assert adapters.loaded == ["style-b"]
    # One call may need more than the capacity: it gets them all.
    generate(pipes, adapters, [job("ab", shape(name, adapters=(("style-a", 1.0), ("style-b", 1.0))))])
    assert sorted(adapters.loaded) == ["style-a", "style-b"]
    ((plain,),) = generate(pipes, adapters, [job("plain", shape(name))])
    ((reference,),) = generate(pipes, fresh_cache(pipes, {}), [job("reference", shape(name))])
    assert np.array_equal(pixels(plain), pixels(reference))


@pytest.mark.parametrize("name", ["flux", "qwen-image"])
def test_go_fast_caches_the_transformer_and_stays_batch_independent(name):
    pipes = pipelines(name)
    adapters = fresh_cache(pipes, {})
    speed = get_family(name).default_go_fast
    assert speed.cache == "taylorseer"
    slow = shape(name, go_fast=False).__class__(**{**shape(name).__dict__, "steps": 8})
    fast = slow.__class__(**{**slow.__dict__, "go_fast": True})
    ((plain,),) = generate(pipes, adapters, [job("slow", slow)], speed)
    jobs = [job("fast", fast), job("fast-2", fast, seeds=(4, 5), prompt="a green pear")]
    batched = generate(pipes, adapters, jobs, speed)
    alone = generate(pipes, adapters, [jobs[0]], speed)[0]
    ((after,),) = generate(pipes, adapters, [job("slow-again", slow)], speed)
    assert not np.array_equal(pixels(batched[0][0]), pixels(plain))  # the cache really skipped work
    assert psnr(batched[0][0], plain) > 15  # ... and the image is still the same picture
    assert np.abs(pixels(batched[0][0]) - pixels(alone[0])).max() <= 1
    assert np.array_equal(pixels(after), pixels(plain))  # the hooks are gone after the call
    # The image modes too (FLUX.1's image-to-image pipeline opens no cache context itself).
    from dataclasses import replace

    source = InputImage.from_pil(flag_pattern(64, 64))
    for mode, extra in ((Mode.IMAGE_TO_IMAGE, {}), (Mode.INPAINT, {"mask": source_mask()})):
        edit_shape = replace(fast, mode=mode, strength=0.6)
        edit = replace(job("edit", edit_shape), image=source, **extra)
        (edited,) = generate(pipes, adapters, [edit], speed)[0]
        assert edited.size == (64, 64)


def source_mask() -> InputImage:
    from PIL import Image

    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    return InputImage.from_pil(mask)


def test_the_tiny_safety_checker_passes_ordinary_images_and_flags_its_pattern():
    assert checker().flags([flag_pattern(64, 64), flag_pattern(96, 64)]) == [True, True]
    assert not any(checker().flags(ordinary_images(30, side=64)))
    assert checker().flags([]) == []


@pytest.mark.parametrize("name", ["sdxl", "qwen-image"])
def test_generated_images_pass_and_the_pattern_survives_image_to_image(name):
    pipes = pipelines(name)
    adapters = fresh_cache(pipes, {})
    ordinary = generate(pipes, adapters, [job("plain", shape(name), seeds=range(6))])[0]
    assert not any(checker().flags(ordinary))
    pattern = InputImage.from_pil(flag_pattern(64, 64))
    from dataclasses import replace

    edit = replace(job("edit", shape(name, mode=Mode.IMAGE_TO_IMAGE, strength=0.5)), image=pattern)
    assert all(checker().flags(generate(pipes, adapters, [edit])[0]))


def test_the_tiny_enhancer_rewrites_a_prompt_into_printable_text():
    from deployments.prompt_enhancer import PromptEnhancerDeployment
    from serve_app.enhancer import clean_rewrite

    enhancer = PromptEnhancerDeployment({"weights": "builtin:tiny-enhancer", "max_new_tokens": 16}, str(MODEL_CACHE))
    rewrite = clean_rewrite(enhancer.rewrite("a red apple"), 4000)
    assert rewrite and rewrite != "a red apple"
    assert enhancer.rewrite("a red apple") == enhancer.rewrite("a red apple")  # greedy: reproducible


def test_a_preview_the_safety_checker_flags_is_not_sent():
    """Previews pass the request's checker like final images: a stream never shows what the
    checker would withhold at the end."""
    import numpy as np

    from deployments.model_deployment import ImageModelDeployment
    from serve_app.work import CallShape, GenerationJob

    encode_preview = ImageModelDeployment._encode_preview
    job = GenerationJob("r1", "a", None, CallShape(64, 64, 4, 5.0, with_negative_prompt=False), (1,), partial_images=2)
    flagged = np.asarray(flag_pattern(64, 64))
    ordinary = np.asarray(ordinary_images(1, side=64)[0].convert("RGB"))
    assert encode_preview(flagged, 0, 0, 1, 4, job, checker()) is None
    sent = encode_preview(ordinary, 0, 1, 3, 4, job, checker())
    assert (sent.partial_image_index, sent.step) == (1, 3) and sent.data
    assert encode_preview(flagged, 0, 0, 1, 4, job, None) is not None  # no checker for this request
