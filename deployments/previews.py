"""Partial images: previews decoded from the latents while the pipeline denoises.

A streamed request with ``partial_images`` k gets k previews per image, taken after evenly
spaced denoising steps through diffusers' ``callback_on_step_end``. A preview is not a VAE
decode (that would cost as much as a step on a real model): each latent pixel is mapped to
RGB by a linear approximation of the model's own VAE decoder, ``LatentRGB``, fitted once at
load by least squares (the VAE encodes synthetic images from ``deployments.vae_latents``;
each latent pixel's RGB is regressed on the mean colour of the pixel block it covers). That
is the approach of ComfyUI's and A1111's "latent2rgb" previews, but fitted to the loaded
VAE, so it holds for the built-in tiny VAEs and for fine-tuned ones alike. What a family's latents look like inside the pipeline
(packed or not) is the family module's ``preview_latents``.

Only the previewed rows of a batch are touched and only at the preview steps, so a batch's
other requests pay nothing but the callback's Python call per step; the PNG/JPEG/WebP
encoding runs on the encode pool, off the pipeline thread.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deployments.grouping import PipelineCall
from serve_app.work import GenerationJob

if TYPE_CHECKING:
    import numpy as np
    import torch

    from deployments.pipeline_loader import PipelineSet

FIT_IMAGES = 8
FIT_SIZE = 128  # pixels per side of the synthetic images the fit encodes


def preview_steps(total_steps: int, partial_images: int) -> tuple[int, ...]:
    """The 0-based step indexes (``callback_on_step_end``'s) after which previews are
    taken: ``partial_images`` evenly spaced ones, fewer when there are fewer steps."""
    if partial_images <= 0 or total_steps <= 0:
        return ()
    steps = {
        min(total_steps - 1, math.ceil(total_steps * (j + 1) / (partial_images + 1)) - 1) for j in range(partial_images)
    }
    return tuple(sorted(steps))


@dataclass(frozen=True)
class LatentRGB:
    """``rgb = latent @ weight + bias`` per latent pixel, RGB in [-1, 1]: a linear
    stand-in for the VAE decoder, ``weight`` of shape [channels, 3]."""

    weight: Any  # torch.Tensor [C, 3]
    bias: Any  # torch.Tensor [3]

    def to_pixels(self, latents: torch.Tensor) -> np.ndarray:
        """[B, C, h, w] pipeline-space latents -> uint8 [B, h, w, 3]."""
        import torch

        with torch.inference_mode():
            flat = latents.detach().float().permute(0, 2, 3, 1)
            rgb = flat @ self.weight.to(flat.device) + self.bias.to(flat.device)
            return ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


def fit_latent_rgb(vae: Any, family: Any, device: str, dtype: Any) -> LatentRGB:
    """Least-squares fit of ``LatentRGB`` to ``vae``: latents of synthetic images against the
    mean colour of the pixel block under each latent pixel."""
    import torch
    import torch.nn.functional as F

    from deployments.vae_latents import encode_like_pipeline, synthetic_images

    generator = torch.Generator().manual_seed(0)
    images = synthetic_images(FIT_IMAGES, FIT_SIZE, generator).clamp(-1, 1)
    with torch.inference_mode():
        latents = encode_like_pipeline(vae, images.to(device=device, dtype=dtype), sample=False).float().cpu()
    if latents.dim() == 5:  # a video VAE (Qwen-Image): one frame
        latents = latents[:, :, 0]
    blocks = F.adaptive_avg_pool2d(images, latents.shape[-2:])
    x = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    y = blocks.permute(0, 2, 3, 1).reshape(-1, 3)
    design = torch.cat([x, torch.ones(len(x), 1)], dim=1)
    solution = torch.linalg.lstsq(design.double(), y.double()).solution.float()
    return LatentRGB(weight=solution[:-1].contiguous(), bias=solution[-1].contiguous())


@dataclass(frozen=True)
class PreviewRequest:
    """One row of a pipeline call that wants previews: who gets them, and when."""

    row: int  # the image's index in the call's batch
    sink: Callable[[int, int, np.ndarray, int, int], None]  # (image index, partial index, pixels, step, total)
    image_index: int
    partial_images: int


class CallPreviews:
    """The ``callback_on_step_end`` of one pipeline call: at each preview step, decodes the
    rows that want a preview then and hands each to its sink (on the pipeline thread: a
    sink must only schedule work elsewhere)."""

    def __init__(self, requests: Sequence[PreviewRequest], to_rgb: LatentRGB, family: Any, height: int, width: int):
        self._requests = list(requests)
        self._to_rgb = to_rgb
        self._family = family
        self._height = height
        self._width = width
        self._sent: dict[int, int] = {}  # row -> previews sent so far

    def __call__(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        total = int(getattr(pipe, "num_timesteps", 0) or 0)
        due = [r for r in self._requests if step in preview_steps(total, r.partial_images)]
        if due:
            latents = self._family.preview_latents(pipe, callback_kwargs["latents"], self._height, self._width)
            rows = [r.row for r in due]
            pixels = self._to_rgb.to_pixels(latents[rows])
            for request, image in zip(due, pixels):
                index = self._sent.get(request.row, 0)
                self._sent[request.row] = index + 1
                request.sink(request.image_index, index, image, step + 1, total)
        return {}


class PreviewRelay:
    """Connects jobs that want previews (registered by the replica's streaming method) to
    the pipeline calls that run them (``for_call``), by job identity: ``@serve.batch`` and
    the coalescer pass the very job objects through."""

    def __init__(self, to_rgb: LatentRGB | None, family: Any) -> None:
        self._to_rgb = to_rgb
        self._family = family
        self._sinks: dict[int, tuple[GenerationJob, Callable[..., None]]] = {}

    def register(self, job: GenerationJob, sink: Callable[[int, int, np.ndarray, int, int], None]) -> None:
        self._sinks[id(job)] = (job, sink)

    def unregister(self, job: GenerationJob) -> None:
        self._sinks.pop(id(job), None)

    def for_call(self, jobs: Sequence[GenerationJob], call: PipelineCall) -> CallPreviews | None:
        """The step callback for ``call`` of a batch of ``jobs``, or None when no image in it
        wants previews (then no step touches the latents)."""
        if self._to_rgb is None:
            return None
        requests = []
        for row, (job_index, image_index) in enumerate(call.owners):
            job = jobs[job_index]
            registered = self._sinks.get(id(job))
            if registered is not None and registered[0] is job and job.partial_images > 0:
                requests.append(PreviewRequest(row, registered[1], image_index, job.partial_images))
        if not requests:
            return None
        return CallPreviews(requests, self._to_rgb, self._family, call.shape.height, call.shape.width)


def build_relay(pipelines: PipelineSet, device: str) -> PreviewRelay:
    """The replica's relay, with the linear decoder fitted to its VAE."""
    pipe = pipelines.text_to_image
    to_rgb = fit_latent_rgb(pipe.vae, pipelines.family, device, pipe.vae.dtype)
    return PreviewRelay(to_rgb, pipelines.family)
