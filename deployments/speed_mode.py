"""``go_fast``: the model's speed mode around one pipeline call.

Fewer effective steps (``go_fast.step_fraction``) are decided by the ingress when it plans
the call; what happens here is the caching of a transformer family: diffusers' TaylorSeer
cache computes the transformer in full every ``cache_interval`` steps and extrapolates its
block outputs in between. Its schedule is fixed per step, not a threshold on the batch's
activations (as first-block cache and MagCache are), so an image is the same alone or in
a batch, as the service promises. The hooks are taken off after the call: a call with
go_fast off runs the plain transformer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from serve_app.config import GoFastConfig
from serve_app.work import CallShape


def caches(config: GoFastConfig, shape: CallShape) -> bool:
    """Whether a call of ``shape`` runs with the cache hooks on."""
    return shape.go_fast and config.cache != "none"


@contextmanager
def speed_mode(pipe: Any, config: GoFastConfig, shape: CallShape) -> Iterator[None]:
    """Turn the configured cache on for the duration of one call with ``shape.go_fast``."""
    if not caches(config, shape):
        yield
        return
    from diffusers.hooks import TaylorSeerCacheConfig

    transformer = pipe.transformer
    transformer.enable_cache(
        TaylorSeerCacheConfig(
            cache_interval=config.cache_interval,
            disable_cache_before_step=config.cache_warmup_steps,
            # The factors in the model's own dtype: bfloat16 factors would cost float32
            # models their precision for no memory that matters here.
            taylor_factors_dtype=transformer.dtype,
        )
    )
    try:
        # The cache's state lives in a named context. Text-to-image pipelines open their own
        # around each denoiser call; some image-to-image and inpainting pipelines (FLUX.1's)
        # open none, so one spans the whole call (a pipeline's own context takes over inside).
        with transformer.cache_context("go_fast"):
            yield
    finally:
        transformer.disable_cache()
