"""Turn a validated request into concrete work for one model.

Everything that depends on the model's config is decided here: the mode (text-to-image,
image-to-image, inpainting), the pixel size, the step count, guidance, strength, seeds,
output encoding, and the input image fitted to the output size. What depends on the model's
family is asked of its family module (``model.rules``). Anything the model cannot honour is
a 400 that names the field. Pure functions: no I/O, no Ray (input images arrive decoded).
"""

from __future__ import annotations

import math
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from serve_app.config import SIZE_PATTERN, ModelConfig
from serve_app.errors import InvalidRequest
from serve_app.lane import Priority
from serve_app.protocol import MAX_SEED, ImageGenerationRequest
from serve_app.work import CallShape, GenerationJob, InputImage, Mode

if TYPE_CHECKING:
    from PIL.Image import Image

ASPECT_PATTERN = re.compile(r"([0-9]{1,3}):([0-9]{1,3})")  # fullmatch, ASCII digits
# image_size modes from the qubrid document, as a share of the model's default pixel count.
IMAGE_SIZE_PIXEL_SHARE = {"optimize_for_quality": 1.0, "optimize_for_speed": 0.25}
# A multi-reference edit's further images travel at their own aspect ratio, at most this many
# pixels (Qwen-Image-Edit encodes each at a 1024x1024 area).
MAX_REFERENCE_PIXELS = 1024 * 1024
QUALITY_LABELS = {"low": "low", "medium": "medium", "high": "high", "standard": "medium", "hd": "high"}


@dataclass(frozen=True)
class GenerationPlan:
    model: ModelConfig
    prompt: str
    negative_prompt: str | None
    shape: CallShape
    seeds: tuple[int, ...]
    output_format: str
    output_quality: int
    response_format: str
    quality_label: str | None
    image: InputImage | None = None
    mask: InputImage | None = None
    references: tuple[InputImage, ...] = ()  # a multi-reference edit's further images
    check_safety: bool = True  # run the model's safety checker (when it has one)
    partial_images: int = 0  # previews per image, streamed requests only
    priority: Priority = "interactive"  # the lane (serve_app.lane): batch jobs fill what interactive leave

    @property
    def size(self) -> str:
        return f"{self.shape.width}x{self.shape.height}"

    def jobs(self, request_id: str, max_images_per_job: int) -> list[GenerationJob]:
        """The request's images as jobs no larger than one model batch."""
        job = GenerationJob(
            request_id=request_id,
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            shape=self.shape,
            seeds=self.seeds,
            output_format=self.output_format,
            output_quality=self.output_quality,
            image=self.image,
            mask=self.mask,
            references=self.references,
            check_safety=self.check_safety,
            partial_images=self.partial_images,
            priority=self.priority,
        )
        return job.split(max_images_per_job)


