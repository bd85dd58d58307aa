"""Qwen-Image: an MMDiT transformer with true classifier-free guidance and a Qwen2.5-VL text encoder."""

from __future__ import annotations

import logging
from typing import Any

from serve_app.families.base import Family, GuidanceKind
from serve_app.go_fast import GoFastConfig
from serve_app.work import CallShape, Mode

logger = logging.getLogger(__name__)

# True CFG runs only when a negative prompt is given; the official example passes a blank
# one. Used whenever guidance > 1 and the job has no negative prompt.
BLANK_NEGATIVE_PROMPT = " "
# The pipelines' max_sequence_length (not passed, so their default): text tokens kept after
# the template's prefix is dropped, the prompt's first.
MAX_SEQUENCE_LENGTH = 512


class QwenImage(Family):
    name = "qwen-image"
    size_multiple = 16  # the VAE downsamples by 8 and the transformer packs 2x2 latent patches
    # The flow-match scheduler stretches its sigmas to a terminal value, dividing by the last
    # sigma's distance from 1: with one step that is 0, and the image comes out all NaN (black).
    min_steps = 2
    guidance = GuidanceKind.TRUE_CFG
    takes_negative_prompt = True
    pipeline_classes = {
        Mode.TEXT_TO_IMAGE: "QwenImagePipeline",
        Mode.IMAGE_TO_IMAGE: "QwenImageImg2ImgPipeline",
        Mode.INPAINT: "QwenImageInpaintPipeline",
    }
    class_name_prefix = "QwenImage"
    tiny_model = "tiny-qwen-image"
    transformer_cache = True

    @property
    def default_go_fast(self):
        # TaylorSeer: a full transformer pass every other step, a first-order Taylor
        # extrapolation of the block outputs in between. Its schedule is fixed (not a
        # threshold on the batch's activations), so an image is the same alone or batched.
        return GoFastConfig(cache="taylorseer", cache_interval=2, cache_warmup_steps=1)

    def call_arguments(
        self, shape: CallShape, prompts: list[str], negative_prompts: list[str] | None
    ) -> dict[str, Any]:
        # True CFG runs only when guidance > 1 *and* a negative prompt is given; below that the
        # pipeline ignores (and warns about) a negative prompt, so none is passed.
        negative = None
        if shape.guidance > 1:
            negative = (
                list(negative_prompts) if negative_prompts is not None else [BLANK_NEGATIVE_PROMPT] * len(prompts)
            )
        return {"prompt": list(prompts), "true_cfg_scale": shape.guidance, "negative_prompt": negative}

    def prompt_token_limit(self, tokenizer: Any, shape: CallShape) -> int | None:
        return MAX_SEQUENCE_LENGTH

    def after_load(self, pipe: Any, model: Any) -> None:
        start_idx = prompt_template_prefix_length(pipe.tokenizer, pipe.prompt_template_encode)
        if start_idx != pipe.prompt_template_encode_start_idx:
            logger.info(
                "prompt_template_encode_start_idx %d -> %d for this tokenizer",
                pipe.prompt_template_encode_start_idx,
                start_idx,
            )
        pipe.prompt_template_encode_start_idx = start_idx

    def preview_latents(self, pipe: Any, latents: Any, height: int, width: int) -> Any:
        # The transformer works on packed 2x2 latent patches: unpack them; the VAE is a
        # video VAE, [B, C, 1, h, w], and an image is its one frame.
        return pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)[:, :, 0]


def prompt_template_prefix_length(tokenizer: Any, template: str) -> int:
    """How many tokens the part of ``template`` before ``{}`` encodes to.

    QwenImagePipeline drops that many leading hidden states (the system prompt and chat
    scaffolding) from the text encoder's output. The pipeline hard-codes 34, which is right
    for the real Qwen tokenizer only; computing it from the tokenizer in hand is right for any.
    """
    prefix = template.split("{}", 1)[0]
    return len(tokenizer(prefix, add_special_tokens=False).input_ids)
