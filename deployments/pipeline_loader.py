"""Load a model family's diffusers pipelines from built-in, local or hub weights."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deployments.weights import PipelineLoadError, is_builtin, resolve_source
from serve_app.families import Family, get_family
from serve_app.work import Mode

logger = logging.getLogger(__name__)

DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class PipelineSet:
    """A family's pipelines, one per mode, all on the same loaded components: the image
    modes are made with ``from_pipe``, which shares the text-to-image pipeline's modules, so
    image-to-image and inpainting cost no second copy of the weights."""

    family: Family
    pipelines: dict[Mode, Any]
    # What deployments.optimisations applied (None: loaded without a served model's config).
    optimisations: Any = None

    def __getitem__(self, mode: Mode) -> Any:
        return self.pipelines[mode]

    @property
    def text_to_image(self) -> Any:
        """The pipeline loaded from the weights, whose modules the others share: text-to-image,
        or the family's ``base_mode`` (a multi-reference edit family has no text-to-image)."""
        return self.pipelines[self.family.base_mode]


def _torch_dtype(dtype: str):
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {list(DTYPES)}")
    return getattr(torch, dtype)


def resolve_weights(family: Family, weights: str, cache_dir: Path) -> str:
    """Turn a ``weights`` setting into what ``from_pretrained`` takes: a folder or a hub id."""
    if is_builtin(weights):  # a built-in tiny model of this family (deployments.weights)
        return resolve_source(weights, cache_dir, family=family.name)
    path = Path(weights).expanduser()
    if path.exists():
        index = path / "model_index.json"
        if not index.is_file():
            raise PipelineLoadError(f"weights folder {str(path)!r} has no model_index.json")
        try:
            class_name = json.loads(index.read_text()).get("_class_name", "")
        except (OSError, ValueError) as exc:
            raise PipelineLoadError(f"cannot read {str(index)!r}: {exc}") from exc
        if not str(class_name).startswith(family.class_name_prefix):
            raise ValueError(f"weights folder {str(path)!r} holds a {class_name!r}, not a {family.name!r} pipeline")
        return str(path)
    if weights.startswith(("/", "./", "../", "~")) or weights.count("/") > 1:
        raise PipelineLoadError(f"weights folder {weights!r} does not exist")
    return weights  # a hub id such as "stabilityai/stable-diffusion-xl-base-1.0"


def disable_progress_bars() -> None:
    """Turn off the tqdm bars diffusers and transformers draw while loading (process-wide)."""
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def load_pipelines(
    family: str, weights: str, device: str, dtype: str, cache_dir: Path, model: Any = None
) -> PipelineSet:
    """Load the pipelines of ``family`` from ``weights``.

    ``weights`` is ``builtin:<name>`` (a tiny model built on first use under ``cache_dir``),
    a local folder in diffusers layout, or a hub id. The pipelines are moved to ``device``
    in ``dtype`` ("float32" | "float16" | "bfloat16") with progress bars off; ``model`` (the
    served ``ModelConfig``, if any) is checked against the loaded weights by the family, and its
    ``optimisations`` are applied (``deployments.optimisations``).
    """
    rules = get_family(family)
    pipeline_class = rules.pipeline_class(rules.base_mode)
    torch_dtype = _torch_dtype(dtype)
    disable_progress_bars()
    # "modules that should be kept in float32: []", on load and again on every image-to-image
    # call that upcasts the VAE: noise in the replica's log, never actionable there.
    logging.getLogger("diffusers.models.modeling_utils").setLevel(logging.ERROR)
    source = resolve_weights(rules, weights, cache_dir)
    try:
        overrides = rules.load_components(source)
        pipe = pipeline_class.from_pretrained(source, dtype=torch_dtype, **overrides)  # diffusers >= 0.42 name
    except (OSError, ValueError) as exc:
        # diffusers raises OSError/ValueError for unknown ids, offline hubs and broken folders;
        # keep its message (it names what is missing) but say which setting caused it.
        raise PipelineLoadError(f"cannot load {family} weights {weights!r}: {exc}") from exc
    if type(pipe) is not pipeline_class:
        raise ValueError(f"weights {weights!r} hold a {type(pipe).__name__}, not a {pipeline_class.__name__}")
    pipelines = assemble_pipelines(rules, pipe.to(device), model)
    if model is not None:
        from deployments.optimisations import apply_optimisations

        pipelines.optimisations = apply_optimisations(pipelines, model.optimisations, dtype)
    return pipelines


def assemble_pipelines(rules: Family, pipe: Any, model: Any = None) -> PipelineSet:
    """The family's pipeline for each mode around a loaded text-to-image ``pipe``, with the
    family's fixes applied and progress bars and prompt-echoing warnings off."""
    pipelines = {rules.base_mode: pipe}
    for mode in rules.pipeline_classes:
        if mode is not rules.base_mode:
            pipelines[mode] = rules.pipeline_class(mode).from_pipe(pipe)
    for each in pipelines.values():
        rules.after_load(each, model)
        each.set_progress_bar_config(disable=True)
        # SDXL warns on every call whose prompt CLIP truncates, echoing the cut-off prompt text
        # (and, in a batch, pages of padding tokens). User prompts do not belong in replica logs.
        logging.getLogger(type(each).__module__).setLevel(logging.ERROR)
    return PipelineSet(family=rules, pipelines=pipelines)
