"""The unit of work the ingress hands to a model deployment, and what comes back.

These types cross a Ray boundary (they are pickled), so they are plain frozen dataclasses
with no torch in sight: the ingress must import without torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

OUTPUT_FORMATS = ("png", "jpeg", "webp")


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


@dataclass(frozen=True)
class JobResult:
    images: tuple[GeneratedImage, ...] = field(default_factory=tuple)
