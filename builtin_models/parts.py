"""Parts the built-in tiny models share: byte-level BPE tokenizers made from nothing,
seeding, saving, and VAE fitting.

The tiny models let the service (and its tests) run end to end on a CPU with no weights to
download: each is a real diffusers pipeline of the real class, every component shrunk to at
most a few hundred thousand parameters and initialised from fixed seeds. Each family's
builder (``builtin_models/<family>.py``) makes its own from these parts; ``builtin_models``
materialises them into the model cache. torch and transformers are imported inside.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# The byte-level BPE alphabet shared by GPT-2, CLIP and Qwen tokenizers: every byte maps to a
# printable unicode character, so any text can be tokenized without an unknown token.


def _bytes_to_unicode() -> list[str]:
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
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


def write_bpe_files(folder: Path, vocab: dict[str, int], merges: list[str]) -> None:
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
    write_bpe_files(work, vocab, merges)
    tokenizer = CLIPTokenizer.from_pretrained(str(work), model_max_length=77)
    return _checked(tokenizer, vocab)


def build_qwen_tokenizer(work: Path):
    """A byte-level Qwen2 BPE tokenizer with the chat-template special tokens."""
    from transformers import Qwen2Tokenizer

    vocab, merges = _qwen_vocab_and_merges()
    write_bpe_files(work, vocab, merges)
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


def seeded(seed: int):
    import torch

    torch.manual_seed(seed)


def save_tiny(pipe, work: Path) -> None:
    import transformers.utils.logging as hf_logging

    shutil.rmtree(work / "_tokenizer_src")
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Writing model shards" for 200 kB of weights
    try:
        pipe.save_pretrained(str(work), safe_serialization=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def fit_vae(vae, *, seed: int = 0) -> None:
    """Fit a tiny VAE to reconstruct images (``builtin_models.vae_fit``): a random one
    does not, so an input image would not survive image-to-image on a tiny model."""
    from builtin_models.vae_fit import fit_vae as fit

    if not fit(vae, seed=seed):
        raise RuntimeError(f"{type(vae).__name__}: its configuration cannot carry colour; use norm_num_groups=1")
