"""LoRA adapters per request: loaded on first use, a bounded LRU kept on the replica.

The adapters of one pipeline call are the call shape's ``adapters`` (the batcher only puts
work with the same adapters and scales in one call). Before each call ``activate`` makes
exactly those adapters active at their scales with diffusers' ``set_adapters``, or turns
LoRA off for a call without any, so an adapter never touches another request's image.
The pipelines of a ``PipelineSet`` share their modules, so activating on the
text-to-image pipeline serves the image modes too.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from deployments.weights import resolve_source

logger = logging.getLogger("ray.serve")


class AdapterLoadError(RuntimeError):
    """A configured adapter could not be loaded (missing folder, wrong family, broken file)."""


class AdapterCache:
    """The adapters loaded into one pipeline, least recently used evicted past ``capacity``."""

    def __init__(self, pipe: Any, registry: Mapping[str, Any], capacity: int, cache_dir: Path) -> None:
        self._pipe = pipe
        self._registry = registry  # name -> LoraAdapterConfig
        self._capacity = capacity
        self._cache_dir = Path(cache_dir)
        self._loaded: OrderedDict[str, None] = OrderedDict()
        self._lora_on = False

    @property
    def loaded(self) -> list[str]:
        """Loaded adapters, least recently used first."""
        return list(self._loaded)

    def activate(self, adapters: Sequence[tuple[str, float]]) -> None:
        """Make exactly ``adapters`` (name, scale) active for the next call."""
        if not adapters:
            if self._lora_on:
                self._pipe.disable_lora()
                self._lora_on = False
            return
        names = [name for name, _ in adapters]
        for name in names:
            self._ensure_loaded(name, keep=names)
        self._pipe.enable_lora()
        self._pipe.set_adapters(names, adapter_weights=[float(scale) for _, scale in adapters])
        self._lora_on = True

    def _ensure_loaded(self, name: str, keep: Sequence[str]) -> None:
        if name in self._loaded:
            self._loaded.move_to_end(name)
            return
        # Evict the least recently used adapters the coming call does not need; a call that
        # needs more than ``capacity`` adapters still gets them all.
        for victim in [n for n in self._loaded if n not in keep]:
            if len(self._loaded) < self._capacity:
                break
            self._pipe.delete_adapters(victim)
            del self._loaded[victim]
            logger.info("LoRA %s unloaded (least recently used)", victim)
        adapter = self._registry[name]
        source = resolve_source(adapter.source, self._cache_dir)  # builtin:<name>: built on first use
        kwargs = {} if adapter.weight_name is None else {"weight_name": adapter.weight_name}
        try:
            self._pipe.load_lora_weights(source, adapter_name=name, **kwargs)
        except (OSError, ValueError) as exc:
            raise AdapterLoadError(f"cannot load LoRA {name!r} from {adapter.source!r}: {exc}") from exc
        self._loaded[name] = None
        logger.info("LoRA %s loaded", name)
