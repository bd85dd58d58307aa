"""Wire types of the public API.

Fields follow the order of OpenAI's images API reference; the qubrid extensions are fenced
below it. Validation here is static (types, ranges, combinations that no model can
honour); what depends on the model (sizes, step limits) is checked in ``planning``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

from serve_app.errors import InvalidRequest
from serve_app.usage import Usage

MAX_SEED = 2**63 - 1
# Absolute bounds, whatever a model allows: a model's own limits (limits.max_prompt_chars) are
# checked in planning, but nothing larger than this is even parsed into a request.
MAX_TEXT_CHARS = 32_000
MAX_LORAS = 8
# Integer fields that also take an integral float (1.0, as some clients serialize numbers);
# 1.5 stays a 400.
INTEGER_FIELDS = ("n", "output_compression", "partial_images", "num_inference_steps", "seed", "output_quality")


class ImageGenerationRequest(BaseModel):
    # strict: "3" is not a number and 1 is not a boolean, as with OpenAI's API.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)

    # --- OpenAI images API -------------------------------------------------------------
    # May be empty (OpenAI's schema allows it): the model then generates unconditionally, as a
    # variation does; only enhance_prompt needs text.
    prompt: str = Field(max_length=MAX_TEXT_CHARS)
    # None (absent or null): the config's default_model.
    model: str | None = Field(None, min_length=1, max_length=128)
    background: Literal["transparent", "opaque", "auto"] | None = None
    moderation: Literal["low", "auto"] | None = None
    n: int = Field(1, ge=1, le=10)  # null: 1
    # jpeg / webp quality; with png it is ignored, as OpenAI ignores it.
    output_compression: int | None = Field(None, ge=0, le=100)
    output_format: Literal["png", "jpeg", "jpg", "webp"] | None = None
    partial_images: int | None = Field(None, ge=0, le=3)
    quality: Literal["auto", "low", "medium", "high", "standard", "hd"] | None = None
    response_format: Literal["b64_json", "url"] | None = None
    size: str | None = Field(None, max_length=16)
    stream: bool | None = None
    style: Literal["vivid", "natural"] | None = None
    user: str | None = Field(None, max_length=256)
    safety_identifier: str | None = Field(None, max_length=256)

    # --- qubrid extensions ----------------------------------------------------------------
    # Generation controls with no OpenAI equivalent; defaults match the qubrid document.
    enhance_prompt: bool = False
    # None: the model's configured default (go_fast.default, true unless the operator says otherwise).
    go_fast: bool | None = None
    guidance: float | None = Field(None, ge=0, le=50)
    negative_prompt: str | None = Field(None, max_length=MAX_TEXT_CHARS)
    num_inference_steps: int | None = Field(None, ge=1, le=1000)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    disable_safety_checker: bool = False
    # base64, a data URI, or an http(s) URL of an operator-listed host (serve_app.image_input).
    image: str | None = Field(None, min_length=1, max_length=64 * 1024 * 1024)
    # 0 (the qubrid default) with no image; with an image, None means the model's default.
    strength: float | None = Field(None, ge=0, le=1)
    lora_weights: str | None = Field(None, max_length=512)
    lora_scale: float = Field(1, ge=-10, le=10)
    extra_lora_weights: list[Annotated[str, Field(max_length=512)]] = Field(default_factory=list, max_length=MAX_LORAS)
    extra_lora_scale: list[Annotated[float, Field(ge=-10, le=10)]] = Field(
        default_factory=lambda: [1.0, 1.0], max_length=MAX_LORAS
    )
    aspect_ratio: str | None = Field(None, max_length=16)
    image_size: str | None = Field(None, max_length=32)
    output_quality: int | None = Field(None, ge=0, le=100)

    @field_validator("n", mode="before")
    @classmethod
    def _null_is_one(cls, value: object) -> object:
        """OpenAI's ``n: null`` means the default."""
        return 1 if value is None else value

    @field_validator(*INTEGER_FIELDS, mode="before")
    @classmethod
    def _integral_float(cls, value: object) -> object:
        """``1.0`` is the integer 1 (JSON has one number type); ``1.5`` stays a float, refused."""
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value

    @model_validator(mode="after")
    def _honourable(self) -> ImageGenerationRequest:
        """Reject what no model here can do, rather than silently ignoring it."""
        unsupported = [
            ("partial_images", bool(self.partial_images) and not self.stream, "partial images need stream: true"),
            (
                "response_format",
                self.stream is True and self.response_format == "url",
                "a stream carries its images as b64_json; url needs stream: false",
            ),
            ("background", self.background == "transparent", "transparent backgrounds are not supported"),
            ("style", self.style is not None, "style presets are not supported; describe the style in the prompt"),
        ]
        self._check_prompt()
        for param, rejected, why in unsupported:
            if rejected:
                raise _FieldError(param, why)
        if self.output_compression is not None and self.output_quality is not None:
            if self.output_compression != self.output_quality:
                raise _FieldError("output_compression", "output_compression and output_quality disagree; send one")
        if self.size is not None and self.size != "auto" and (self.aspect_ratio or self.image_size):
            raise _FieldError("size", "send either size or aspect_ratio/image_size, not both")
        return self

    def _check_prompt(self) -> None:
        if self.enhance_prompt and not self.prompt.strip():
            raise _FieldError("enhance_prompt", "an empty prompt has nothing to enhance")

    def resolved_output_format(self, default: str = "png") -> str:
        fmt = self.output_format or default
        return "jpeg" if fmt == "jpg" else fmt

    @property
    def output_quality_value(self) -> int | None:
        return self.output_compression if self.output_compression is not None else self.output_quality


