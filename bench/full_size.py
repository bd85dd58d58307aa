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
    from serve_app.families.flux import build_t5_tokenizer
    from serve_app.families.tiny_parts import build_clip_tokenizer, build_qwen_tokenizer

    if family == "sdxl":
        clip = build_clip_tokenizer(work / "clip")
        return {"tokenizer": clip, "tokenizer_2": clip}
    if family == "flux":
        return {"tokenizer": build_clip_tokenizer(work / "clip"), "tokenizer_2": build_t5_tokenizer()}
    return {"tokenizer": build_qwen_tokenizer(work / "qwen")}


def build_fp16_fix_vae(folder: Path, dtype: str) -> Path:
    """SDXL's fp16-fix VAE architecture (madebyollin/sdxl-vae-fp16-fix: SDXL's VAE config with
    force_upcast false) with random weights, saved where ``optimisations.fp16_vae`` loads it."""
    import torch

    with default_dtype(getattr(torch, dtype)):
        torch.manual_seed(0)
        vae = build_module("sdxl", "vae", "vae_fp16_fix")
    vae.save_pretrained(str(folder))
    return folder


# --- FLOPs on meta-device models -----------------------------------------------------------


def count_flops(family: str, width: int, height: int, steps: int, guidance: float, batch: int = 1) -> dict[str, Any]:
    """FLOPs of one text-to-image call of ``batch`` images, by component, counted with
    FlopCounterMode on meta-device models fed the tensors the pipeline feeds them."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counters = {"sdxl": _sdxl_calls, "flux": _flux_calls, "qwen-image": _qwen_calls}[family]
    parts: dict[str, float] = {}
    with torch.device("meta"), default_dtype(torch.bfloat16), torch.no_grad():
        modules = {name: build_module(family, name) for name in COMPONENTS[family] if name != "scheduler"}
        for part, module_name, call, times in counters(width, height, steps, guidance, batch):
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


def _sdxl_calls(width: int, height: int, steps: int, guidance: float, batch: int):
    # Classifier-free guidance runs the UNet on the prompt and the negative (zeroed when none
    # is given: no encoder pass for it) in one doubled batch.
    cfg = 2 if guidance > 1 else 1
    rows = batch * cfg
    h, w = height // 8, width // 8
    yield "text_encoder", "text_encoder", lambda m: m(_ids(batch, 77), output_hidden_states=True), 1
    yield "text_encoder_2", "text_encoder_2", lambda m: m(_ids(batch, 77), output_hidden_states=True), 1
    added = {"text_embeds": _meta(rows, 1280), "time_ids": _meta(rows, 6)}
    unet = lambda m: m(
        _meta(rows, 4, h, w), _meta(()), encoder_hidden_states=_meta(rows, 77, 2048), added_cond_kwargs=added
    )
    yield "denoiser", "unet", unet, steps
    yield "vae_decode", "vae", lambda m: m.decode(_meta(batch, 4, h, w)), 1


def _flux_calls(width: int, height: int, steps: int, guidance: float, batch: int):
    from serve_app.families.flux import MAX_SEQUENCE_LENGTH_DEV, MAX_SEQUENCE_LENGTH_SCHNELL

    text = MAX_SEQUENCE_LENGTH_DEV if guidance > 0 else MAX_SEQUENCE_LENGTH_SCHNELL
    image = (height // 16) * (width // 16)
    yield "text_encoder", "text_encoder", lambda m: m(_ids(batch, 77), output_hidden_states=False), 1
    yield "text_encoder_2", "text_encoder_2", lambda m: m(_ids(batch, text), output_hidden_states=False), 1

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


def _qwen_calls(width: int, height: int, steps: int, guidance: float, batch: int):
    # True CFG: a second transformer pass (and encoder pass) per step for the negative prompt.
    cfg = 2 if guidance > 1 else 1
    text = QWEN_PROMPT_TOKENS
    gh, gw = height // 16, width // 16

    def encoder(m):
        ids = _ids(batch, QWEN_TEMPLATE_PREFIX_TOKENS + text)
        # No padding in one prompt: a mask of ones, which is what no mask means (and meta
        # tensors cannot be inspected for padding).
        return m(input_ids=ids, attention_mask=None, output_hidden_states=True)

    yield "text_encoder", "text_encoder", encoder, cfg

    def transformer(m):
        return m(
            hidden_states=_meta(batch, gh * gw, 64),
            timestep=_meta(batch),
            encoder_hidden_states=_meta(batch, text, 3584),
            encoder_hidden_states_mask=_ids(batch, text) + 1,
            img_shapes=[[(1, gh, gw)]] * batch,
            return_dict=False,
        )

    yield "denoiser", "transformer", transformer, steps * cfg
    yield "vae_decode", "vae", lambda m: m.decode(_meta(batch, 16, 1, height // 8, width // 8)), 1
