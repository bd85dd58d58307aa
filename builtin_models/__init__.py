"""The built-in tiny models, and the resolver of ``builtin:<name>``.

No part of the product: the tiny models let the service (and its tests) run end to end on a
CPU with no weights to download. Each is a real model of the real class (a diffusers
pipeline, a LoRA, a safety checker, a causal LM) with every component shrunk to a few hundred
thousand parameters, initialised from fixed seeds and, where it matters, briefly fitted
(``vae_fit``: VAEs that reconstruct; ``safety_checker``: a checker that flags one pattern).
A built-in model is materialised once into ``<cache_dir>/<name>-<BUILTIN_VERSION>/`` and then
loaded with the ordinary ``from_pretrained``, exactly like a local folder of real weights.

Production code reaches this package through ``ensure_builtin_model`` only, called from
``deployments.weights`` (``tests/test_import_graph.py`` checks that, and that no import
cycle forms).

Adding a family: its builder module here (``<family>.py`` with ``build(work)``; copy
``sdxl.py``) and one line in ``FAMILY_BUILDERS``; its tiny LoRA comes with it.

Bump ``BUILTIN_VERSION`` whenever a builder changes, so old folders are not reused.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from builtin_models import flux, lora, prompt_enhancer, qwen_image, qwen_image_edit, safety_checker, sdxl
from serve_app.families import get_family

BUILTIN_VERSION = "v3"

# A family's name (serve_app.families) and the builder of its tiny model, named by the
# family's ``tiny_model``: one line per family.
FAMILY_BUILDERS: dict[str, Callable[[Path], None]] = {
    "sdxl": sdxl.build,
    "qwen-image": qwen_image.build,
    "flux": flux.build,
    "qwen-image-edit": qwen_image_edit.build,
}


@dataclass(frozen=True)
class BuiltinModel:
    family: str | None  # None: not a pipeline (a LoRA, a safety checker, a prompt enhancer)
    build: Callable[[Path], None]


def _tiny_lora(family: str, base_model: str) -> Callable[[Path], None]:
    def build(work: Path) -> None:
        # ``work`` is a temporary folder inside the cache: the base model lives beside it.
        lora.build(family, ensure_builtin_model(base_model, work.parent), work)

    return build


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    get_family(family).tiny_model: BuiltinModel(family=family, build=build) for family, build in FAMILY_BUILDERS.items()
}
# A tiny LoRA per family (``builtin:tiny-sdxl-lora``, ...), and the optional stages' models.
BUILTIN_MODELS.update(
    {
        f"{get_family(family).tiny_model}-lora": BuiltinModel(
            family=None, build=_tiny_lora(family, get_family(family).tiny_model)
        )
        for family in FAMILY_BUILDERS
    }
)
BUILTIN_MODELS["tiny-safety-checker"] = BuiltinModel(family=None, build=safety_checker.build)
BUILTIN_MODELS["tiny-enhancer"] = BuiltinModel(family=None, build=prompt_enhancer.build)


def builtin_model_dir(name: str, cache_dir: Path) -> Path:
    return Path(cache_dir) / f"{name}-{BUILTIN_VERSION}"


def ensure_builtin_model(name: str, cache_dir: Path, *, family: str | None = None) -> Path:
    """Return the folder of built-in model ``name`` under ``cache_dir``, building it if needed.

    With ``family``, the model must be that family's pipeline (checked before building).
    The build writes into a temporary folder beside the target and renames it into place,
    so a folder that exists is always complete. When two processes race, the loser discards
    its build and uses the winner's folder.
    """
    try:
        model = BUILTIN_MODELS[name]
    except KeyError:
        known = ", ".join(f"builtin:{known}" for known in sorted(BUILTIN_MODELS))
        raise ValueError(f"unknown built-in model 'builtin:{name}'; known: {known}") from None
    if family is not None and model.family != family:
        raise ValueError(f"built-in model 'builtin:{name}' is a {model.family!r} model, not {family!r}")
    cache_dir = Path(cache_dir)
    target = builtin_model_dir(name, cache_dir)
    if (target / "model_index.json").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=cache_dir))
    try:
        import torch

        # Seeded init must neither depend on nor disturb the caller's global RNG state.
        with torch.random.fork_rng(devices=[]):
            model.build(work)
        os.chmod(work, 0o755)  # mkdtemp makes it owner-only; the cache may be shared
        try:
            os.rename(work, target)
        except OSError:
            if not (target / "model_index.json").is_file():
                raise
            # Another process won the race; its folder is complete. Ours goes away below.
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return target
