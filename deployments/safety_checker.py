"""The optional safety checker stage of a model deployment.

A real classifier of diffusers' ``StableDiffusionSafetyChecker`` class (CLIP vision tower,
projected image embedding, cosine distance to concept embeddings against per-concept
thresholds), loaded from a folder in the Stable Diffusion layout (``safety_checker/`` and
``feature_extractor/``), e.g. ``CompVis/stable-diffusion-safety-checker``. It runs on the
replica after the pipeline, image by image (its verdicts do not depend on the batch).

The built-in ``builtin:tiny-safety-checker`` is the same class shrunk and trained to flag
one test pattern (``builtin_models/safety_checker.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deployments.weights import resolve_source


class SafetyChecker:
    def __init__(self, weights: str, device: str, cache_dir: Path) -> None:
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        source = resolve_source(weights, cache_dir)  # builtin:tiny-safety-checker is built on first use
        # Its "Potential NSFW content was detected" warning: the verdict is acted on here.
        logging.getLogger(StableDiffusionSafetyChecker.__module__).setLevel(logging.ERROR)
        self._model = StableDiffusionSafetyChecker.from_pretrained(source, subfolder="safety_checker").to(device).eval()
        self._processor = CLIPImageProcessor.from_pretrained(source, subfolder="feature_extractor")
        self._device = device

    def flags(self, images: Sequence[Any]) -> list[bool]:
        """One verdict per PIL image: True when the checker flags it."""
        if not images:
            return []
        return [bool(flag) for flag in _verdicts(self._model, self._processor, images, self._device)]


def _verdicts(model: Any, processor: Any, images: Sequence[Any], device: str) -> list[bool]:
    import numpy as np
    import torch

    pixels = processor(images=list(images), return_tensors="pt").pixel_values.to(device, model.dtype)
    arrays = [np.asarray(image.convert("RGB"), dtype=np.float32) / 255 for image in images]
    with torch.inference_mode():
        _, flagged = model(clip_input=pixels, images=arrays)
    return list(flagged)
