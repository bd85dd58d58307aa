"""The per-model optimisations (deployments/optimisations.py) on the tiny models, on CPU.

Each switch is checked where it acts (the processors, the weights' memory layout, the VAE the
pipelines use, the compile dispatcher and its warmed shapes), and the images it gives are
checked against the images with everything off. The GPU-only ones (flash, CUDA graphs) are
refused on a CPU by the config check.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch._dynamo.utils import counters

from deployments.adapters import AdapterCache
from deployments.grouping import PipelineCall, group_jobs, run_grouped
from deployments.model_deployment import ImageModelDeployment, run_call
from deployments.optimisations import attention_kind, compiled_of, denoiser_of
from deployments.pipeline_loader import load_pipelines, resolve_weights
from deployments.pipeline_runner import run_pipeline
from serve_app.config import GoFastConfig, ModelConfig, load_app_config
from serve_app.families import get_family
from serve_app.work import CallShape, GenerationJob
from tests.conftest import MODEL_CACHE, ROOT


def tiny_model(family: str, **optimisations) -> ModelConfig:
    base = next(m for m in load_app_config(ROOT / "serve_config.yaml").models if m.family == family)
    data = base.model_dump(mode="json")
    data["optimisations"] = optimisations
    return ModelConfig.model_validate(data)


def load(model: ModelConfig):
    return load_pipelines(model.family, model.weights, "cpu", model.dtype, MODEL_CACHE, model=model)


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


def shape_of(model: ModelConfig, size: str | None = None) -> CallShape:
    width, height = (int(v) for v in (size or model.defaults.size).split("x"))
    return CallShape(
        width=width,
        height=height,
        steps=model.defaults.steps,
        guidance=model.defaults.guidance,
        with_negative_prompt=False,
    )


PROMPTS = ["a red bicycle by a blue door", "a lighthouse at night"]


# --- config ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "optimisations", "message"),
    [
        ("sdxl", {"attention": "flash"}, "flash needs a CUDA device"),
        ("sdxl", {"compile": {"mode": "reduce-overhead"}}, "captures CUDA graphs: it needs a CUDA device"),
        ("sdxl", {"compile": {"mode": "max-autotune", "backend": "eager"}}, "needs backend inductor"),
        ("sdxl", {"compile": {"sizes": ["65x64"]}}, "must be a multiple of 8"),
        ("sdxl", {"compile": {"sizes": ["4096x4096"]}}, "outside limits"),
        ("sdxl", {"compile": {"batch_sizes": [0]}}, "at least 1"),
        ("flux", {"fp16_vae": "madebyollin/sdxl-vae-fp16-fix"}, "a flux VAE is not upcast"),
        ("sdxl", {"attention": "xformers"}, "attention"),
        ("sdxl", {"channels_last": "sometimes"}, "channels_last"),
    ],
)
def test_config_refuses_what_cannot_work_here(family, optimisations, message):
    with pytest.raises(ValidationError, match=message):
        tiny_model(family, **optimisations)


def test_compile_needs_the_warm_up_that_compiles():
    data = tiny_model("sdxl").model_dump(mode="json")
    data.update(warmup=False, optimisations={"compile": {}})
    with pytest.raises(ValidationError, match="needs warmup: true"):
        ModelConfig.model_validate(data)


def test_per_size_batch_limit():
    data = tiny_model("sdxl").model_dump(mode="json")
    data["batching"] = {"max_batch_images": 8, "max_images_by_size": {"128x128": 2}}
    batching = ModelConfig.model_validate(data).batching
    assert batching.images_per_call(128, 128) == 2
    assert batching.images_per_call(64, 64) == 8
    data["batching"] = {"max_images_by_size": {"100x100": 2}}
    with pytest.raises(ValidationError, match="multiple of 8"):
        ModelConfig.model_validate(data)
    data["batching"] = {"max_images_by_size": {"64x64": 0}}
    with pytest.raises(ValidationError, match="at least 1"):
        ModelConfig.model_validate(data)


def test_gpu_config_turns_on_what_pays_there():
    models = {m.family: m for m in load_app_config(ROOT / "serve_config.gpu.yaml").models}
    sdxl, flux, qwen = models["sdxl"].optimisations, models["flux"].optimisations, models["qwen-image"].optimisations
    assert sdxl.attention == flux.attention == qwen.attention == "sdpa"
    assert sdxl.channels_last and sdxl.fp16_vae and sdxl.compile.cuda_graphs
    assert flux.compile.cuda_graphs
    assert qwen.compile is None  # its prompt length is part of the shape: see the config's comment
    for model in load_app_config(ROOT / "serve_config.yaml").models:
        assert model.optimisations.model_dump() == {
            "attention": "default",
            "channels_last": False,
            "compile": None,
            "fp16_vae": None,
        }


# --- the per-size limit splits calls ---------------------------------------------------------


def test_a_call_over_its_size_limit_is_split_and_routed_back():
    shape = CallShape(width=64, height=64, steps=2, guidance=5.0, with_negative_prompt=False)
    jobs = [
        GenerationJob(request_id=f"r{i}", prompt=f"p{i}", negative_prompt=None, shape=shape, seeds=seeds)
        for i, seeds in enumerate([(1, 2, 3), (4,), (5, 6)])
    ]
    calls = group_jobs(jobs, max_call_images=lambda s: 2)
    assert [call.seeds for call in calls] == [[1, 2], [3, 4], [5, 6]]
    outcomes = run_grouped(jobs, lambda call: [f"image-{seed}" for seed in call.seeds], max_call_images=lambda s: 2)
    assert [o.images for o in outcomes] == [["image-1", "image-2", "image-3"], ["image-4"], ["image-5", "image-6"]]


# --- the switches, on the tiny models --------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl_off():
    model = tiny_model("sdxl")
    pipelines = load(model)
    return model, pixels(run_pipeline(pipelines, shape_of(model), PROMPTS, None, [3, 4], "cpu"))


def test_sdxl_attention_channels_last_and_fp16_vae_are_applied_and_change_no_image(sdxl_off):
    model_off, images_off = sdxl_off
    vae_folder = f"{resolve_weights(get_family('sdxl'), model_off.weights, MODEL_CACHE)}/vae"
    model = tiny_model("sdxl", attention="math", channels_last=True, fp16_vae=vae_folder)
    pipelines = load(model)
    pipe = pipelines.text_to_image

    assert attention_kind(pipe.unet) == {"AttnProcessor"}  # the math baseline instead of SDPA
    kernels = [p for p in pipe.unet.parameters() if p.dim() == 4 and p.shape[-1] > 1]
    assert kernels and all(p.is_contiguous(memory_format=torch.channels_last) for p in kernels)
    assert not any(p.is_contiguous() for p in kernels)
    assert pipelines.optimisations.channels_last == ["unet", "vae"]
    # The swapped VAE: loaded from the folder, told it needs no float32 upcast, and used by
    # every mode's pipeline.
    assert pipe.vae.config.force_upcast is False
    assert all(each.vae is pipe.vae for each in pipelines.pipelines.values())

    images = pixels(run_pipeline(pipelines, shape_of(model), PROMPTS, None, [3, 4], "cpu"))
    assert np.abs(images - images_off).max() <= 2


def test_sdpa_is_set_on_the_transformer_families():
    model = tiny_model("qwen-image", attention="sdpa")
    pipelines = load(model)
    assert attention_kind(denoiser_of(pipelines.text_to_image)) == {"native"}
    model = tiny_model("flux", attention="math")
    assert attention_kind(denoiser_of(load(model).text_to_image)) == {"_native_math"}


@pytest.fixture(scope="module")
def compiled_flux():
    """A tiny FLUX replica with a compiled transformer (the replica class itself, whose
    warm-up is what compiles, without Ray around it) and the same model uncompiled."""
    model = tiny_model("flux", compile={"backend": "eager", "batch_sizes": [1, 2]})
    replica = ImageModelDeployment(model.model_dump(mode="json"), str(MODEL_CACHE))
    return model, replica, load(tiny_model("flux"))


def test_compiled_denoiser_is_warmed_per_bucket_at_start_and_never_compiles_on_a_request(compiled_flux):
    model, replica, reference = compiled_flux
    compiled = compiled_of(denoiser_of(replica._pipelines.text_to_image))
    assert compiled is not None
    assert len(compiled.warmed) == 2  # the default size at 1 and 2 images per call
    warmed = set(compiled.warmed)
    shape = shape_of(model)
    before = dict(compiled.calls)
    images = pixels(run_pipeline(replica._pipelines, shape, PROMPTS, None, [3, 4], "cpu"))
    assert compiled.calls["compiled"] == before["compiled"] + shape.steps
    assert compiled.calls["eager"] == before["eager"]
    expected = pixels(run_pipeline(reference, shape, PROMPTS, None, [3, 4], "cpu"))
    assert np.abs(images - expected).max() <= 2

    # A size that was not warmed runs the uncompiled denoiser: same images, no new graph.
    other = shape_of(model, "128x64")
    images = pixels(run_pipeline(replica._pipelines, other, PROMPTS[:1], None, [5], "cpu"))
    assert compiled.calls["eager"] == before["eager"] + other.steps
    assert compiled.warmed == warmed
    expected = pixels(run_pipeline(reference, other, PROMPTS[:1], None, [5], "cpu"))
    assert np.abs(images - expected).max() <= 2


def test_lora_and_go_fast_calls_run_uncompiled_and_nothing_compiles_on_a_request(compiled_flux):
    model, replica, reference = compiled_flux
    compiled = compiled_of(denoiser_of(replica._pipelines.text_to_image))
    name = next(iter(model.loras))
    served = AdapterCache(replica._pipelines.text_to_image, model.loras, 4, MODEL_CACHE)
    uncompiled = AdapterCache(reference.text_to_image, model.loras, 4, MODEL_CACHE)
    go_fast = GoFastConfig(cache="taylorseer", cache_interval=3, cache_warmup_steps=1)
    graphs = counters["stats"]["unique_graphs"]

    def both(shape: CallShape, seed: int):
        call = PipelineCall(shape=shape, prompts=PROMPTS[:1], negative_prompts=None, seeds=[seed])
        before = dict(compiled.calls)
        images = pixels(run_call(replica._pipelines, served, go_fast, call, "cpu"))
        expected = pixels(run_call(reference, uncompiled, go_fast, call, "cpu"))
        ran = {kind: compiled.calls[kind] - before[kind] for kind in before}
        return images, expected, ran

    # A warmed shape (steps are not part of it): with neither, the compiled graph serves it.
    plain = dataclasses.replace(shape_of(model), steps=8)
    lora = dataclasses.replace(plain, adapters=((name, 1.0),))
    fast = dataclasses.replace(plain, go_fast=True)
    plain_images = pixels(run_pipeline(reference, plain, PROMPTS[:1], None, [6], "cpu"))
    for shape, seed in ((fast, 5), (lora, 6)):
        images, expected, ran = both(shape, seed)
        assert ran == {"compiled": 0, "eager": shape.steps}
        assert np.abs(images - expected).max() <= 2
    # The LoRA changes the image well beyond the compile's rounding (the tiny transformer's
    # cache barely does: that the hooks ran is test_request_extensions' business).
    assert np.abs(images - plain_images).max() > 8

    # With the LoRA now loaded (peft's layers wrap the transformer's linears, LoRA off), a
    # plain call goes to the compiled path, which finds its graph's guards broken and runs
    # the plain forward rather than tracing on the request: the plain image, no new graph.
    images, expected, ran = both(plain, 7)
    assert ran == {"compiled": plain.steps, "eager": 0}
    assert np.abs(images - expected).max() <= 2
    assert counters["stats"]["unique_graphs"] == graphs


# --- CUDA graphs: two denoiser calls per scheduler step -------------------------------------


class FakeGraphPool:
    """What CUDA graph trees do to a compiled function's outputs, without CUDA: a replay writes
    its output into the graph pool, and once a new step is marked
    (``torch.compiler.cudagraph_mark_step_begin``) the next replay reuses the memory of every
    output given out before the mark (on a GPU, reading such an output raises "accessing
    tensor output of CUDAGraphs that has been overwritten by a subsequent run")."""

    def __init__(self, forward):
        self.forward = forward
        self.pool: torch.Tensor | None = None
        self.marked = False

    def mark_step_begin(self) -> None:
        self.marked = True

    def replay(self, *args, **kwargs):
        (result,) = self.forward(*args, **kwargs)
        if self.marked and self.pool is not None and self.pool.shape == result.shape:
            self.pool.copy_(result)  # the memory of the outputs before the mark, overwritten
        else:
            self.pool = result.clone()
        self.marked = False
        return (self.pool,)


class TinyDenoiser(torch.nn.Module):
    def forward(self, latents, context):
        return (latents * 2 + context,)


def test_cuda_graph_outputs_survive_true_cfg_two_calls_per_step(monkeypatch):
    """True CFG (Qwen-Image) calls the denoiser for the prompt, then for the negative prompt,
    and only then combines the two outputs: the first must still hold its values."""
    from deployments.optimisations import BucketedCompile

    module = TinyDenoiser()
    compiled = BucketedCompile(module, mode="reduce-overhead", backend="inductor")
    assert compiled.cuda_graphs
    pool = FakeGraphPool(compiled.original_forward)
    compiled.compiled_forward = pool.replay  # nothing is compiled: the fake stands in for inductor
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", pool.mark_step_begin)

    latents = torch.ones(1, 4)
    # Two shapes, two graphs (Qwen-Image's blank negative prompt is shorter than the prompt).
    prompt, negative = torch.full((1, 4), 10.0), torch.full((1, 1), -10.0)
    with compiled.warming():
        module(latents, prompt)
        module(latents, negative)
    assert len(compiled.warmed) == 2
    for step in range(3):
        (conditional,) = module(latents, prompt)
        (unconditional,) = module(latents, negative)
        assert torch.equal(conditional, latents * 2 + prompt), f"step {step}: the prompt's output was overwritten"
        assert torch.equal(unconditional, latents * 2 + negative)
        latents = unconditional + 4.0 * (conditional - unconditional)
    assert compiled.calls == {"compiled": 2 + 6, "eager": 0}  # the warm-up's two, then every call


def test_outputs_are_copied_whatever_their_container():
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    from deployments.optimisations import clone_tensors

    sample = torch.ones(2, 3)
    for output in ((sample,), Transformer2DModelOutput(sample=sample), {"sample": sample}):
        copied = clone_tensors(output)
        assert type(copied) is type(output)
        copy = copied[0] if isinstance(copied, tuple) else copied["sample"]
        assert torch.equal(copy, sample) and copy.data_ptr() != sample.data_ptr()
