"""The built-in tiny SDXL (``builtin:tiny-sdxl``): the real pipeline class, shrunk."""

from __future__ import annotations

from pathlib import Path


def build(work: Path) -> None:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from builtin_models.parts import build_clip_tokenizer, fit_vae, save_tiny, seeded

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
        norm_num_groups=1,  # per-image GroupNorm over few channels would erase colour (vae_fit)
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
