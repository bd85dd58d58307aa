"""A batch line's request, turned into what ``ImageGenerationService`` takes.

``/v1/images/generations`` lines are the JSON body as it is. ``/v1/images/edits`` lines use
OpenAI's JSON form of an edit: ``images: [{"image_url": "data:image/png;base64,..."}]`` and
``mask: {"image_url": ...}``; here they become the ``EditUpload`` a multipart form gives, so
the edit runs exactly as one sent as a form. Inside a batch an image travels as a data URL
(a ``file_id`` or an http(s) URL is a 400 for that line).
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from serve_app.errors import InvalidRequest
from serve_app.serving import EditUpload

_DATA_URL = re.compile(r"data:image/[A-Za-z0-9.+-]+;base64,", re.IGNORECASE)


def _image_bytes(value: Any, param: str) -> bytes:
    if not isinstance(value, dict) or set(value) - {"image_url", "file_id"}:
        raise InvalidRequest(f"Invalid '{param}': an object with image_url.", param=param)
    if "file_id" in value:
        raise InvalidRequest(f"Invalid '{param}': file_id is not supported; send a data URL as image_url.", param=param)
    url = value.get("image_url")
    if not isinstance(url, str) or not (match := _DATA_URL.match(url)):
        raise InvalidRequest(
            f"Invalid '{param}': in a batch, image_url is a data URL (data:image/png;base64,...).", param=param
        )
    try:
        return base64.b64decode(url[match.end() :], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"Invalid '{param}': the data URL is not valid base64.", param=param) from None


def edit_upload(body: dict[str, Any]) -> EditUpload:
    """An edits line's body as the form it stands for."""
    fields = dict(body)
    images = fields.pop("images", None)
    mask = fields.pop("mask", None)
    if "image" in fields:
        raise InvalidRequest("Invalid 'image': in a JSON edit, send images: [{image_url}].", param="image")
    if not isinstance(images, list) or not images:
        raise InvalidRequest("Missing required parameter: 'images'.", param="images")
    decoded = [_image_bytes(item, f"images[{index}]") for index, item in enumerate(images)]
    mask_bytes = None if mask is None else _image_bytes(mask, "mask")
    return EditUpload(fields=fields, images=decoded, mask=mask_bytes)


def check_batchable(body: dict[str, Any]) -> None:
    """What a line may not ask: a stream (a batch answers with one JSON body per line)."""
    for name in ("stream", "partial_images"):
        if body.get(name):
            raise InvalidRequest(
                f"Invalid '{name}': a batch line is answered as one JSON body, not a stream.", param=name
            )


__all__ = ["check_batchable", "edit_upload"]
