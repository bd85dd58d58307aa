"""Qwen-Image-Edit-2509: instruction edits from one to several reference images.

diffusers' ``QwenImageEditPlusPipeline``: the references go to the Qwen2.5-VL text encoder
("Picture 1: <image> Picture 2: <image> ... <instruction>") and, VAE-encoded, into the
transformer's sequence beside the image being made; the output is generated anew (no
strength, no mask). Everything else (true CFG, the transformer, the scheduler, the latent
packing, the prompt template's prefix) is Qwen-Image's.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from serve_app.families.qwen_image import QwenImage
from serve_app.work import Mode

logger = logging.getLogger(__name__)

# The processor's own folder in a saved pipeline (the 2509 weights have one).
PROCESSOR_FOLDER = "processor"
# diffusers keeps the area every reference is VAE-encoded at as a module constant (1024x1024,
# what the model was trained at); a pipeline run here encodes them at no more than the model's
# own largest output (``limits.max_pixels``), which for the 2509 weights is that same area.
_AREA_LOCK = threading.Lock()


class QwenImageEdit(QwenImage):
    name = "qwen-image-edit"
    # The model card: "the optimal performance is with 1 to 3 input images".
    max_reference_images = 3
    pipeline_classes = {Mode.EDIT: "QwenImageEditPlusPipeline"}
    base_mode = Mode.EDIT
    class_name_prefix = "QwenImageEditPlus"
    tiny_model = "tiny-qwen-image-edit"
    # diffusers: "QwenImageEditPlusPipeline currently only supports batch_size=1".
    max_images_per_call = 1

    def load_components(self, source: str) -> dict[str, Any]:
        """The processor, built here from its saved image processor and tokenizer:
        transformers' ``Qwen2VLProcessor`` also insists on a video processor, which needs
        torchvision (not installed here, nor on the GPU machines); edits send no video."""
        return {"processor": load_processor(source)}

    def after_load(self, pipe: Any, model: Any) -> None:
        super().after_load(pipe, model)
        from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as module

        area = module.VAE_IMAGE_SIZE
        if model is not None:
            area = min(area, model.limits.max_pixels)
        pipe._imagegen_reference_area = area

    def call_scope(self, pipe: Any) -> contextlib.AbstractContextManager[None]:
        return _reference_area(pipe)


@contextlib.contextmanager
def _reference_area(pipe: Any) -> Iterator[None]:
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as module

    area = getattr(pipe, "_imagegen_reference_area", module.VAE_IMAGE_SIZE)
    if area == module.VAE_IMAGE_SIZE:
        yield
        return
    with _AREA_LOCK:
        default, module.VAE_IMAGE_SIZE = module.VAE_IMAGE_SIZE, area
        try:
            yield
        finally:
            module.VAE_IMAGE_SIZE = default


def _image_only_processor_class() -> type:
    from transformers import Qwen2VLProcessor

    class _ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        """``Qwen2VLProcessor`` without a video processor (images only)."""

        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return _ImageOnlyQwen2VLProcessor


def ImageOnlyQwen2VLProcessor(**kwargs: Any) -> Any:  # stands for a class, made on first use
    """A ``Qwen2VLProcessor`` of ``image_processor`` and ``tokenizer``, no video processor."""
    global _PROCESSOR_CLASS
    if _PROCESSOR_CLASS is None:
        _PROCESSOR_CLASS = _image_only_processor_class()
    return _PROCESSOR_CLASS(video_processor=None, **kwargs)


_PROCESSOR_CLASS: type | None = None


def load_processor(source: str) -> Any:
    """The processor saved under ``source``'s processor folder (a local folder or a hub id)."""
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    folder = Path(source)
    if folder.is_dir():
        where: dict[str, Any] = {"pretrained_model_name_or_path": str(folder / PROCESSOR_FOLDER)}
    else:
        where = {"pretrained_model_name_or_path": source, "subfolder": PROCESSOR_FOLDER}
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(**where)
    tokenizer = Qwen2Tokenizer.from_pretrained(**where)
    return ImageOnlyQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer)
