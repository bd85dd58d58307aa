"""FLUX.1: a rectified-flow transformer with distilled guidance, CLIP and T5 text encoders.

Distilled guidance: the guidance value is an input of the model (FLUX.1-dev) or was distilled
away entirely (FLUX.1-schnell), and no unconditional pass runs, so there is no negative
prompt. A model config says which by its ``defaults.guidance``: 0 for weights that take no
guidance value (schnell), above 0 for weights that do (dev, 3.5); the replica checks that
against the loaded transformer.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from serve_app.errors import InvalidRequest
from serve_app.families.base import Family, GuidanceKind
from serve_app.work import CallShape, Mode

if TYPE_CHECKING:
    from serve_app.config import ModelConfig

# T5 prompt tokens: schnell was trained with at most 256, dev with 512.
MAX_SEQUENCE_LENGTH_SCHNELL = 256
MAX_SEQUENCE_LENGTH_DEV = 512


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

    def call_arguments(self, shape: CallShape, prompts: list[str], negative_prompts: list[str] | None) -> dict[str, Any]:
        # No negative prompt and no true CFG (true_cfg_scale keeps its default of 1).
        # shape.guidance > 0 exactly for weights with a guidance input (checked at load).
        return {
            "prompt": list(prompts),
            "guidance_scale": shape.guidance,
            "max_sequence_length": MAX_SEQUENCE_LENGTH_DEV if shape.guidance > 0 else MAX_SEQUENCE_LENGTH_SCHNELL,
        }

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

    def build_tiny(self, work: Path) -> None:
        raise NotImplementedError("tiny-flux: being written")
