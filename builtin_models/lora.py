"""The built-in tiny LoRAs (``builtin:tiny-<family>-lora``), one per family's tiny model."""

from __future__ import annotations

import json
from pathlib import Path

# peft's default LoRA targets in diffusers' attention blocks, the same names in a UNet's
# transformer blocks and in the FLUX.1 / Qwen-Image transformers.
TINY_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def build(family_name: str, base: Path, work: Path) -> None:
    """A LoRA for a family's tiny model: random rank-4 adapters on the denoiser's attention
    projections (peft with ``init_lora_weights=False``, so it changes images), saved with
    the pipeline's own ``save_lora_weights`` as a trained LoRA would be."""
    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from builtin_models.parts import seeded
    from serve_app.families import get_family

    family = get_family(family_name)
    pipeline_class = family.pipeline_class(family.base_mode)
    denoiser = getattr(pipeline_class.from_pretrained(base, **family.load_components(str(base))), family.denoiser)
    seeded(0)
    denoiser.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TINY_LORA_TARGETS, init_lora_weights=False))
    with torch.no_grad():
        layers = get_peft_model_state_dict(denoiser)
    pipeline_class.save_lora_weights(work, **{f"{family.denoiser}_lora_layers": layers})
    # model_index.json marks a complete built-in folder (builtin_models).
    (work / "model_index.json").write_text(json.dumps({"_class_name": "LoRA", "family": family_name}) + "\n")
