"""Full-size SDXL, FLUX.1-schnell and Qwen-Image pipelines with random weights, and the FLOPs
one image costs, counted with torch's FlopCounterMode on meta-device models.

The component configs are the published ones, kept in ``configs/<family>/`` (see
configs/README.md for where each comes from): random weights cost exactly the compute of the
real ones. The tokenizers are the built-in tiny models' byte-level ones (no tokenizer files
can be downloaded); their ids fall inside the real vocabularies, and prompts are padded to
the same lengths (CLIP 77, T5 256), so only Qwen-Image's prompt length differs slightly.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# Component name -> its config file, per family (the order of a diffusers model_index.json).
COMPONENTS = {
    "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler"),
    "flux": ("transformer", "vae", "text_encoder", "text_encoder_2", "scheduler"),
    "qwen-image": ("transformer", "vae", "text_encoder", "scheduler"),
}
# Qwen-Image's prompt, after the chat template's system prefix is dropped: a typical prompt of
# about 20 real Qwen tokens plus the template's 5 closing tokens.
QWEN_PROMPT_TOKENS = 25
QWEN_TEMPLATE_PREFIX_TOKENS = 34


def read_config(family: str, name: str) -> dict[str, Any]:
    """A component's published config, without diffusers' bookkeeping keys."""
    raw = json.loads((CONFIGS / family / f"{name}.json").read_text())
    return {k: v for k, v in raw.items() if not k.startswith("_") and k != "architectures"}


def class_of(family: str, name: str) -> type:
    import diffusers
    import transformers

    class_name = json.loads((CONFIGS / family / f"{name}.json").read_text())["_class_name"]
    return getattr(diffusers, class_name, None) or getattr(transformers, class_name)


def build_module(family: str, name: str, config_name: str | None = None) -> Any:
    """One model component from its config, randomly initialised on the current default
    device and dtype (``torch.device("meta")`` builds it without memory)."""
    import transformers

    config_name = config_name or name
    cls = class_of(family, config_name)
    config = read_config(family, config_name)
    if issubclass(cls, transformers.PreTrainedModel):
        return cls(cls.config_class(**config)).eval()
    return cls(**config).eval()


@contextlib.contextmanager
def default_dtype(dtype: Any) -> Iterator[None]:
    """Create parameters directly in ``dtype`` (a 20B model does not fit twice in float32)."""
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_pipeline(family: str, device: str, dtype: str) -> Any:
    """The family's text-to-image pipeline at full size, random weights, on ``device``."""
    import torch

    from serve_app.families import get_family

    rules = get_family(family)
    # Schedulers keep their tables on the CPU (they convert them to numpy): made outside the
    # device context.
    modules: dict[str, Any] = {"scheduler": class_of(family, "scheduler").from_config(read_config(family, "scheduler"))}
    with tempfile.TemporaryDirectory() as tmp, torch.device(device), default_dtype(getattr(torch, dtype)):
        torch.manual_seed(0)
        for name in COMPONENTS[family]:
            if name != "scheduler":
                modules[name] = build_module(family, name)
        modules.update(_tokenizers(family, Path(tmp)))
    pipe_class = rules.pipeline_class(rules_mode_text())
    extra = {"add_watermarker": False} if family == "sdxl" else {}
    return pipe_class(**modules, **extra)


def rules_mode_text():
    from serve_app.work import Mode

    return Mode.TEXT_TO_IMAGE


def _tokenizers(family: str, work: Path) -> dict[str, Any]:
    from builtin_models.flux import build_t5_tokenizer
    from builtin_models.parts import build_clip_tokenizer, build_qwen_tokenizer

    if family == "sdxl":
        clip = build_clip_tokenizer(work / "clip")
        return {"tokenizer": clip, "tokenizer_2": clip}
    if family == "flux":
        return {"tokenizer": build_clip_tokenizer(work / "clip"), "tokenizer_2": build_t5_tokenizer()}
    return {"tokenizer": build_qwen_tokenizer(work / "qwen")}


