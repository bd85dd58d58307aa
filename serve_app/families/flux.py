"""FLUX.1: a rectified-flow transformer with distilled guidance, CLIP and T5 text encoders.

Distilled guidance: the guidance value is an input of the model (FLUX.1-dev) or was distilled
away entirely (FLUX.1-schnell), and no unconditional pass runs, so there is no negative
prompt. A model config says which by its ``defaults.guidance``: 0 for weights that take no
guidance value (schnell), above 0 for weights that do (dev, 3.5); the replica checks that
against the loaded transformer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from serve_app.errors import InvalidRequest
from serve_app.families.base import Family, GuidanceKind
from serve_app.go_fast import GoFastConfig
from serve_app.work import CallShape, Mode

if TYPE_CHECKING:
    from serve_app.config import ModelConfig

# T5 prompt tokens: schnell was trained with at most 256, dev with 512.
MAX_SEQUENCE_LENGTH_SCHNELL = 256
MAX_SEQUENCE_LENGTH_DEV = 512


def max_sequence_length(shape: CallShape) -> int:
    """T5 tokens of a call: dev's length for weights that take guidance (above 0), else schnell's."""
    return MAX_SEQUENCE_LENGTH_DEV if shape.guidance > 0 else MAX_SEQUENCE_LENGTH_SCHNELL


class Flux(Family):
    name = "flux"
    size_multiple = 16  # the VAE downsamples by 8 and the transformer packs 2x2 latent patches
    min_steps = 1  # schnell makes images in 1-4 steps
    guidance = GuidanceKind.DISTILLED
    takes_negative_prompt = False
    pipeline_classes = {
        Mode.TEXT_TO_IMAGE: "FluxPipeline",
        Mode.IMAGE_TO_IMAGE: "FluxImg2ImgPipeline",
        Mode.INPAINT: "FluxInpaintPipeline",
    }
    class_name_prefix = "Flux"
    tiny_model = "tiny-flux"
    transformer_cache = True
    # T5's sequence is what the transformer attends to; CLIP gives it one pooled vector only.
    text_tokenizers = ("tokenizer_2",)

    @property
    def default_go_fast(self):
        # TaylorSeer: a full transformer pass every other step, a first-order Taylor
        # extrapolation of the block outputs in between. Its schedule is fixed (not a
        # threshold on the batch's activations), so an image is the same alone or batched.
        return GoFastConfig(cache="taylorseer", cache_interval=2, cache_warmup_steps=1)

    def check_guidance(self, model: ModelConfig, guidance: float, requested: bool, negative_prompt: str | None) -> None:
        if negative_prompt is not None:
            raise InvalidRequest(
                f"Invalid 'negative_prompt': model '{model.id}' uses distilled guidance, which takes no negative prompt.",
                param="negative_prompt",
            )
        if not requested:
            return
        if model.defaults.guidance == 0 and guidance != 0:
            raise InvalidRequest(
                f"Invalid 'guidance': model '{model.id}' has its guidance distilled into the weights and takes "
                "no guidance value.",
                param="guidance",
            )
        if model.defaults.guidance > 0 and guidance <= 0:
            raise InvalidRequest(
                f"Invalid 'guidance': model '{model.id}' uses distilled guidance, which must be above 0.",
                param="guidance",
            )

    def call_arguments(
        self, shape: CallShape, prompts: list[str], negative_prompts: list[str] | None
    ) -> dict[str, Any]:
        # No negative prompt and no true CFG (true_cfg_scale keeps its default of 1).
        # shape.guidance > 0 exactly for weights with a guidance input (checked at load).
        if negative_prompts is not None:
            raise ValueError("flux takes no negative prompt (planning refuses one)")
        return {
            "prompt": list(prompts),
            "guidance_scale": shape.guidance,
            "max_sequence_length": max_sequence_length(shape),
        }

    def prompt_token_limit(self, tokenizer: Any, shape: CallShape) -> int | None:
        return max_sequence_length(shape) - 1  # T5 ends the sequence with its </s> token

    def after_load(self, pipe: Any, model: ModelConfig | None) -> None:
        if model is None:
            return
        takes_guidance = bool(pipe.transformer.config.guidance_embeds)
        if takes_guidance and model.defaults.guidance == 0:
            raise ValueError(
                f"model {model.id}: defaults.guidance must be above 0: weights {model.weights!r} take a distilled "
                "guidance value (FLUX.1-dev uses 3.5)"
            )
        if not takes_guidance and model.defaults.guidance != 0:
            raise ValueError(
                f"model {model.id}: defaults.guidance must be 0: weights {model.weights!r} take no guidance value "
                "(as FLUX.1-schnell)"
            )

    def preview_latents(self, pipe: Any, latents: Any, height: int, width: int) -> Any:
        # The transformer works on packed 2x2 latent patches: unpack to [B, C, h, w].
        return pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