class ImageEditRequest(ImageGenerationRequest):
    """The text fields of ``POST /v1/images/edits`` (OpenAI's multipart form plus the same
    extensions as generations). Not strict: form values arrive as text ("2", "true"). The
    image files and the mask travel beside it, not in it."""

    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)

    # OpenAI's edits field; how closely to keep the input is ``strength`` here.
    input_fidelity: Literal["high", "low"] | None = None

    @model_validator(mode="after")
    def _edit_fields(self) -> ImageEditRequest:
        if self.image is not None:
            raise _FieldError("image", "send the image as a file part, not as text")
        if self.input_fidelity is not None:
            raise _FieldError("input_fidelity", "not supported; set strength (0-1, lower keeps more of the input)")
        return self


def _present_text(schema: dict[str, Any]) -> None:
    """The schema of an optional text field that, when sent, is a non-blank string (not null)."""
    schema.pop("default", None)
    schema["pattern"] = r"\S"


class ImageReference(BaseModel):
    """An input image of a JSON edit (OpenAI's ``images[]`` / ``mask``): exactly one of
    ``image_url`` (a data URL, or an http(s) URL under the same allow-list and limits as
    ``image`` on generations) and ``file_id`` (a Files API file of purpose vision or user_data)."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        frozen=True,
        json_schema_extra={"oneOf": [{"required": ["image_url"]}, {"required": ["file_id"]}]},
    )

    image_url: str | SkipJsonSchema[None] = Field(
        None, max_length=64 * 1024 * 1024, json_schema_extra=lambda s: _present_text(s)
    )
    file_id: str | SkipJsonSchema[None] = Field(None, max_length=128, json_schema_extra=lambda s: _present_text(s))


class ImageEditJSONRequest(ImageEditRequest):
    """``POST /v1/images/edits`` as ``application/json`` (OpenAI's JSON form): the edit fields
    typed as on generations, the images by reference (read by serve_app.edit_inputs after the
    reservation). The wire shape the API document shows for that media type."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    images: list[ImageReference] = Field(min_length=1, max_length=16)
    # Applies to the first image: a PNG of its size whose fully transparent pixels mark what to change.
    mask: ImageReference | None = None
    image: SkipJsonSchema[None] = None  # the multipart form's; a JSON edit sends ``images``


class ImageVariationRequest(ImageGenerationRequest):
    """The text fields of ``POST /v1/images/variations``: OpenAI's multipart form (``model``,
    ``n``, ``size``, ``response_format``, ``user``) plus the same extensions as edits. A
    variation is image-to-image from the ``image`` file with an empty prompt, at the model's
    ``defaults.variation_strength`` unless ``strength`` is sent. Not strict: form values
    arrive as text. The image file travels beside it."""

    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)

    prompt: str = ""  # never sent: a variation has no prompt

    def _check_prompt(self) -> None:
        if "prompt" in self.model_fields_set:
            raise _FieldError("prompt", "a variation has no prompt; to change an image by a prompt, use /v1/images/edits")

    @model_validator(mode="after")
    def _variation_fields(self) -> ImageVariationRequest:
        if self.image is not None:
            raise _FieldError("image", "send the image as a file part, not as text")
        if self.stream is True:
            raise _FieldError("stream", "variations are not streamed; send stream: false")
        if self.enhance_prompt:
            raise _FieldError("enhance_prompt", "a variation has no prompt to enhance")
        return self


class _FieldError(ValueError):
    """A validator's complaint that names its field (pydantic reports it at the model)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


def parse_generation_request(payload: object) -> ImageGenerationRequest:
    """Validate a decoded JSON body, turning the first problem into a 400 naming its field."""
    if not isinstance(payload, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    try:
        return ImageGenerationRequest.model_validate(payload)
    except ValidationError as exc:
        raise _to_invalid_request(exc) from None


def parse_edit_request(fields: dict[str, object], strict: bool = False) -> ImageEditRequest:
    """Validate the text fields of an edits form (or, ``strict``, the members of a JSON edit
    other than its images: typed as on generations), the first problem a 400 naming its field."""
    try:
        return ImageEditRequest.model_validate(fields, strict=strict)
    except ValidationError as exc:
        raise _to_invalid_request(exc) from None


def parse_variation_request(fields: dict[str, str | list[str]]) -> ImageVariationRequest:
    """Validate the text fields of a variations form, the first problem a 400 naming its field."""
    try:
        return ImageVariationRequest.model_validate(fields)
    except ValidationError as exc:
        raise _to_invalid_request(exc) from None


def _to_invalid_request(exc: ValidationError) -> InvalidRequest:
    error = exc.errors(include_url=False)[0]
    location = ".".join(str(part) for part in error["loc"])
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, _FieldError):
        return InvalidRequest(f"Invalid '{cause.param}': {cause.message}.", param=cause.param)
    param = location or None
    if error["type"] == "extra_forbidden":
        return InvalidRequest(f"Unrecognized request argument supplied: {location}", param=param)
    if error["type"] == "missing":
        return InvalidRequest(f"Missing required parameter: '{location}'.", param=param)
    # pydantic's own message says what was expected; the input is not echoed back.
    return InvalidRequest(f"Invalid '{location}': {error['msg'].rstrip('.')}.", param=param)


# --- responses ------------------------------------------------------------------------------


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None
    seed: int


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: Literal["png", "jpeg", "webp"]
    size: str
    quality: Literal["low", "medium", "high"] | None = None
    background: Literal["opaque"] | None = None
    # OpenAI's token usage in our documented units (serve_app/usage.py); credits are headers.
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "imagegen"
    # Extensions of GET /v1/models/{model}: the LoRA names lora_weights / extra_lora_weights
    # accept, and what the model's optional stages are.
    adapters: list[str] | None = None
    safety_checker: bool | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    code: str
    param: str | None = None
    request_id: str


class ErrorResponse(BaseModel):
    error: ErrorBody
