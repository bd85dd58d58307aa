"""The speed mode's settings (``go_fast``), apart from ``serve_app.config``.

A model family gives its default (``Family.default_go_fast``) and ``serve_app.config``
validates a model's own; this module imports neither, so that the config (which reads the
family registry) and the families (which make these settings) do not import each other.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class GoFastConfig(BaseModel):
    """What ``go_fast: true`` does on this model (``serve_app.families`` gives each family's
    default; ``deployments/speed_mode.py`` applies it). Every option is batch-independent,
    so an image is the same alone or batched."""

    model_config = ConfigDict(extra="forbid", frozen=True)  # as serve_app.config's StrictModel

    default: bool = Field(True, description="go_fast of a request that does not send it (the qubrid default: true)")
    cache: Literal["none", "taylorseer"] = Field(
        "none", description="diffusers' TaylorSeer cache on a transformer: full steps every cache_interval"
    )
    cache_interval: int = Field(2, ge=2, le=16)
    cache_warmup_steps: int = Field(1, ge=0, le=100, description="steps computed in full before caching starts")
    step_fraction: float = Field(
        1.0, gt=0, le=1, description="share of the denoising steps run (fewer effective steps)"
    )
