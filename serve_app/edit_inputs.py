"""The inputs of ``POST /v1/images/edits``, from either of its two wire forms.

OpenAI's multipart form carries image files (``image`` / ``image[]``) and a ``mask`` file;
its JSON form carries ``images: [{"image_url" | "file_id"}]`` (up to 16) and
``mask: {"image_url" | "file_id"}`` (the mask applies to the first image). Both become one
``EditInputs``: the text fields, and a source per image that is only read (fetched, loaded,
decoded) by ``decode_edit_inputs``, which the service awaits after the reservation, on the
decoder's pool. An ``image_url`` is a data URL, or an http(s) URL fetched under the same
allow-list and limits as ``image`` on generations (``serve_app.image_input``); a ``file_id``
is read through the Files API, as the key that sent the edit sees it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from serve_app.errors import InvalidRequest, NotFound
from serve_app.image_input import Decoder, ImageInputPolicy, decode_image, mask_from_png

if TYPE_CHECKING:
    from PIL.Image import Image

    from serve_app.serving import EditUpload

# OpenAI: "You can provide up to 16 images."
MAX_JSON_IMAGES = 16
# Files API purposes whose files are images (OpenAI's "vision" and "user_data").
IMAGE_FILE_PURPOSES = ("vision", "user_data")
_REFERENCE_KEYS = ("image_url", "file_id")


class FilesPort(Protocol):
    """What reading a ``file_id`` needs of the Files API (``serve_app.batches.BatchService``)."""

    async def retrieve_file(self, key: Any, file_id: str) -> Any: ...

    async def file_content(self, key: Any, file_id: str) -> bytes: ...


@dataclass(frozen=True)
class ImageSource:
    """One input image, not yet read: a form file's bytes, an ``image_url``, or a ``file_id``.
    ``param`` is what an error about it names (``image``, ``images[1].image_url``, ...)."""

    param: str
    data: bytes | None = None
    url: str | None = None
    file_id: str | None = None


@dataclass(frozen=True)
class EditInputs:
    """An edit's text fields and its image sources, whichever form they came in."""

    fields: dict[str, Any]
    images: list[ImageSource]
    mask: ImageSource | None
    fingerprint: str  # what an Idempotency-Key's first request is compared by
    json: bool  # the JSON form: its fields are typed JSON values (validated strictly), not form text
    images_param: str  # what a missing or extra image is named by: "image" (form) or "images" (JSON)


def from_upload(upload: EditUpload) -> EditInputs:
    """The multipart form's inputs."""
    return EditInputs(
        fields=dict(upload.fields),
        images=[ImageSource(param="image", data=data) for data in upload.images],
        mask=None if upload.mask is None else ImageSource(param="mask", data=upload.mask),
        fingerprint=upload.fingerprint(),
        json=False,
        images_param="image",
    )


def from_json(payload: object) -> EditInputs:
    """The JSON form's inputs: ``images`` and ``mask`` checked for shape (nothing is read
    yet), every other member a field as in the form."""
    if not isinstance(payload, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    fields = dict(payload)
    images = fields.pop("images", None)
    mask = fields.pop("mask", None)
    if "image" in fields:
        raise InvalidRequest(
            "Invalid 'image': a JSON edit sends its images as images: [{\"image_url\": ...}].", param="image"
        )
    if images is None:
        raise InvalidRequest("Missing required parameter: 'images'.", param="images")
    if not isinstance(images, list) or not images:
        raise InvalidRequest("Invalid 'images': expected a list of 1 to 16 image references.", param="images")
    if len(images) > MAX_JSON_IMAGES:
        raise InvalidRequest(f"Invalid 'images': at most {MAX_JSON_IMAGES} images, got {len(images)}.", param="images")
    sources = [_reference(item, f"images[{index}]") for index, item in enumerate(images)]
    fingerprint = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return EditInputs(
        fields=fields,
        images=sources,
        mask=None if mask is None else _reference(mask, "mask"),
        fingerprint=fingerprint,
        json=True,
        images_param="images",
    )


def _reference(value: object, param: str) -> ImageSource:
    """OpenAI's image reference: an object with exactly one of ``image_url`` and ``file_id``."""
    if not isinstance(value, dict):
        raise InvalidRequest(f"Invalid '{param}': expected an object with image_url or file_id.", param=param)
    for name in value:
        if name not in _REFERENCE_KEYS:
            shown = str(name)[:64]
            raise InvalidRequest(f"Unrecognized request argument supplied: {param}.{shown}", param=f"{param}.{shown}")
    given = [name for name in _REFERENCE_KEYS if value.get(name) is not None]
    if len(given) != 1:
        raise InvalidRequest(f"Invalid '{param}': send exactly one of image_url and file_id.", param=param)
    name = given[0]
    text = value[name]
    if not isinstance(text, str) or not text.strip():
        raise InvalidRequest(f"Invalid '{param}.{name}': expected a non-empty string.", param=f"{param}.{name}")
    if name == "image_url":
        return ImageSource(param=f"{param}.image_url", url=text)
    return ImageSource(param=f"{param}.file_id", file_id=text)


async def decode_edit_inputs(
    inputs: EditInputs, *, decoder: Decoder, policy: ImageInputPolicy, files: FilesPort | None, key: Any
) -> tuple[list[Image], Image | None]:
    """The edit's images, decoded, and its mask (the first image's size, 255 where to
    repaint): each fetched or loaded, then decoded on the decoder's pool, in order."""
    images: list[Image] = []
    for source in inputs.images:
        data = await _bytes(source, decoder=decoder, policy=policy, files=files, key=key)
        images.append(await decoder.run(decode_image, data, param=source.param, policy=policy))
    mask = None
    if inputs.mask is not None:
        source = inputs.mask
        data = await _bytes(source, decoder=decoder, policy=policy, files=files, key=key)
        mask = await decoder.run(mask_from_png, data, image_size=images[0].size, policy=policy, param=source.param)
    return images, mask


async def _bytes(
    source: ImageSource, *, decoder: Decoder, policy: ImageInputPolicy, files: FilesPort | None, key: Any
) -> bytes:
    if source.data is not None:
        return source.data
    if source.url is not None:
        return await decoder.bytes_from_field(source.url, param=source.param, policy=policy)
    assert source.file_id is not None
    return await _file_bytes(source.file_id, source.param, files, key, policy)


async def _file_bytes(file_id: str, param: str, files: FilesPort | None, key: Any, policy: ImageInputPolicy) -> bytes:
    """A ``file_id``'s bytes, through the Files API as ``key`` sees it."""
    if files is None:
        raise InvalidRequest(
            f"Invalid '{param}': file inputs are not supported on this service; send the image as image_url "
            "(a data URL or an http(s) URL).",
            param=param,
        )
    try:
        found = await files.retrieve_file(key, file_id)
        if found.purpose not in IMAGE_FILE_PURPOSES:
            raise InvalidRequest(
                f"Invalid '{param}': that file was uploaded with purpose '{found.purpose}', not as an image "
                f"({' or '.join(IMAGE_FILE_PURPOSES)}); send the image as image_url.",
                param=param,
            )
        if found.bytes > policy.max_bytes:
            raise InvalidRequest(f"Invalid '{param}': the image is larger than {policy.max_bytes} bytes.", param=param)
        return await files.file_content(key, file_id)
    except NotFound:
        raise InvalidRequest(f"Invalid '{param}': no such file.", param=param) from None
