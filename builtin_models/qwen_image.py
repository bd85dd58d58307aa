"""The built-in tiny Qwen-Image (``builtin:tiny-qwen-image``): the real pipeline class, shrunk.

Its components are also those of the tiny Qwen-Image-Edit (``builtin_models.qwen_image_edit``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# With default init the tiny model's image tokens average the text values of ~30 mostly
# shared template tokens, and the prompt moves a pixel by a level or two. Larger text-value
# projections make the prompt visibly steer it (which tests of prompt routing rely on).
TINY_TEXT_VALUE_GAIN = 8.0


def build(work: Path) -> None:
    from diffusers import QwenImagePipeline

    from builtin_models.parts import save_tiny

    save_tiny(QwenImagePipeline(**tiny_components(work)), work)


def tiny_components(work: Path) -> dict[str, Any]:
    """The tiny model's components (also those of the tiny Qwen-Image-Edit), from fixed seeds."""
    import torch
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from builtin_models.parts import build_qwen_tokenizer, fit_vae, seeded

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
