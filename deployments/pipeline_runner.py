"""One diffusers call for a group of images that share a CallShape."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

from deployments.pipeline_loader import PipelineSet
from serve_app.work import CallShape, InputImage, Mode


def run_pipeline(
    pipelines: PipelineSet,
    shape: CallShape,
    prompts: list[str],
    negative_prompts: list[str] | None,
    seeds: list[int],
    device: str,
    images: Sequence[InputImage] | None = None,
    masks: Sequence[InputImage] | None = None,
    on_step_end: Callable[..., dict] | None = None,
    references: Sequence[Sequence[InputImage]] | None = None,
) -> list:
    """Generate ``len(prompts)`` images in one pipeline call; image i uses ``seeds[i]``
    (and ``images[i]`` / ``masks[i]`` in the image modes; in a multi-reference edit,
    ``images[i]`` followed by ``references[i]``).

    Every image gets its own ``torch.Generator`` seeded with its seed, so image i equals the
    image a call with only ``prompts[i]`` and ``seeds[i]`` gives (the batch-vs-single
    identity the service promises). Inpainted images keep the input's pixels outside the
    mask exactly, as OpenAI's edits do (the pipelines blend in latent space, which blurs
    them). ``on_step_end`` is diffusers' ``callback_on_step_end``: it reads the latents
    (streamed previews) and changes nothing, except that it may set the pipeline's interrupt
    flag (``deployments/abandonment.py``: nobody waits for the call any more), after which
    the remaining steps are skipped. Returns PIL images.
    """
    import torch

    n = len(prompts)
    if n == 0:
        return []
    _check_lengths(shape, n, negative_prompts, seeds, images, masks)

    generators = [torch.Generator(device).manual_seed(int(seed)) for seed in seeds]
    kwargs = dict(
        pipelines.family.call_arguments(shape, prompts, negative_prompts),
        height=shape.height,
        width=shape.width,
        num_inference_steps=shape.steps,
        num_images_per_prompt=1,
        generator=generators,
        output_type="pil",
    )
    if on_step_end is not None:
        kwargs.update(callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"])
    inputs = None if images is None else [image.to_pil() for image in images]
    keep_masks = None if masks is None else [mask.to_pil() for mask in masks]
    pipe = pipelines[shape.mode]
    if shape.mode is Mode.EDIT:
        # One prompt per call (the family's max_images_per_call): its image list is the
        # first input image and the further references, in the request's order.
        if n != 1:
            raise ValueError(f"an edit call takes one prompt, got {n}")
        extra = [] if references is None else [image.to_pil() for image in references[0]]
        kwargs.update(image=[*inputs, *extra])
    elif shape.mode is not Mode.TEXT_TO_IMAGE:
        kwargs.update(image=inputs, strength=shape.strength)
        if "height" not in inspect.signature(pipe.__call__).parameters:
            # SDXL's image-to-image takes its size from the input, already fitted to it.
            del kwargs["height"], kwargs["width"]
    if shape.mode is Mode.INPAINT:
        kwargs.update(mask_image=keep_masks)

    with torch.inference_mode(), pipelines.family.call_scope(pipe):
        outputs = list(pipe(**kwargs).images)
    if len(outputs) != n:
        raise RuntimeError(f"pipeline returned {len(outputs)} images for {n} prompts")
    if shape.mode is Mode.INPAINT:
        from PIL import Image

        outputs = [Image.composite(out, source, mask) for out, source, mask in zip(outputs, inputs, keep_masks)]
    return outputs


def _check_lengths(
    shape: CallShape,
    n: int,
    negative_prompts: list[str] | None,
    seeds: list[int],
    images: Sequence[InputImage] | None,
    masks: Sequence[InputImage] | None,
) -> None:
    if len(seeds) != n:
        raise ValueError(f"got {n} prompts but {len(seeds)} seeds")
    if negative_prompts is not None and len(negative_prompts) != n:
        raise ValueError(f"got {n} prompts but {len(negative_prompts)} negative prompts")
    if shape.with_negative_prompt != (negative_prompts is not None):
        raise ValueError(
            f"shape.with_negative_prompt is {shape.with_negative_prompt} but negative_prompts "
            f"{'is None' if negative_prompts is None else 'is given'}"
        )
    wants_images = shape.mode is not Mode.TEXT_TO_IMAGE
    if wants_images != (images is not None) or (images is not None and len(images) != n):
        raise ValueError(f"a {shape.mode.value} call of {n} prompts needs {n if wants_images else 0} input images")
    wants_masks = shape.mode is Mode.INPAINT
    if wants_masks != (masks is not None) or (masks is not None and len(masks) != n):
        raise ValueError(f"a {shape.mode.value} call of {n} prompts needs {n if wants_masks else 0} masks")
