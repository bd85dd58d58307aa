"""The unit of work the ingress hands to a model deployment, and what comes back.

These types cross a Ray boundary (they are pickled), so they are plain frozen dataclasses
with no torch in sight: the ingress must import without torch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

OUTPUT_FORMATS = ("png", "jpeg", "webp")


class Mode(str, Enum):
    """Which of a family's pipelines a call runs."""

    TEXT_TO_IMAGE = "text-to-image"
    IMAGE_TO_IMAGE = "image-to-image"
    INPAINT = "inpaint"
    # An instruction edit from one or more reference images (Qwen-Image-Edit): the image is
    # made anew, conditioned on the references; no strength, no mask.
    EDIT = "edit"


@dataclass(frozen=True)
class CallShape:
    """Everything that changes the shape or the math of one diffusers call.

    Jobs with equal shapes can share one pipeline call; jobs with different shapes cannot.
    Whether a negative prompt is present is part of the shape because a pipeline treats
    "no negative prompt" (zeroed or absent unconditional embeddings) differently from an
    empty one, and a batch must give each image exactly what it would get alone.
    """

    width: int
    height: int
    steps: int
    guidance: float
    with_negative_prompt: bool
    mode: Mode = Mode.TEXT_TO_IMAGE
    # How far an input image is noised (0 < strength <= 1); None for text-to-image.
    strength: float | None = None
    # LoRA adapters active in the call, (registry name, scale) in request order.
    adapters: tuple[tuple[str, float], ...] = ()
    # The model's speed mode (transformer caching) is on for this call.
    go_fast: bool = False
    # (width, height) of each further reference image of a multi-reference edit (Mode.EDIT):
    # they lengthen the denoiser's sequence, so only equal ones can share a call.
    reference_sizes: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class InputImage:
    """An input image already fitted to the output size: 8-bit pixels, row-major.

    ``mode`` is "RGB" for an image and "L" for a mask (255 = repaint, diffusers' convention).
    Raw pixels, not PNG: the ingress decodes once and spends no CPU encoding again.
    """

    width: int
    height: int
    mode: str
    pixels: bytes

    def to_pil(self):
        from PIL import Image

        return Image.frombytes(self.mode, (self.width, self.height), self.pixels)

    @classmethod
    def from_pil(cls, image) -> InputImage:
        return cls(width=image.width, height=image.height, mode=image.mode, pixels=image.tobytes())


@dataclass(frozen=True)
class GenerationJob:
    """One request's worth of images: the same prompt, one image per seed."""

    request_id: str
    prompt: str
    negative_prompt: str | None
    shape: CallShape
    seeds: tuple[int, ...]
    output_format: str = "png"
    output_quality: int = 80
    image: InputImage | None = None  # image-to-image and inpainting
    mask: InputImage | None = None  # inpainting
    # The further input images of a multi-reference edit (Mode.EDIT), after ``image``, each
    # at its own aspect ratio; empty otherwise.
    references: tuple[InputImage, ...] = ()
    # Run the model's safety checker on these images (when the model has one).
    check_safety: bool = True
    # Previews to stream per image (OpenAI's partial_images, 0-3); 0 for a plain request.
    # Not part of the CallShape: previews read the latents, they do not change the math.
    partial_images: int = 0
    # "batch": a Batch API line, which a replica runs only in batch slots interactive jobs
    # leave empty (deployments/coalescing.py). Not part of the CallShape either.
    priority: str = "interactive"

    @property
    def num_images(self) -> int:
        return len(self.seeds)

    def split(self, max_images: int) -> list[GenerationJob]:
        """Parts of at most ``max_images`` images each, seeds in order."""
        step = max(1, max_images)
        if self.num_images <= step:
            return [self]
        return [replace(self, seeds=self.seeds[i : i + step]) for i in range(0, self.num_images, step)]


@dataclass(frozen=True)
class GeneratedImage:
    """One encoded image and the seed that reproduces it."""

    data: bytes
    seed: int
    output_format: str
    width: int
    height: int
    # The safety checker flagged it: ``data`` is empty and the image is not delivered.
    flagged: bool = False
    # The job's prompt (and negative prompt) tokens under the model's tokenizer, counted by
    # the replica for the response's ``usage`` (serve_app/usage.py); 0 when not counted.
    text_tokens: int = 0


@dataclass(frozen=True)
class PreviewImage:
    """A streamed preview of image ``image_index`` (of its job or request, 0-based): the
    latents after denoising step ``step`` of ``total_steps``, decoded cheaply and encoded."""

    image_index: int
    partial_image_index: int
    data: bytes
    step: int
    total_steps: int


@dataclass(frozen=True)
class StreamedImage:
    """A streamed final image: image ``image_index`` of its job or request."""

    image_index: int
    image: GeneratedImage


StreamItem = PreviewImage | StreamedImage
