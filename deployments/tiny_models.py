"""Built-in tiny models: small, randomly initialised pipelines that run anywhere.

They let the service (and its tests) run end to end on a CPU with no weights to download:
each one is a real diffusers pipeline of the real class, with every component shrunk to at
most a few hundred thousand parameters and initialised from fixed seeds. The images are
noise-like, but every code path (tokenizers, text encoders, denoiser, scheduler, VAE,
batching, seeds) is the one that real weights take.

A built-in model is materialised once into ``<cache_dir>/<name>-v1/`` with
``save_pretrained`` and then loaded with the ordinary ``from_pretrained`` of its pipeline
class, exactly like a local folder of real weights.

Bump ``BUILTIN_VERSION`` whenever a config below changes, so old folders are not reused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BUILTIN_VERSION = "v1"

# The byte-level BPE alphabet shared by GPT-2, CLIP and Qwen tokenizers: every byte maps to a
# printable unicode character, so any text can be tokenized without an unknown token.


def _bytes_to_unicode() -> list[str]:
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + n)
            n += 1
    return [chars[b] for b in range(256)]


def _encode_word(word: str) -> str:
    alphabet = _bytes_to_unicode()
    return "".join(alphabet[b] for b in word.encode("utf-8"))


# A few merges so that the tokenizers really are BPE tokenizers (common English pairs). The
# vocabulary stays tiny; unmerged text simply falls back to single bytes.
_MERGE_PAIRS = [("t", "h"), ("th", "e"), ("i", "n"), ("a", "n"), ("e", "r"), ("o", "n"), ("r", "e"), ("a", "t")]

QWEN_TEXT_VALUE_GAIN = 8.0

CLIP_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


def _clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """CLIP layout: 256 byte chars, their ``</w>`` (end of word) forms, merges, specials."""
    alphabet = _bytes_to_unicode()
    tokens = list(alphabet) + [c + "</w>" for c in alphabet]
    merges: list[str] = []
    for a, b in _MERGE_PAIRS:
        merges.append(f"{a} {b}")
        tokens.append(a + b)
    for a, b in _MERGE_PAIRS:
        merges.append(f"{a} {b}</w>")
        tokens.append(a + b + "</w>")
    tokens.extend(CLIP_SPECIAL_TOKENS)  # <|endoftext|> has the highest id, as in real CLIP
    return {t: i for i, t in enumerate(tokens)}, merges


def _qwen_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """GPT-2/Qwen layout: 256 byte chars, merges (with and without a leading space), specials."""
    alphabet = _bytes_to_unicode()
    space = _encode_word(" ")  # "Ġ"
    tokens = list(alphabet)
    merges: list[str] = []
    for a, b in _MERGE_PAIRS:
        merges.append(f"{a} {b}")
        tokens.append(a + b)
    for a, _ in _MERGE_PAIRS[:4]:
        if space + a not in tokens:
            merges.append(f"{space} {a}")
            tokens.append(space + a)
    tokens.extend(QWEN_SPECIAL_TOKENS)
    return {t: i for i, t in enumerate(tokens)}, merges


def _write_bpe_files(folder: Path, vocab: dict[str, int], merges: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def _checked(tokenizer, vocab: dict[str, int]):
    # A tokenizer class that silently ignored the vocabulary would still "work"; make sure not.
    if len(tokenizer) != len(vocab) or tokenizer.get_vocab() != vocab:
        raise RuntimeError(f"{type(tokenizer).__name__} did not take the tiny vocabulary")
    # Loading from a local folder records loader flags among the init kwargs; they are not
    # tokenizer settings and should not end up in the saved tokenizer_config.json.
    for key in ("is_local", "local_files_only", "name_or_path"):
        tokenizer.init_kwargs.pop(key, None)
    return tokenizer


def build_clip_tokenizer(work: Path):
    """A byte-level CLIP BPE tokenizer (``model_max_length`` 77) built from nothing.

    Written as vocab.json + merges.txt and loaded like any CLIP tokenizer folder.
    """
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges()
    _write_bpe_files(work, vocab, merges)
    tokenizer = CLIPTokenizer.from_pretrained(str(work), model_max_length=77)
    return _checked(tokenizer, vocab)


def build_qwen_tokenizer(work: Path):
    """A byte-level Qwen2 BPE tokenizer with the chat-template special tokens."""
    from transformers import Qwen2Tokenizer

    vocab, merges = _qwen_vocab_and_merges()
    _write_bpe_files(work, vocab, merges)
    tokenizer = Qwen2Tokenizer.from_pretrained(
        str(work),
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=[t for t in QWEN_SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|im_end|>")],
        padding_side="right",
        model_max_length=32768,
    )
    return _checked(tokenizer, vocab)


# ----------------------------------------------------------------------------------------
# Pipelines


def _seeded(seed: int):
    import torch

    torch.manual_seed(seed)


def _build_tiny_sdxl(work: Path) -> None:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = build_clip_tokenizer(work / "_tokenizer_src")
    vocab_size = len(tokenizer)
    bos_id = tokenizer.convert_tokens_to_ids("<|startoftext|>")
    eos_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")

    # Like diffusers' SDXL fast-test components, with two changes that make the tiny model
    # behave like the real one at any size: the VAE downsamples 8x (four blocks) and has no
    # mid-block attention, so a 1024x1024 request costs a 128x128 latent, not 512x512.
    _seeded(0)
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
    _seeded(0)
    vae = AutoencoderKL(
        block_out_channels=[8, 8, 16, 16],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=1024,
        scaling_factor=0.13025,  # SDXL's
        mid_block_add_attention=False,
    )
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
    _seeded(0)
    text_encoder = CLIPTextModel(text_config)
    _seeded(1)
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
    _save(pipe, work)


def _build_tiny_qwen_image(work: Path) -> None:
    import torch
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = build_qwen_tokenizer(work / "_tokenizer_src")
    vocab = tokenizer.get_vocab()

    # Like diffusers' QwenImage fast-test components, except that the VAE downsamples 8x
    # (like the real one) and the text encoder has a tiny vocabulary with its special ids
    # inside it.
    _seeded(0)
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
    # With default init the image tokens average the text values of ~30 mostly shared template
    # tokens, and the prompt moves a pixel by a level or two. Larger text-value projections
    # make the prompt visibly steer the tiny model (which tests of prompt routing rely on).
    with torch.no_grad():
        for block in transformer.transformer_blocks:
            block.attn.add_v_proj.weight.mul_(QWEN_TEXT_VALUE_GAIN)
    z_dim = 4
    _seeded(0)
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=z_dim,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * z_dim,
        latents_std=[1.0] * z_dim,
    )
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
    _seeded(0)
    text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    pipe = QwenImagePipeline(
        transformer=transformer.eval(),
        vae=vae.eval(),
        scheduler=scheduler,
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
    )
    _save(pipe, work)


def _save(pipe, work: Path) -> None:
    import transformers.utils.logging as hf_logging

    shutil.rmtree(work / "_tokenizer_src")
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Writing model shards" for 200 kB of weights
    try:
        pipe.save_pretrained(str(work), safe_serialization=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


@dataclass(frozen=True)
class BuiltinModel:
    family: str  # "sdxl" | "qwen-image"
    build: Callable[[Path], None]


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "tiny-sdxl": BuiltinModel(family="sdxl", build=_build_tiny_sdxl),
    "tiny-qwen-image": BuiltinModel(family="qwen-image", build=_build_tiny_qwen_image),
}


def builtin_model_dir(name: str, cache_dir: Path) -> Path:
    return Path(cache_dir) / f"{name}-{BUILTIN_VERSION}"


def ensure_builtin_model(name: str, cache_dir: Path) -> Path:
    """Return the folder of built-in model ``name`` under ``cache_dir``, building it if needed.

    The build writes into a temporary folder beside the target and renames it into place,
    so a folder that exists is always complete. When two processes race, the loser discards
    its build and uses the winner's folder.
    """
    try:
        model = BUILTIN_MODELS[name]
    except KeyError:
        raise ValueError(f"unknown built-in model {name!r}; known: {sorted(BUILTIN_MODELS)}") from None
    cache_dir = Path(cache_dir)
    target = builtin_model_dir(name, cache_dir)
    if (target / "model_index.json").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=cache_dir))
    try:
        import torch

        # Seeded init must neither depend on nor disturb the caller's global RNG state.
        with torch.random.fork_rng(devices=[]):
            model.build(work)
        os.chmod(work, 0o755)  # mkdtemp makes it owner-only; the cache may be shared
        try:
            os.rename(work, target)
        except OSError:
            if not (target / "model_index.json").is_file():
                raise
            # Another process won the race; its folder is complete. Ours goes away below.
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return target