def plan_generation(
    request: ImageGenerationRequest,
    model: ModelConfig,
    image: Image | None = None,
    mask: Image | None = None,
    references: Sequence[Image] = (),
) -> GenerationPlan:
    """The work ``request`` asks of ``model``; ``image`` and ``mask`` are its decoded inputs
    (a mask is a grey image of the input's size, 255 where to repaint), ``references`` the
    further input images of a multi-reference edit (after ``image``)."""
    limits = model.limits
    for param, text in (("prompt", request.prompt), ("negative_prompt", request.negative_prompt or "")):
        if len(text) > limits.max_prompt_chars:
            raise InvalidRequest(f"Invalid '{param}': longer than {limits.max_prompt_chars} characters.", param=param)
    if request.n > limits.max_n:
        raise InvalidRequest(f"Invalid 'n': model '{model.id}' returns at most {limits.max_n} images.", param="n")

    mode, strength = resolve_mode(request, model, image, mask)
    inputs = (0 if image is None else 1) + len(references)
    if inputs > model.rules.max_reference_images:
        raise InvalidRequest(
            f"Invalid 'image': model '{model.id}' uses at most {model.rules.max_reference_images} input image(s), "
            f"got {inputs}.",
            param="image",
        )
    fitted_references = tuple(_reference(each) for each in references)
    width, height = resolve_size(request, model, input_size=None if image is None else image.size)
    go_fast = model.speed_mode.default if request.go_fast is None else request.go_fast
    steps = resolve_steps(request, model)
    if go_fast:
        fewer = fast_steps(steps, model)
        # Fewer steps must still leave an image-to-image call a denoising step to run.
        if strength is None or model.rules.denoising_steps(fewer, strength) >= 1:
            steps = fewer
    adapters = resolve_adapters(request, model)
    if strength is not None and model.rules.denoising_steps(steps, strength) < 1:
        raise InvalidRequest(
            f"Invalid 'strength': {strength:g} of {steps} steps is no denoising step at all; raise strength or "
            "num_inference_steps.",
            param="strength",
        )
    guidance = model.defaults.guidance if request.guidance is None else request.guidance
    negative_prompt = request.negative_prompt or None
    model.rules.check_guidance(model, guidance, request.guidance is not None, negative_prompt)

    first_seed = request.seed if request.seed is not None else secrets.randbelow(2**31)
    if first_seed + request.n - 1 > MAX_SEED:
        raise InvalidRequest(f"Invalid 'seed': seed + n - 1 must not exceed {MAX_SEED}.", param="seed")

    output_format = request.resolved_output_format(model.defaults.output_format)
    quality = request.output_quality_value
    return GenerationPlan(
        model=model,
        prompt=request.prompt,
        negative_prompt=negative_prompt,
        shape=CallShape(
            width=width,
            height=height,
            steps=steps,
            guidance=float(guidance),
            with_negative_prompt=negative_prompt is not None,
            mode=mode,
            strength=strength,
            adapters=adapters,
            go_fast=go_fast,
            reference_sizes=tuple((each.width, each.height) for each in fitted_references),
        ),
        seeds=tuple(range(first_seed, first_seed + request.n)),
        output_format=output_format,
        output_quality=model.defaults.output_quality if quality is None else quality,
        response_format=request.response_format or "b64_json",
        quality_label=None
        if request.num_inference_steps is not None
        else QUALITY_LABELS.get(request.quality or "medium", "medium"),
        image=None if image is None else _fitted(image, width, height, "RGB"),
        mask=None if mask is None else _fitted(mask, width, height, "L"),
        references=fitted_references,
        check_safety=not request.disable_safety_checker,
        partial_images=(request.partial_images or 0) if request.stream else 0,
    )


def fast_steps(steps: int, model: ModelConfig) -> int:
    """The steps ``go_fast`` runs: the model's ``step_fraction`` of them, never below the
    family's minimum (where the family caches instead, the fraction is 1)."""
    fraction = model.speed_mode.step_fraction
    return max(model.min_steps, min(steps, math.ceil(steps * fraction - 1e-9)))


def resolve_adapters(request: ImageGenerationRequest, model: ModelConfig) -> tuple[tuple[str, float], ...]:
    """The LoRA adapters of a request with their scales, checked against the model's registry.

    ``lora_weights`` goes with ``lora_scale``; ``extra_lora_weights`` with
    ``extra_lora_scale``, one scale per adapter; unsent, every extra adapter gets scale 1
    (the document's default). The qubrid document's example sends ``extra_lora_scale:
    [1, 1]`` with no extra adapters: scales without adapters are only accepted when they are
    that default, so a client that sends scales for adapters it forgot to name hears about it.
    """
    named: list[tuple[str, str, float]] = []
    if request.lora_weights is not None:
        named.append(("lora_weights", request.lora_weights, float(request.lora_scale)))
    elif request.lora_scale != 1:
        raise InvalidRequest("Invalid 'lora_scale': it needs lora_weights.", param="lora_scale")
    extras, scales = request.extra_lora_weights, request.extra_lora_scale
    if "extra_lora_scale" not in request.model_fields_set:
        scales = [1.0] * len(extras)
    if len(scales) != len(extras) and not (not extras and list(scales) == [1.0, 1.0]):
        raise InvalidRequest(
            f"Invalid 'extra_lora_scale': {len(scales)} scale(s) for {len(extras)} extra_lora_weights; send one each.",
            param="extra_lora_scale",
        )
    named.extend(("extra_lora_weights", name, float(scale)) for name, scale in zip(extras, scales))
    seen: set[str] = set()
    for param, name, _ in named:
        if name not in model.loras:
            known = ", ".join(sorted(model.loras)) or "none"
            raise InvalidRequest(
                f"Invalid '{param}': model '{model.id}' has no LoRA named '{name[:64]}' (available: {known}).",
                param=param,
            )
        if name in seen:
            raise InvalidRequest(f"Invalid '{param}': the LoRA '{name}' is named twice.", param=param)
        seen.add(name)
    return tuple((name, scale) for _, name, scale in named)


