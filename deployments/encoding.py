"""Encode generated images into the bytes the API returns."""

from __future__ import annotations

import io

from PIL import Image

ENCODINGS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def encode_image(image: Image.Image, output_format: str, quality: int) -> bytes:
    """Encode ``image`` as ``output_format`` ("png" | "jpeg" | "webp").

    ``quality`` (0-100) applies to jpeg and webp; png is always lossless. JPEG has no alpha
    channel, so RGBA and other modes are converted to RGB first.
    """
    try:
        pil_format = ENCODINGS[output_format]
    except KeyError:
        raise ValueError(f"unsupported output_format {output_format!r}; expected one of {list(ENCODINGS)}") from None
    if not 0 <= quality <= 100:
        raise ValueError(f"quality must be between 0 and 100, got {quality}")

    buffer = io.BytesIO()
    if pil_format == "PNG":
        image.save(buffer, format="PNG", optimize=False)
    elif pil_format == "JPEG":
        if image.mode != "RGB":
            image = image.convert("RGB")
        image.save(buffer, format="JPEG", quality=quality)
    else:
        if image.mode not in ("RGB", "RGBA"):
            image = image.convert("RGBA" if "A" in image.mode else "RGB")
        image.save(buffer, format="WEBP", quality=quality)
    return buffer.getvalue()
