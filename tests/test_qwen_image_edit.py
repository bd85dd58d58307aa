"""The tiny Qwen-Image-Edit-2509 (diffusers' QwenImageEditPlusPipeline) built offline: loading
with the family's own processor, several reference images per edit, one image per call,
seeds, and the interrupt an abandoned call relies on."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from builtin_models import ensure_builtin_model
from deployments.grouping import run_grouped
from deployments.pipeline_loader import load_pipelines
from deployments.pipeline_runner import run_pipeline
from serve_app.config import ModelConfig
from serve_app.families import get_family
from serve_app.families.qwen_image import prompt_template_prefix_length
from serve_app.work import CallShape, GenerationJob, InputImage, Mode
from tests.conftest import MODEL_CACHE

MODEL = ModelConfig.model_validate(
    {
        "id": "tiny-qwen-image-edit",
        "family": "qwen-image-edit",
        "weights": "builtin:tiny-qwen-image-edit",
        "defaults": {"size": "64x64", "steps": 4, "guidance": 4.0},
        "limits": {"max_pixels": 65536, "min_side": 32, "max_side": 256},
    }
)


@pytest.fixture(scope="module")
def pipes():
    ensure_builtin_model("tiny-qwen-image-edit", MODEL_CACHE)
    return load_pipelines("qwen-image-edit", "builtin:tiny-qwen-image-edit", "cpu", "float32", MODEL_CACHE, MODEL)


def picture(size, colour) -> InputImage:
    image = Image.new("RGB", size, colour)
    image.paste((255, 255, 255), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    return InputImage.from_pil(image)


def shape(references=(), guidance=4.0, steps=4) -> CallShape:
    return CallShape(
        width=64,
        height=64,
        steps=steps,
        guidance=guidance,
        with_negative_prompt=False,
        mode=Mode.EDIT,
        reference_sizes=tuple((r.width, r.height) for r in references),
    )


def edit(pipes, references=(), seed=1, prompt="make it green", image=None):
    image = image or picture((64, 64), (200, 20, 20))
    (out,) = run_pipeline(
        pipes, shape(references), [prompt], None, [seed], "cpu", images=[image], references=[tuple(references)]
    )
    return np.asarray(out, dtype=np.int16)


def test_the_tiny_model_is_saved_as_the_real_weights_are(pipes):
    from diffusers import QwenImageEditPlusPipeline
    from transformers import Qwen2VLProcessor

    folder = ensure_builtin_model("tiny-qwen-image-edit", MODEL_CACHE)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImageEditPlusPipeline"
    assert index["processor"] == ["transformers", "Qwen2VLProcessor"]
    assert (folder / "processor" / "preprocessor_config.json").is_file()
    pipe = pipes.text_to_image  # the loaded (base) pipeline
    assert type(pipe) is QwenImageEditPlusPipeline and pipes[Mode.EDIT] is pipe
    assert isinstance(pipe.processor, Qwen2VLProcessor) and pipe.processor.video_processor is None
    assert pipe.prompt_template_encode_start_idx == prompt_template_prefix_length(
        pipe.tokenizer, pipe.prompt_template_encode
    )
    # References are VAE-encoded at no more than the model's largest output.
    assert pipe._imagegen_reference_area == MODEL.limits.max_pixels


def test_each_reference_image_changes_the_edit_and_the_seed_reproduces_it(pipes):
    green, blue = picture((48, 80), (20, 200, 20)), picture((64, 64), (20, 20, 200))
    one = edit(pipes)
    assert one.shape == (64, 64, 3)
    assert np.array_equal(one, edit(pipes))  # same seed, same image
    assert not np.array_equal(one, edit(pipes, seed=2))
    two = edit(pipes, [green])
    three = edit(pipes, [green, blue])
    assert not np.array_equal(one, two) and not np.array_equal(two, three)
    assert not np.array_equal(two, edit(pipes, [blue]))  # which image, not only how many


def test_a_batch_of_edits_runs_one_image_per_call_and_equals_singles(pipes):
    family = get_family("qwen-image-edit")
    first, second = picture((64, 64), (200, 20, 20)), picture((40, 72), (20, 200, 20))
    jobs = [
        GenerationJob("a", "make it green", None, shape([second]), (5, 6), image=first, references=(second,)),
        GenerationJob("b", "make it blue", None, shape(), (7,), image=first),
    ]
    calls = []

    def run(call):
        calls.append(len(call.prompts))
        return run_pipeline(
            pipes, call.shape, call.prompts, None, call.seeds, "cpu", images=call.images, references=call.references
        )

    outcomes = run_grouped(jobs, run, max_call_images=lambda _: family.max_images_per_call)
    assert calls == [1, 1, 1]
    assert np.array_equal(np.asarray(outcomes[0].images[1], np.int16), edit(pipes, [second], seed=6, image=first))
    assert np.array_equal(
        np.asarray(outcomes[1].images[0], np.int16), edit(pipes, seed=7, prompt="make it blue", image=first)
    )


def test_an_interrupted_edit_runs_no_further_step(pipes):
    seen = []

    def stop_after_first(pipe, step, timestep, kwargs):
        seen.append(step)
        pipe._interrupt = True
        return kwargs

    def count(pipe, step, timestep, kwargs):
        seen.append(step)
        return kwargs

    for callback in (stop_after_first, count):
        run_pipeline(
            pipes,
            shape(steps=6),
            ["x"],
            None,
            [1],
            "cpu",
            images=[picture((64, 64), (9, 9, 9))],
            references=[()],
            on_step_end=callback,
        )
    assert seen == [0, *range(6)]  # the next call on the same pipeline runs every step
