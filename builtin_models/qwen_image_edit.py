"""The built-in tiny Qwen-Image-Edit-2509 (``builtin:tiny-qwen-image-edit``): the tiny
Qwen-Image's components and a processor, saved in the real weights' layout."""

from __future__ import annotations

import json
from pathlib import Path

from serve_app.families.qwen_image_edit import PROCESSOR_FOLDER

# Where the tiny model's condition images for the text encoder end up: about 4x4 merged
# patches of 28 px each (the real processor allows up to 12845056 pixels).
TINY_CONDITION_MAX_PIXELS = 28 * 28 * 16


def build(work: Path) -> None:
    from diffusers import QwenImageEditPlusPipeline
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from builtin_models.parts import save_tiny
    from builtin_models.qwen_image import tiny_components

    # The tiny Qwen-Image's components (its Qwen2.5-VL text encoder has a 1-block vision
    # tower) and a processor of its tokenizer and a Qwen2-VL image processor.
    components = tiny_components(work)
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=28 * 28 * 4,
        max_pixels=TINY_CONDITION_MAX_PIXELS,
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
    )
    # The processor is saved by hand (transformers' save_pretrained wants its video
    # processor), in the real weights' layout: a Qwen2VLProcessor of these two parts.
    save_tiny(QwenImageEditPlusPipeline(processor=None, **components), work)
    image_processor.save_pretrained(str(work / PROCESSOR_FOLDER))
    components["tokenizer"].save_pretrained(str(work / PROCESSOR_FOLDER))
    index_path = work / "model_index.json"
    index = json.loads(index_path.read_text())
    index[PROCESSOR_FOLDER] = ["transformers", "Qwen2VLProcessor"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
