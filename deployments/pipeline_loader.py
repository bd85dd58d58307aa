"""Load a diffusers pipeline for a model family from built-in, local or hub weights."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from deployments.tiny_models import BUILTIN_MODELS, ensure_builtin_model

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
FAMILIES = ("sdxl", "qwen-image")
# model_index.json "_class_name" prefixes each family's loader accepts (base, img2img, ...).
_FAMILY_CLASS_PREFIXES = {"sdxl": "StableDiffusionXL", "qwen-image": "QwenImage"}
DTYPES = ("float32", "float16", "bfloat16")


class PipelineLoadError(RuntimeError):
    """The weights could not be loaded (missing folder, unreachable hub, broken files)."""


def _pipeline_class(family: str):
    if family == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline
    if family == "qwen-image":
        from diffusers import QwenImagePipeline

        return QwenImagePipeline
    raise ValueError(f"unknown model family {family!r}; expected one of {list(FAMILIES)}")


def _torch_dtype(dtype: str):
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {list(DTYPES)}")
    return getattr(torch, dtype)


def resolve_weights(family: str, weights: str, cache_dir: Path) -> str:
    """Turn a ``weights`` setting into what ``from_pretrained`` takes: a folder or a hub id."""
    if weights.startswith(BUILTIN_PREFIX):
        name = weights[len(BUILTIN_PREFIX) :]
        if name not in BUILTIN_MODELS:
            known = [BUILTIN_PREFIX + n for n in BUILTIN_MODELS]
            raise ValueError(f"unknown built-in model {weights!r}; known: {known}")
        builtin_family = BUILTIN_MODELS[name].family
        if builtin_family != family:
            raise ValueError(f"built-in model {weights!r} is a {builtin_family!r} model, not {family!r}")
        return str(ensure_builtin_model(name, Path(cache_dir)))
    path = Path(weights).expanduser()
    if path.exists():
        index = path / "model_index.json"
        if not index.is_file():
            raise PipelineLoadError(f"weights folder {str(path)!r} has no model_index.json")
        try:
            class_name = json.loads(index.read_text()).get("_class_name", "")
        except (OSError, ValueError) as exc:
            raise PipelineLoadError(f"cannot read {str(index)!r}: {exc}") from exc
        if not str(class_name).startswith(_FAMILY_CLASS_PREFIXES[family]):
            raise ValueError(f"weights folder {str(path)!r} holds a {class_name!r}, not a {family!r} pipeline")
        return str(path)
    if weights.startswith(("/", "./", "../", "~")) or weights.count("/") > 1:
        raise PipelineLoadError(f"weights folder {weights!r} does not exist")
    return weights  # a hub id such as "stabilityai/stable-diffusion-xl-base-1.0"


def disable_progress_bars() -> None:
    """Turn off the tqdm bars diffusers and transformers draw while loading (process-wide)."""
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def prompt_template_prefix_length(tokenizer, template: str) -> int:
    """How many tokens the part of ``template`` before ``{}`` encodes to.

    QwenImagePipeline drops that many leading hidden states (the system prompt and chat
    scaffolding) from the text encoder's output. The pipeline hard-codes 34, which is right
    for the real Qwen tokenizer only; computing it from the tokenizer in hand is right for any.
    """
    prefix = template.split("{}", 1)[0]
    return len(tokenizer(prefix, add_special_tokens=False).input_ids)


def load_pipeline(family: str, weights: str, device: str, dtype: str, cache_dir: Path):
    """Load the pipeline of ``family`` ("sdxl" | "qwen-image") from ``weights``.

    ``weights`` is ``builtin:<name>`` (a tiny model built on first use under ``cache_dir``),
    a local folder in diffusers layout, or a hub id. The pipeline is moved to ``device``
    in ``dtype`` ("float32" | "float16" | "bfloat16") with progress bars off.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {list(FAMILIES)}")
    pipeline_class = _pipeline_class(family)
    torch_dtype = _torch_dtype(dtype)
    disable_progress_bars()
    source = resolve_weights(family, weights, cache_dir)
    try:
        pipe = pipeline_class.from_pretrained(source, dtype=torch_dtype)  # diffusers >= 0.42 name
    except (OSError, ValueError) as exc:
        # diffusers raises OSError/ValueError for unknown ids, offline hubs and broken folders;
        # keep its message (it names what is missing) but say which setting caused it.
        raise PipelineLoadError(f"cannot load {family} weights {weights!r}: {exc}") from exc
    if type(pipe) is not pipeline_class:
        raise ValueError(f"weights {weights!r} hold a {type(pipe).__name__}, not a {pipeline_class.__name__}")

    if family == "qwen-image":
        start_idx = prompt_template_prefix_length(pipe.tokenizer, pipe.prompt_template_encode)
        if start_idx != pipe.prompt_template_encode_start_idx:
            logger.info(
                "prompt_template_encode_start_idx %d -> %d for this tokenizer",
                pipe.prompt_template_encode_start_idx,
                start_idx,
            )
        pipe.prompt_template_encode_start_idx = start_idx

    # SDXL warns on every call whose prompt CLIP truncates, echoing the cut-off prompt text
    # (and, in a batch, pages of padding tokens). User prompts do not belong in replica logs.
    logging.getLogger(type(pipe).__module__).setLevel(logging.ERROR)

    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