def build_fp16_fix_vae(folder: Path, source: Any) -> Path:
    """SDXL's fp16-fix VAE (madebyollin/sdxl-vae-fp16-fix: SDXL's VAE config with force_upcast
    false) holding ``source``'s own weights, saved where ``optimisations.fp16_vae`` loads it.

    The pipeline's own weights, not new random ones: the fp16-safe rung's pixel difference then
    measures what that switch changes here, decoding in float16 instead of float32, and no
    other weights. (Random weights were never trained to stay inside float16's range as the
    real fp16-fix ones were, so a large difference there says that, not that the switch is
    wrong.)"""
    source.save_pretrained(str(folder))
    config_file = Path(folder) / "config.json"
    config = json.loads(config_file.read_text())
    # The one key in which configs/sdxl/vae_fp16_fix.json differs from SDXL's VAE config.
    config["force_upcast"] = read_config("sdxl", "vae_fp16_fix")["force_upcast"]
    config_file.write_text(json.dumps(config, indent=2))
    return folder


# --- FLOPs on meta-device models -----------------------------------------------------------


def count_flops(
    family: str,
    width: int,
    height: int,
    steps: int,
    guidance: float,
    batch: int = 1,
    text_lengths: dict[str, list[int]] | None = None,
) -> dict[str, Any]:
    """FLOPs of one text-to-image call of ``batch`` images, by component, counted with
    FlopCounterMode on meta-device models fed the tensors the pipeline feeds them.

    ``text_lengths`` are the token counts a real call used, as ``record_text_lengths`` in
    bench/gpu_pipeline.py saw them: per text encoder, the length of each of its calls for one
    image; for ``denoiser``, the text length of each denoiser call of one step (Qwen-Image's
    prompt and its blank negative prompt differ). Without them, the padded lengths (CLIP 77,
    T5 256/512) and a typical Qwen-Image prompt (QWEN_PROMPT_TOKENS) are assumed."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counters = {"sdxl": _sdxl_calls, "flux": _flux_calls, "qwen-image": _qwen_calls}[family]
    parts: dict[str, float] = {}
    with torch.device("meta"), default_dtype(torch.bfloat16), torch.no_grad():
        modules = {name: build_module(family, name) for name in COMPONENTS[family] if name != "scheduler"}
        for part, module_name, call, times in counters(width, height, steps, guidance, batch, text_lengths or {}):
            with FlopCounterMode(display=False) as counter:
                call(modules[module_name])
            parts[part] = parts.get(part, 0.0) + counter.get_total_flops() * times
    total = sum(parts.values())
    return {
        "width": width,
        "height": height,
        "steps": steps,
        "guidance": guidance,
        "batch": batch,
        "text_lengths": text_lengths,
        "tflop_per_image": total / batch / 1e12,
        "tflop_by_part_per_image": {k: v / batch / 1e12 for k, v in parts.items()},
        "params_billion": {k: sum(p.numel() for p in m.parameters()) / 1e9 for k, m in modules.items()},
    }


def _meta(*shape: int, dtype: Any = None) -> Any:
    import torch

    return torch.empty(*shape, dtype=dtype or torch.get_default_dtype(), device="meta")


def _ids(*shape: int) -> Any:
    import torch

    return torch.zeros(*shape, dtype=torch.long, device="meta")


def _calls_by_length(lengths: dict[str, list[int]], name: str, default: list[int]) -> list[tuple[int, int]]:
    """(token count, number of calls) of a module's recorded calls, or of ``default``."""
    return sorted(Counter(lengths.get(name) or default).items())


