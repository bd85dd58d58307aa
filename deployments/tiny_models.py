"""Built-in tiny models, materialised into the model cache.

Each family module builds its own tiny model (``Family.build_tiny``, from the parts in
``serve_app.families.tiny_parts``): a real diffusers pipeline of the real class with every
component shrunk to a few hundred thousand parameters, initialised from fixed seeds, its VAE
fitted to reconstruct images. A built-in model is materialised once into
``<cache_dir>/<name>-<BUILTIN_VERSION>/`` with ``save_pretrained`` and then loaded with the
ordinary ``from_pretrained`` of its pipeline class, exactly like a local folder of real
weights.

Bump ``BUILTIN_VERSION`` whenever a builder changes, so old folders are not reused.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from serve_app.families import FAMILIES

BUILTIN_VERSION = "v3"


@dataclass(frozen=True)
class BuiltinModel:
    family: str | None  # None: not a pipeline (a LoRA, a safety checker, a prompt enhancer)
    build: Callable[[Path], None]


def _tiny_lora(family: str, base_model: str) -> Callable[[Path], None]:
    def build(work: Path) -> None:
        from deployments.adapters import build_tiny_lora

        # ``work`` is a temporary folder inside the cache: the base model lives beside it.
        build_tiny_lora(family, ensure_builtin_model(base_model, work.parent), work)

    return build


def _tiny_safety_checker(work: Path) -> None:
    from deployments.safety_checker import build_tiny_safety_checker

    build_tiny_safety_checker(work)


def _tiny_enhancer(work: Path) -> None:
    from deployments.prompt_enhancer import build_tiny_enhancer

    build_tiny_enhancer(work)


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    family.tiny_model: BuiltinModel(family=family.name, build=family.build_tiny) for family in FAMILIES.values()
}
# A tiny LoRA per family (``builtin:tiny-sdxl-lora``, ...), and the optional stages' models.
BUILTIN_MODELS.update(
    {
        f"{family.tiny_model}-lora": BuiltinModel(family=None, build=_tiny_lora(family.name, family.tiny_model))
        for family in FAMILIES.values()
    }
)
BUILTIN_MODELS["tiny-safety-checker"] = BuiltinModel(family=None, build=_tiny_safety_checker)
BUILTIN_MODELS["tiny-enhancer"] = BuiltinModel(family=None, build=_tiny_enhancer)


def builtin_model_dir(name: str, cache_dir: Path) -> Path:
    return Path(cache_dir) / f"{name}-{BUILTIN_VERSION}"


def ensure_builtin_model(name: str, cache_dir: Path) -> Path:
    """Return the folder of built-in model ``name`` under ``cache_dir``, building it if needed.

    The build writes into a temporary folder beside the target and renames it into place,
    so a folder that exists is always complete. When two processes race, the loser discards
    its build and uses the winner's folder.
    """
    try:
        model = BUILTIN_MODELS[name]
    except KeyError:
        raise ValueError(f"unknown built-in model {name!r}; known: {sorted(BUILTIN_MODELS)}") from None
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
