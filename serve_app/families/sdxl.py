"""Stable Diffusion XL: a UNet with classifier-free guidance and two CLIP text encoders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from serve_app.families.base import Family, GuidanceKind
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
        from serve_app.config import GoFastConfig

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

    def build_tiny(self, work: Path) -> None:
        from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        from serve_app.families.tiny_parts import build_clip_tokenizer, fit_vae, save_tiny, seeded

        tokenizer = build_clip_tokenizer(work / "_tokenizer_src")
        vocab_size = len(tokenizer)
        bos_id = tokenizer.convert_tokens_to_ids("<|startoftext|>")
        eos_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")

        # Like diffusers' SDXL fast-test components, with two changes that make the tiny model
        # behave like the real one at any size: the VAE downsamples 8x (four blocks) and has no
        # mid-block attention, so a 1024x1024 request costs a 128x128 latent, not 512x512.
        seeded(0)
        unet = UNet2DConditionModel(
            block_out_channels=(2, 4),
            layers_per_block=2,
            sample_size=128,  # default size: 128 * vae_scale_factor 8 = 1024, as for real SDXL
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=80,  # 6 * addition_time_embed_dim + projection_dim
            cross_attention_dim=64,  # hidden size of text_encoder + text_encoder_2
            norm_num_groups=1,
        )
        seeded(0)
        vae = AutoencoderKL(
            block_out_channels=[8, 8, 16, 16],
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            latent_channels=4,
            norm_num_groups=1,  # per-image GroupNorm over few channels would erase colour (tiny_vae)
            layers_per_block=1,
            sample_size=1024,
            scaling_factor=0.13025,  # SDXL's
            mid_block_add_attention=False,
        )
        # A random VAE does not reconstruct, so an input image would not survive
        # image-to-image: fit it briefly, as real VAEs are trained to reconstruct.
        fit_vae(vae, seed=0)
        text_config = CLIPTextConfig(
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            pad_token_id=eos_id,
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=5,
            vocab_size=vocab_size,
            max_position_embeddings=77,
            hidden_act="gelu",
            projection_dim=32,
        )
        seeded(0)
        text_encoder = CLIPTextModel(text_config)
        seeded(1)
        text_encoder_2 = CLIPTextModelWithProjection(text_config)
        scheduler = EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            steps_offset=1,
            timestep_spacing="leading",
            interpolation_type="linear",
            prediction_type="epsilon",
        )
        pipe = StableDiffusionXLPipeline(
            vae=vae.eval(),
            text_encoder=text_encoder.eval(),
            text_encoder_2=text_encoder_2.eval(),
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=unet.eval(),
            scheduler=scheduler,
            add_watermarker=False,
        )
        save_tiny(pipe, work)
