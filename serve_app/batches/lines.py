"""What a batch line may ask, beyond what its endpoint takes.

A line's body goes to ``ImageGenerationService`` as it is: ``/v1/images/generations`` lines
are the JSON body of a generation, ``/v1/images/edits`` lines OpenAI's JSON form of an edit
(``images: [{"image_url" | "file_id"}]``, ``mask``), read by ``serve_app.edit_inputs`` exactly
as ``POST /v1/images/edits`` reads it: data URLs, http(s) URLs under the same allow-list, and
``file_id`` images of the line's key (purpose vision or user_data), with the same validation.
"""

from __future__ import annotations

from typing import Any

from serve_app.errors import InvalidRequest


def check_batchable(body: dict[str, Any]) -> None:
    """What a line may not ask: a stream (a batch answers with one JSON body per line)."""
    for name in ("stream", "partial_images"):
        if body.get(name):
            raise InvalidRequest(
                f"Invalid '{name}': a batch line is answered as one JSON body, not a stream.", param=name
            )


__all__ = ["check_batchable"]
