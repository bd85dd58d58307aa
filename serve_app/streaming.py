"""OpenAI's image streaming events, framed as server-sent events.

``stream: true`` answers ``text/event-stream``: per image, up to ``partial_images``
``<prefix>.partial_image`` events and then one ``<prefix>.completed`` event, where the
prefix is ``image_generation`` for generations and ``image_edit`` for edits. The fields are
exactly those of openai-python's ``ImageGenStreamEvent`` / ``ImageEditStreamEvent``; the
extensions after them (which image of the request, its seed, the step a preview shows, the
credits) are fields the SDKs pass through and ignore. An error after the stream started is
one ``error`` event carrying the documented error body, and ends the stream.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel

from serve_app.http_errors import error_body
from serve_app.protocol import ErrorBody
from serve_app.usage import Usage

EventPrefix = Literal["image_generation", "image_edit"]


class _ImageEvent(BaseModel):
    type: str
    b64_json: str
    background: Literal["transparent", "opaque", "auto"]
    created_at: int
    output_format: Literal["png", "webp", "jpeg"]
    quality: Literal["low", "medium", "high", "auto"]
    size: str
    # --- extensions (ignored by the SDKs) -------------------------------------------------
    image_index: int  # which image of the request (0 to n - 1), as `data[i]` without streaming


class PartialImageEvent(_ImageEvent):
    partial_image_index: int
    # --- extensions -----------------------------------------------------------------------
    step: int  # the denoising step the preview shows, of total_steps
    total_steps: int


class CompletedEvent(_ImageEvent):
    usage: Usage  # this image's: the request's input and this image's output (serve_app/usage.py)
    # --- extensions -----------------------------------------------------------------------
    seed: int
    revised_prompt: str | None = None
    credits_charged: str  # this request's charge so far, this image included
    credits_remaining: str  # the key's balance once the request settles if it ended here


class StreamErrorEvent(BaseModel):
    """The stream's last event when generation fails after it started: the documented error body."""

    type: Literal["error"] = "error"
    error: ErrorBody


def sse(event: BaseModel) -> bytes:
    """One server-sent event: ``event:`` names the type, ``data:`` holds the JSON."""
    payload = event.model_dump(exclude_none=True)
    return f"event: {payload['type']}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


def error_event(exc: BaseException, request_id: str) -> bytes:
    """The documented error body as the stream's last event (the SDKs raise it as an APIError)."""
    _, body = error_body(exc, request_id)
    payload = StreamErrorEvent(error=body.error).model_dump()
    return f"event: error\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()
