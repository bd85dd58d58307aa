"""OpenAI's token ``usage`` for image requests, in units these models really have.

OpenAI's images API reports ``usage: {input_tokens, input_tokens_details: {text_tokens,
image_tokens}, output_tokens, total_tokens}``, and clients such as LiteLLM price a call
from it. Our counts (the README's "Usage" section says the same to users):

- ``text_tokens``: the prompt's tokens, plus the negative prompt's when one is sent, under
  the model's own tokenizer, counted on the model replica that holds it
  (``Family.count_text_tokens``; the ingress stays free of tokenizers). Only the text the
  client sent: no special tokens, padding or instruction template the pipeline adds, and no
  more tokens than the text encoder reads (a longer prompt is truncated by the pipeline; the
  cut-off part is not counted). With two text encoders: SDXL counts the longer of its two
  CLIP tokenizations (both use the same vocabulary, so they agree); FLUX counts T5's, the
  sequence the transformer attends to (CLIP only gives it one pooled vector).
- ``image_tokens`` (input images of image-to-image and edits) and ``output_tokens``
  (generated images): one token per 16x16-pixel patch, ``ceil(width / 16) x ceil(height /
  16)`` per image, the unit FLUX's and Qwen-Image's transformers see (2x2 patches of the 8x
  VAE latents); SDXL's UNet counts in the same unit. An input image is counted at the size
  the model sees it (fitted to the output size); a mask is not counted. Only delivered
  images are output: one the safety checker withheld counts nothing.
- A JSON answer counts the input once and every delivered image's output; each streamed
  ``completed`` event carries that image's usage: the whole input, which the image was
  made from, and that image's output (so with n > 1 the events' inputs repeat).

Credits are separate, per delivered image: ``x-credits-charged`` / ``x-credits-remaining``
headers, and ``credits_charged`` / ``credits_remaining`` on ``completed`` events.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from pydantic import BaseModel, Field

# Pixels per side of one image token: the 8x VAE downsampling times the 2x2 latent patching.
PATCH_SIDE = 16


class InputTokensDetails(BaseModel):
    image_tokens: int = 0
    text_tokens: int = 0


class OutputTokensDetails(BaseModel):
    image_tokens: int = 0
    text_tokens: int = 0  # these models write no text


class Usage(BaseModel):
    """OpenAI's image ``usage`` object (openai-python's ``ImagesResponse.usage``)."""

    input_tokens: int = 0
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int = 0
    total_tokens: int = 0
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)


def image_tokens(width: int, height: int) -> int:
    """One token per 16x16-pixel patch (a partial patch at an edge counts as one)."""
    return math.ceil(width / PATCH_SIDE) * math.ceil(height / PATCH_SIDE)


def count_usage(
    text_tokens: int, input_images: Iterable[tuple[int, int]], output_images: Iterable[tuple[int, int]]
) -> Usage:
    """The usage of ``text_tokens`` of text and the input images (width, height) that gave
    the output images (width, height)."""
    image_in = sum(image_tokens(w, h) for w, h in input_images)
    image_out = sum(image_tokens(w, h) for w, h in output_images)
    input_tokens = text_tokens + image_in
    return Usage(
        input_tokens=input_tokens,
        input_tokens_details=InputTokensDetails(image_tokens=image_in, text_tokens=text_tokens),
        output_tokens=image_out,
        total_tokens=input_tokens + image_out,
        output_tokens_details=OutputTokensDetails(image_tokens=image_out),
    )
