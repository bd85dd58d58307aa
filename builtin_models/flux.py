"""The built-in tiny FLUX.1 (``builtin:tiny-flux``): the real pipeline class, shrunk, with a
Unigram T5 tokenizer written from a hand-made vocabulary."""

from __future__ import annotations

import string
from pathlib import Path

from serve_app.families.flux import MAX_SEQUENCE_LENGTH_DEV

# As for the tiny Qwen-Image model: with default init the image tokens average the values of
# 256 mostly-padding T5 tokens and the prompt moves a pixel by a level or so. Larger text-value
# projections make the prompt visibly steer the tiny model.
TINY_TEXT_VALUE_GAIN = 8.0

# FLUX.1-dev's scheduler/scheduler_config.json
DEV_SCHEDULER_CONFIG = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}

TINY_T5_WORDS = (
    "the a an of and in on at with to is by for from photo painting picture image portrait style art light "
    "red blue green white black cat dog man woman house tree sky sea"
).split()


def t5_vocab() -> list[tuple[str, float]]:
    """A SentencePiece-style Unigram vocabulary: ``<pad>``=0, ``</s>``=1, ``<unk>``=2 like T5.

    Printable ASCII characters appear both word-initial (``▁x``) and inside words (``x``), so
    any ASCII text tokenizes without ``<unk>``; a few common words are whole pieces.
    """
    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
    vocab += [("▁" + c, -6.0) for c in chars]
    vocab += [(c, -5.0) for c in chars]
    vocab += [("▁" + w, -3.0) for w in TINY_T5_WORDS]
    return vocab


def build_t5_tokenizer():
    """A Unigram T5 tokenizer built from nothing (no spiece.model): saved as tokenizer.json."""
    from transformers import T5Tokenizer  # in transformers 5 T5TokenizerFast is this same class

    vocab = t5_vocab()
    tokenizer = T5Tokenizer(
        vocab=vocab,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=0,
        model_max_length=MAX_SEQUENCE_LENGTH_DEV,
    )
    expected = {tok: i for i, (tok, _) in enumerate(vocab)}
    if len(tokenizer) != len(vocab) or tokenizer.get_vocab() != expected:
        raise RuntimeError("T5Tokenizer did not take the tiny vocabulary")
    return tokenizer


def build(work: Path) -> None:
    """FLUX.1-dev's shapes, shrunk: an 8x VAE with FLUX's shift/scale and no quant convs,
    a transformer packing 2x2 latent patches (sides multiple of 16) with a guidance
    input, a tiny CLIP (pooled) and T5 v1.1 (gated-gelu) encoder, and a Unigram T5
    tokenizer written from a hand-made vocabulary (no sentencepiece model to download)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from builtin_models.parts import build_clip_tokenizer, fit_vae, save_tiny, seeded

    tokenizer = build_clip_tokenizer(work / "_tokenizer_src")
    bos_id = tokenizer.convert_tokens_to_ids("<|startoftext|>")
    eos_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    tokenizer_2 = build_t5_tokenizer()

    latent_channels = 4
    text_dim = 32  # T5 d_model = joint_attention_dim; CLIP hidden = pooled_projection_dim

    # Like diffusers' FLUX fast-test components, except that the latents have 4 channels and
    # the VAE downsamples 8x like the real one (real FLUX: 16 latent channels, in_channels 64).
    seeded(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,  # the pipeline packs 2x2 latent patches
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=text_dim,
        pooled_projection_dim=text_dim,
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),  # sums to attention_head_dim
    )
    with torch.no_grad():
        for block in transformer.transformer_blocks:
            block.attn.add_v_proj.weight.mul_(TINY_TEXT_VALUE_GAIN)
    seeded(0)
    vae = AutoencoderKL(
        block_out_channels=[8, 8, 16, 16],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=latent_channels,
        norm_num_groups=1,  # per-image GroupNorm over few channels would erase colour (vae_fit)
        layers_per_block=1,
        sample_size=1024,
        mid_block_add_attention=False,  # as in the tiny SDXL VAE: cheap at 1024x1024
        use_quant_conv=False,  # as in FLUX.1's VAE
        use_post_quant_conv=False,
        shift_factor=0.1159,  # FLUX.1's
        scaling_factor=0.3611,
    )
    fit_vae(vae, seed=0)  # so that an input image survives encode and decode
    clip_config = CLIPTextConfig(
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        hidden_size=text_dim,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=len(tokenizer),
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=text_dim,
    )
    seeded(0)
    text_encoder = CLIPTextModel(clip_config)
    t5_config = T5Config(
        vocab_size=len(tokenizer_2),
        d_model=text_dim,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",  # T5 v1.1, as FLUX's T5-XXL encoder
        tie_word_embeddings=False,
        is_encoder_decoder=True,
        pad_token_id=tokenizer_2.pad_token_id,
        eos_token_id=tokenizer_2.eos_token_id,
        decoder_start_token_id=tokenizer_2.pad_token_id,
    )
    seeded(1)
    text_encoder_2 = T5EncoderModel(t5_config)
    scheduler = FlowMatchEulerDiscreteScheduler(**DEV_SCHEDULER_CONFIG)
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=tokenizer_2,
        transformer=transformer.eval(),
    )
    save_tiny(pipe, work)
