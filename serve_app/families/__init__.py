"""The model families this service can serve, by name.

Adding a family: one module beside this file (a ``Family`` subclass; see ``base.py`` and
``sdxl.py``), one line in ``FAMILIES`` below, and its tests.
"""

from __future__ import annotations

from serve_app.families.base import Family, GuidanceKind
from serve_app.families.flux import Flux
from serve_app.families.qwen_image import QwenImage
from serve_app.families.qwen_image_edit import QwenImageEdit
from serve_app.families.sdxl import SDXL

FAMILIES: dict[str, Family] = {family.name: family for family in (SDXL(), QwenImage(), Flux(), QwenImageEdit())}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; expected one of {sorted(FAMILIES)}") from None


__all__ = ["FAMILIES", "Family", "GuidanceKind", "get_family"]
