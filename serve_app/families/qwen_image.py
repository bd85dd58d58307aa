"""Qwen-Image: an MMDiT transformer with true classifier-free guidance and a Qwen2.5-VL text encoder."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from serve_app.families.base import Family, GuidanceKind
from serve_app.work import CallShape, Mode

logger = logging.getLogger(__name__)

# True CFG runs only when a negative prompt is given; the official example passes a blank
# one. Used whenever guidance > 1 and the job has no negative prompt.
BLANK_NEGATIVE_PROMPT = " "
# With default init the tiny model's image tokens average the text values of ~30 mostly
# shared template tokens, and the prompt moves a pixel by a level or two. Larger text-value
# projections make the prompt visibly steer it (which tests of prompt routing rely on).
TINY_TEXT_VALUE_GAIN = 8.0
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
        from serve_app.config import GoFastConfig

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

    def build_tiny(self, work: Path) -> None:
        from diffusers import QwenImagePipeline

        from serve_app.families.tiny_parts import save_tiny

        save_tiny(QwenImagePipeline(**self.tiny_components(work)), work)

    def tiny_components(self, work: Path) -> dict[str, Any]:
        """The tiny model's components (also those of the tiny Qwen-Image-Edit), from fixed seeds."""
        import torch
        from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        from serve_app.families.tiny_parts import build_qwen_tokenizer, fit_vae, seeded

        tokenizer = build_qwen_tokenizer(work / "_tokenizer_src")
        vocab = tokenizer.get_vocab()

        # Like diffusers' QwenImage fast-test components, except that the VAE downsamples 8x
        # (like the real one) and the text encoder has a tiny vocabulary with its special ids
        # inside it.
        seeded(0)
        transformer = QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=16,  # z_dim 4 x 2x2 patch
            out_channels=4,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=3,
            joint_attention_dim=16,  # text encoder hidden size
            guidance_embeds=False,
            axes_dims_rope=(8, 4, 4),
        )
        with torch.no_grad():
            for block in transformer.transformer_blocks:
                block.attn.add_v_proj.weight.mul_(TINY_TEXT_VALUE_GAIN)
        z_dim = 4
        seeded(0)
        vae = AutoencoderKLQwenImage(
            base_dim=8,
            z_dim=z_dim,
            dim_mult=[1, 2, 2, 2],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            latents_mean=[0.0] * z_dim,
            latents_std=[1.0] * z_dim,
        )
        fit_vae(vae, seed=0)  # so that an input image survives encode and decode
        scheduler = FlowMatchEulerDiscreteScheduler(  # Qwen-Image's own scheduler config
            base_image_seq_len=256,
            base_shift=0.5,
            max_image_seq_len=8192,
            max_shift=0.9,
            num_train_timesteps=1000,
            shift=1.0,
            shift_terminal=0.02,
            time_shift_type="exponential",
            use_dynamic_shifting=True,
        )
        config = Qwen2_5_VLConfig(
            text_config={
                "hidden_size": 16,
                "intermediate_size": 16,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
                "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                "rope_theta": 1000000.0,
                "vocab_size": len(vocab),
                "bos_token_id": vocab["<|endoftext|>"],
                "eos_token_id": vocab["<|im_end|>"],
                "pad_token_id": vocab["<|endoftext|>"],
                "max_position_embeddings": 2048,
            },
            vision_config={
                "depth": 1,
                "hidden_size": 16,
                "intermediate_size": 16,
                "num_heads": 2,
                "out_hidden_size": 16,
                "fullatt_block_indexes": [0],
            },
            image_token_id=vocab["<|image_pad|>"],
            video_token_id=vocab["<|video_pad|>"],
            vision_start_token_id=vocab["<|vision_start|>"],
            vision_end_token_id=vocab["<|vision_end|>"],
        )
        seeded(0)
        text_encoder = Qwen2_5_VLForConditionalGeneration(config)
        return {
            "transformer": transformer.eval(),
            "vae": vae.eval(),
            "scheduler": scheduler,
            "text_encoder": text_encoder.eval(),
            "tokenizer": tokenizer,
        }


def prompt_template_prefix_length(tokenizer: Any, template: str) -> int:
    """How many tokens the part of ``template`` before ``{}`` encodes to.

    QwenImagePipeline drops that many leading hidden states (the system prompt and chat
    scaffolding) from the text encoder's output. The pipeline hard-codes 34, which is right
    for the real Qwen tokenizer only; computing it from the tokenizer in hand is right for any.
    """
    prefix = template.split("{}", 1)[0]
    return len(tokenizer(prefix, add_special_tokens=False).input_ids)
