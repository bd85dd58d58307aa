"""Where weights come from: ``builtin:<name>``, a local folder or a hub id.

A ``builtin:<name>`` setting (a model's ``weights``, a LoRA's ``source``, the safety
checker's and the prompt enhancer's ``weights``) names one of the built-in tiny models,
which are no part of the product: they live in the ``builtin_models`` package, and this
module is the one place production code reaches it (``resolve_source``; the package's
resolver builds a tiny model on first use under the model cache and returns its folder).
Anything else is handed to ``from_pretrained`` as it is, a folder or a hub id.
"""

from __future__ import annotations

from pathlib import Path

BUILTIN_PREFIX = "builtin:"


class PipelineLoadError(RuntimeError):
    """The weights could not be loaded (missing folder, unreachable hub, broken files)."""


def is_builtin(source: str) -> bool:
    return source.startswith(BUILTIN_PREFIX)


def resolve_source(source: str, cache_dir: Path | str, *, family: str | None = None) -> str:
    """``source`` as ``from_pretrained`` takes it: ``builtin:<name>`` becomes the folder of
    that built-in model under ``cache_dir`` (built on first use; with ``family``, it must be
    a pipeline of that family); any other source is returned unchanged."""
    if not is_builtin(source):
        return source
    from builtin_models import ensure_builtin_model

    return str(ensure_builtin_model(source[len(BUILTIN_PREFIX) :], Path(cache_dir), family=family))