def resolve_mode(
    request: ImageGenerationRequest, model: ModelConfig, image: Image | None, mask: Image | None
) -> tuple[Mode, float | None]:
    """Text-to-image without an image; image-to-image with one; inpainting with a mask too.

    ``strength`` 0 is the qubrid document's default and means "no input image"; with an
    image, an unsent strength is the model's default (1 for inpainting: the masked area is
    painted anew) and 0 is refused, since it would return the input unchanged.
    """
    modes = model.rules.pipeline_classes
    if image is None:
        if request.strength not in (None, 0):
            raise InvalidRequest("Invalid 'strength': it needs an input image.", param="strength")
        if Mode.TEXT_TO_IMAGE not in modes:
            raise InvalidRequest(
                f"Invalid 'image': model '{model.id}' edits images and needs at least one input image "
                "(POST /v1/images/edits, or image on /v1/images/generations).",
                param="image",
            )
        return Mode.TEXT_TO_IMAGE, None
    if Mode.EDIT in modes:
        # A multi-reference edit makes the image anew from the instruction and the references.
        if mask is not None:
            raise InvalidRequest(f"Invalid 'mask': model '{model.id}' does not take a mask.", param="mask")
        if request.strength not in (None, 0) or "strength" in request.model_fields_set:
            raise InvalidRequest(
                f"Invalid 'strength': model '{model.id}' edits by instruction and takes no strength.",
                param="strength",
            )
        return Mode.EDIT, None
    mode = Mode.IMAGE_TO_IMAGE if mask is None else Mode.INPAINT
    if request.strength is None:
        return mode, (model.defaults.strength if mask is None else 1.0)
    if not 0 < request.strength <= 1:
        raise InvalidRequest(
            "Invalid 'strength': with an input image it must be above 0 and at most 1.", param="strength"
        )
    return mode, float(request.strength)


def _reference(image: Image) -> InputImage:
    """A further reference image of a multi-reference edit, at its own aspect ratio, scaled
    down to at most ``MAX_REFERENCE_PIXELS`` (the pipeline encodes it at that area or less)."""
    from PIL import Image as PILImage

    converted = image.convert("RGB")
    pixels = converted.width * converted.height
    if pixels > MAX_REFERENCE_PIXELS:
        scale = math.sqrt(MAX_REFERENCE_PIXELS / pixels)
        size = (max(1, int(converted.width * scale)), max(1, int(converted.height * scale)))
        converted = converted.resize(size, PILImage.Resampling.BICUBIC)
    return InputImage.from_pil(converted)


def _fitted(image: Image, width: int, height: int, pil_mode: str) -> InputImage:
    """The input scaled to the output size (stretched, as diffusers' image processor does),
    as raw pixels. An alpha channel is dropped: the pipelines take RGB."""
    from PIL import Image as PILImage

    converted = image.convert(pil_mode)
    if converted.size != (width, height):
        resample = PILImage.Resampling.NEAREST if pil_mode == "L" else PILImage.Resampling.BICUBIC
        converted = converted.resize((width, height), resample)
    return InputImage.from_pil(converted)


def resolve_steps(request: ImageGenerationRequest, model: ModelConfig) -> int:
    if request.num_inference_steps is not None:
        if request.quality not in (None, "auto"):
            raise InvalidRequest(
                "Invalid 'num_inference_steps': send either quality or num_inference_steps, not both.",
                param="num_inference_steps",
            )
        if request.num_inference_steps > model.limits.max_steps:
            raise InvalidRequest(
                f"Invalid 'num_inference_steps': model '{model.id}' allows at most {model.limits.max_steps}.",
                param="num_inference_steps",
            )
        if request.num_inference_steps < model.min_steps:
            raise InvalidRequest(
                f"Invalid 'num_inference_steps': model '{model.id}' needs at least {model.min_steps}.",
                param="num_inference_steps",
            )
        return request.num_inference_steps
    return model.steps_for_quality(request.quality or "auto")


