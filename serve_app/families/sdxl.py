"""Stable Diffusion XL: a UNet with classifier-free guidance and two CLIP text encoders."""

from __future__ import annotations

from typing import Any

from serve_app.families.base import Family, GuidanceKind
from serve_app.go_fast import GoFastConfig
from serve_app.work import CallShape, Mode


class SDXL(Family):
    name = "sdxl"
    size_multiple = 8  # the VAE downsamples by 8
    min_steps = 1  # SDXL's schedulers are fine with one step
    guidance = GuidanceKind.CLASSIFIER_FREE
    takes_negative_prompt = True
    pipeline_classes = {
        Mode.TEXT_TO_IMAGE: "StableDiffusionXLPipeline",
        Mode.IMAGE_TO_IMAGE: "StableDiffusionXLImg2ImgPipeline",
        Mode.INPAINT: "StableDiffusionXLInpaintPipeline",
    }
    class_name_prefix = "StableDiffusionXL"
    tiny_model = "tiny-sdxl"
    # SDXL's VAE config says force_upcast: float16 pipelines decode in float32.
    vae_upcast_in_float16 = True
    denoiser = "unet"
    # Both CLIP encoders' sequences feed the UNet; their tokenizers share CLIP's BPE vocabulary.
    text_tokenizers = ("tokenizer", "tokenizer_2")

    @property
    def default_go_fast(self):
        # A UNet has no caching hooks in diffusers; Euler is fine at half the steps.
        return GoFastConfig(step_fraction=0.5)

    def denoising_steps(self, steps: int, strength: float) -> int:
        # SDXL's get_timesteps truncates steps * strength before subtracting.
        return min(int(steps * strength), steps)

    def call_arguments(
        self, shape: CallShape, prompts: list[str], negative_prompts: list[str] | None
    ) -> dict[str, Any]:
        return {
            "prompt": list(prompts),
            "guidance_scale": shape.guidance,
            "negative_prompt": None if negative_prompts is None else list(negative_prompts),
        }

    def preview_latents(self, pipe: Any, latents: Any, height: int, width: int) -> Any:
        return latents  # the UNet's latents are already [B, C, h, w]

    def prompt_token_limit(self, tokenizer: Any, shape: CallShape) -> int | None:
        # A CLIP encoder reads model_max_length (77) tokens, two of them its start and end tokens.
        return tokenizer.model_max_length - 2
