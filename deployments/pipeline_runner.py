"""One diffusers call for a group of images that share a CallShape."""

from __future__ import annotations

from serve_app.work import CallShape

# Qwen-Image runs classifier-free guidance only when a negative prompt is given; the official
# example passes a blank one. Used whenever guidance > 1 and the job has no negative prompt.
QWEN_BLANK_NEGATIVE_PROMPT = " "


def run_pipeline(
    pipe,
    family: str,
    shape: CallShape,
    prompts: list[str],
    negative_prompts: list[str] | None,
    seeds: list[int],
    device: str,
) -> list:
    """Generate ``len(prompts)`` images in one pipeline call; image i uses ``seeds[i]``.

    Every image gets its own ``torch.Generator`` seeded with its seed, so image i equals the
    image a call with only ``prompts[i]`` and ``seeds[i]`` gives (the batch-vs-single
    identity the service promises). Returns PIL images.
    """
    import torch

    n = len(prompts)
    if n == 0:
        return []
    if len(seeds) != n:
        raise ValueError(f"got {n} prompts but {len(seeds)} seeds")
    if negative_prompts is not None and len(negative_prompts) != n:
        raise ValueError(f"got {n} prompts but {len(negative_prompts)} negative prompts")
    if shape.with_negative_prompt != (negative_prompts is not None):
        raise ValueError(
            f"shape.with_negative_prompt is {shape.with_negative_prompt} but negative_prompts "
            f"{'is None' if negative_prompts is None else 'is given'}"
        )

    generators = [torch.Generator(device).manual_seed(int(seed)) for seed in seeds]
    kwargs = dict(
        prompt=list(prompts),
        height=shape.height,
        width=shape.width,
        num_inference_steps=shape.steps,
        num_images_per_prompt=1,
        generator=generators,
        output_type="pil",
    )
    if family == "sdxl":
        kwargs.update(guidance_scale=shape.guidance, negative_prompt=_list_or_none(negative_prompts))
    elif family == "qwen-image":
        # True CFG runs only when guidance > 1 *and* a negative prompt is given; below that the
        # pipeline ignores (and warns about) a negative prompt, so none is passed.
        negative = None
        if shape.guidance > 1:
            negative = _list_or_none(negative_prompts) or [QWEN_BLANK_NEGATIVE_PROMPT] * n
        kwargs.update(true_cfg_scale=shape.guidance, negative_prompt=negative)
    else:
        raise ValueError(f"unknown model family {family!r}")

    with torch.inference_mode():
        images = pipe(**kwargs).images
    if len(images) != n:
        raise RuntimeError(f"pipeline returned {len(images)} images for {n} prompts")
    return list(images)


def _list_or_none(values: list[str] | None) -> list[str] | None:
    return None if values is None else list(values)