def resolve_size(
    request: ImageGenerationRequest, model: ModelConfig, input_size: tuple[int, int] | None = None
) -> tuple[int, int]:
    """``size``, else ``aspect_ratio`` + ``image_size``, else the input image's size fitted to
    the model, else the model default."""
    if request.size is not None and request.size != "auto":
        match = SIZE_PATTERN.fullmatch(request.size)
        if not match:
            raise InvalidRequest("Invalid 'size': expected WIDTHxHEIGHT, e.g. 1024x1024, or 'auto'.", param="size")
        width, height = int(match[1]), int(match[2])
        _check_size(width, height, model, param="size")
        return width, height

    default_w, default_h = (int(v) for v in model.defaults.size.split("x"))
    if request.aspect_ratio is None and request.image_size is None:
        if input_size is not None:
            return _fit_input_size(*input_size, model)
        return default_w, default_h

    pixel_share = 1.0
    if request.image_size is not None:
        if request.image_size not in IMAGE_SIZE_PIXEL_SHARE:
            choices = ", ".join(IMAGE_SIZE_PIXEL_SHARE)
            raise InvalidRequest(f"Invalid 'image_size': expected one of {choices}.", param="image_size")
        pixel_share = IMAGE_SIZE_PIXEL_SHARE[request.image_size]

    ratio = default_w / default_h
    param = "image_size"
    if request.aspect_ratio is not None:
        match = ASPECT_PATTERN.fullmatch(request.aspect_ratio)
        if not match or int(match[1]) == 0 or int(match[2]) == 0:
            raise InvalidRequest("Invalid 'aspect_ratio': expected W:H, e.g. 16:9.", param="aspect_ratio")
        ratio = int(match[1]) / int(match[2])
        param = "aspect_ratio"

    # A derived size is ours to choose: keep its pixels within what the model's limits allow
    # at this ratio (a quarter of SDXL's 1024x1024 at 16:9 is 680x384, under a 512 minimum
    # side: 912x512 instead). Only a ratio that no allowed size can hold is a 400.
    message = f"Invalid '{param}': no size of model '{model.id}' has that shape"
    return _size_near(default_w * default_h * pixel_share, ratio, model, param=param, no_fit_message=message)


def _fit_input_size(width: int, height: int, model: ModelConfig) -> tuple[int, int]:
    """The input image's shape at about its own pixel count, moved within the model's limits."""
    message = f"Invalid 'image': its shape ({width}x{height}) fits no size of model '{model.id}'; send a size"
    return _size_near(width * height, width / height, model, param="image", no_fit_message=message)


def _size_near(pixels: float, ratio: float, model: ModelConfig, *, param: str, no_fit_message: str) -> tuple[int, int]:
    """A size on the model's grid near ``pixels`` at ``ratio``, within the model's limits."""
    elongation = max(ratio, 1 / ratio)
    limits = model.limits
    fewest = limits.min_side**2 * elongation
    most = min(limits.max_pixels, limits.max_side**2 / elongation)
    if fewest > most:
        raise InvalidRequest(
            f"{no_fit_message} (each side must be between {limits.min_side} and {limits.max_side}, "
            f"at most {limits.max_pixels} pixels).",
            param=param,
        )
    pixels = min(max(pixels, fewest), most)
    width, height = _fit_aspect(pixels, ratio, model.rules.size_multiple, fits=lambda size: _fits(size, model))
    _check_size(width, height, model, param=param)
    return width, height


def _fits(size: tuple[int, int], model: ModelConfig) -> bool:
    return not _size_problems(*size, model)


def _fit_aspect(pixels: float, ratio: float, multiple: int, fits: Callable[[tuple[int, int]], bool]) -> tuple[int, int]:
    """Sides on the size grid near ``pixels`` whose ratio is closest to ``ratio``, preferring
    sides that ``fits``.

    Rounding both sides independently skews the ratio (2:1 at 4096 px gives 88x48), so
    round one side, derive the other from it, and keep the better of the two ways round.
    """
    by_height_h = _round_to(math.sqrt(pixels / ratio), multiple)
    by_height = (_round_to(by_height_h * ratio, multiple), by_height_h)
    by_width_w = _round_to(math.sqrt(pixels * ratio), multiple)
    by_width = (by_width_w, _round_to(by_width_w / ratio, multiple))
    options = [wh for wh in (by_height, by_width) if fits(wh)] or [by_height, by_width]
    return min(options, key=lambda wh: (abs(wh[0] / wh[1] - ratio), abs(wh[0] * wh[1] - pixels)))


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def _size_problems(width: int, height: int, model: ModelConfig) -> list[str]:
    limits = model.limits
    multiple = model.rules.size_multiple
    problems = []
    if width % multiple or height % multiple:
        problems.append(f"both sides must be multiples of {multiple}")
    if min(width, height) < limits.min_side or max(width, height) > limits.max_side:
        problems.append(f"each side must be between {limits.min_side} and {limits.max_side}")
    if width * height > limits.max_pixels:
        problems.append(f"at most {limits.max_pixels} pixels")
    return problems


def _check_size(width: int, height: int, model: ModelConfig, *, param: str) -> None:
    problems = _size_problems(width, height, model)
    if problems:
        raise InvalidRequest(
            f"Invalid '{param}': {width}x{height} is not supported by model '{model.id}' ({'; '.join(problems)}).",
            param=param,
        )