def _sdxl_calls(width: int, height: int, steps: int, guidance: float, batch: int, lengths: dict[str, list[int]]):
    # Classifier-free guidance runs the UNet on the prompt and the negative (zeroed when none
    # is given: no encoder pass for it) in one doubled batch.
    cfg = 2 if guidance > 1 else 1
    rows = batch * cfg
    h, w = height // 8, width // 8
    for name in ("text_encoder", "text_encoder_2"):
        for length, times in _calls_by_length(lengths, name, [77]):
            yield name, name, lambda m, n=length: m(_ids(batch, n), output_hidden_states=True), times
    text = (lengths.get("denoiser") or [77])[0]
    added = {"text_embeds": _meta(rows, 1280), "time_ids": _meta(rows, 6)}
    unet = lambda m: m(
        _meta(rows, 4, h, w), _meta(()), encoder_hidden_states=_meta(rows, text, 2048), added_cond_kwargs=added
    )
    yield "denoiser", "unet", unet, steps
    yield "vae_decode", "vae", lambda m: m.decode(_meta(batch, 4, h, w)), 1


def _flux_calls(width: int, height: int, steps: int, guidance: float, batch: int, lengths: dict[str, list[int]]):
    from serve_app.families.flux import MAX_SEQUENCE_LENGTH_DEV, MAX_SEQUENCE_LENGTH_SCHNELL

    padded = MAX_SEQUENCE_LENGTH_DEV if guidance > 0 else MAX_SEQUENCE_LENGTH_SCHNELL
    text = (lengths.get("denoiser") or [padded])[0]
    image = (height // 16) * (width // 16)
    for length, times in _calls_by_length(lengths, "text_encoder", [77]):
        yield "text_encoder", "text_encoder", lambda m, n=length: m(_ids(batch, n), output_hidden_states=False), times
    for length, times in _calls_by_length(lengths, "text_encoder_2", [text]):
        yield (
            "text_encoder_2",
            "text_encoder_2",
            lambda m, n=length: m(_ids(batch, n), output_hidden_states=False),
            times,
        )

    def transformer(m):
        return m(
            hidden_states=_meta(batch, image, 64),
            timestep=_meta(batch),
            guidance=None,
            pooled_projections=_meta(batch, 768),
            encoder_hidden_states=_meta(batch, text, 4096),
            txt_ids=_meta(text, 3),
            img_ids=_meta(image, 3),
            return_dict=False,
        )

    yield "denoiser", "transformer", transformer, steps
    yield "vae_decode", "vae", lambda m: m.decode(_meta(batch, 16, height // 8, width // 8)), 1


def _qwen_calls(width: int, height: int, steps: int, guidance: float, batch: int, lengths: dict[str, list[int]]):
    # True CFG: a second transformer pass (and encoder pass) per step for the negative prompt.
    cfg = 2 if guidance > 1 else 1
    gh, gw = height // 16, width // 16

    def encoder(m, n):
        # No padding in one prompt: a mask of ones, which is what no mask means (and meta
        # tensors cannot be inspected for padding).
        return m(input_ids=_ids(batch, n), attention_mask=None, output_hidden_states=True)

    default = [QWEN_TEMPLATE_PREFIX_TOKENS + QWEN_PROMPT_TOKENS] * cfg
    for length, times in _calls_by_length(lengths, "text_encoder", default):
        yield "text_encoder", "text_encoder", lambda m, n=length: encoder(m, n), times

    def transformer(m, text):
        return m(
            hidden_states=_meta(batch, gh * gw, 64),
            timestep=_meta(batch),
            encoder_hidden_states=_meta(batch, text, 3584),
            encoder_hidden_states_mask=_ids(batch, text) + 1,
            img_shapes=[[(1, gh, gw)]] * batch,
            return_dict=False,
        )

    for text, times in _calls_by_length(lengths, "denoiser", [QWEN_PROMPT_TOKENS] * cfg):
        yield "denoiser", "transformer", lambda m, n=text: transformer(m, n), steps * times
    yield "vae_decode", "vae", lambda m: m.decode(_meta(batch, 16, 1, height // 8, width // 8)), 1
