"""Group a batch of jobs into pipeline calls.

Jobs whose ``CallShape`` is equal share one diffusers call: their images become one list of
prompts with one seed each. Kept free of torch so it is tested against a fake pipeline.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from serve_app.work import CallShape, GenerationJob, InputImage, Mode

ImageT = TypeVar("ImageT")


@dataclass
class PipelineCall:
    """One diffusers call: parallel lists, one entry per image."""

    shape: CallShape
    prompts: list[str] = field(default_factory=list)
    negative_prompts: list[str] | None = None
    seeds: list[int] = field(default_factory=list)
    images: list[InputImage] | None = None  # image-to-image and inpainting
    masks: list[InputImage] | None = None  # inpainting
    # A multi-reference edit's further images per entry (Mode.EDIT), after ``images[i]``.
    references: list[tuple[InputImage, ...]] | None = None
    # (job index, image index within the job) for each entry, to route results back.
    owners: list[tuple[int, int]] = field(default_factory=list)


def group_jobs(
    jobs: Sequence[GenerationJob], max_call_images: Callable[[CallShape], int] | None = None
) -> list[PipelineCall]:
    """One call per distinct shape, in order of first appearance; a call of more images than
    ``max_call_images(shape)`` (a per-size memory limit) is split into calls of at most that."""
    calls = _group_by_shape(jobs)
    if max_call_images is None:
        return calls
    return [part for call in calls for part in _split_call(call, max(1, max_call_images(call.shape)))]


def _split_call(call: PipelineCall, limit: int) -> list[PipelineCall]:
    if len(call.prompts) <= limit:
        return [call]

    def part(values: list | None, start: int) -> list | None:
        return None if values is None else values[start : start + limit]

    return [
        PipelineCall(
            shape=call.shape,
            prompts=call.prompts[start : start + limit],
            negative_prompts=part(call.negative_prompts, start),
            seeds=call.seeds[start : start + limit],
            images=part(call.images, start),
            masks=part(call.masks, start),
            references=part(call.references, start),
            owners=call.owners[start : start + limit],
        )
        for start in range(0, len(call.prompts), limit)
    ]


def _group_by_shape(jobs: Sequence[GenerationJob]) -> list[PipelineCall]:
    calls: dict[CallShape, PipelineCall] = {}
    for job_index, job in enumerate(jobs):
        call = calls.get(job.shape)
        if call is None:
            call = PipelineCall(
                shape=job.shape,
                negative_prompts=[] if job.shape.with_negative_prompt else None,
                images=None if job.shape.mode is Mode.TEXT_TO_IMAGE else [],
                masks=[] if job.shape.mode is Mode.INPAINT else None,
                references=[] if job.shape.mode is Mode.EDIT else None,
            )
            calls[job.shape] = call
        for image_index, seed in enumerate(job.seeds):
            call.prompts.append(job.prompt)
            if call.negative_prompts is not None:
                call.negative_prompts.append(job.negative_prompt or "")
            if call.images is not None:
                call.images.append(_required(job.image, "input image", job))
            if call.masks is not None:
                call.masks.append(_required(job.mask, "mask", job))
            if call.references is not None:
                call.references.append(job.references)
            call.seeds.append(seed)
            call.owners.append((job_index, image_index))
    return list(calls.values())


def _required(value: InputImage | None, what: str, job: GenerationJob) -> InputImage:
    if value is None:
        raise ValueError(f"a {job.shape.mode.value} job of request {job.request_id} has no {what}")
    return value


def count_images(jobs: Sequence[GenerationJob]) -> int:
    """``batch_size_fn`` for ``@serve.batch``: a batch's size is its image count."""
    return sum(job.num_images for job in jobs)


@dataclass
class JobOutcome(Generic[ImageT]):
    """Either every image of a job, in seed order, or the error that stopped it."""

    images: list[ImageT] = field(default_factory=list)
    error: BaseException | None = None
    started_at: float | None = None  # when the batch that ran it started (time.monotonic)


def run_grouped(
    jobs: Sequence[GenerationJob],
    run_call: Callable[[PipelineCall], Sequence[ImageT]],
    max_call_images: Callable[[CallShape], int] | None = None,
) -> list[JobOutcome[ImageT]]:
    """Run each call once and hand every job its own images.

    A failing call fails only the jobs in it; other shapes in the same batch still
    complete. ``max_call_images`` caps the images of one call per shape (``group_jobs``).
    """
    slots: list[list[ImageT | None]] = [[None] * job.num_images for job in jobs]
    outcomes: list[JobOutcome[ImageT]] = [JobOutcome() for _ in jobs]
    for call in group_jobs(jobs, max_call_images):
        try:
            images = run_call(call)
            if len(images) != len(call.prompts):
                raise RuntimeError(f"pipeline returned {len(images)} images for {len(call.prompts)} prompts")
        except Exception as exc:  # noqa: BLE001 - routed to the jobs that own this call
            for job_index, _ in call.owners:
                outcomes[job_index].error = exc
            continue
        for (job_index, image_index), image in zip(call.owners, images):
            slots[job_index][image_index] = image
    for outcome, job_slots in zip(outcomes, slots):
        if outcome.error is None:
            outcome.images = [image for image in job_slots if image is not None]
    return outcomes
