"""Speed-ups a replica applies once to its loaded pipelines (``ModelConfig.optimisations``).

Each is switched by config and none changes the images beyond float rounding:

- ``attention``: the attention kernel of the UNet / transformer and the VAE (diffusers picks
  SDPA on torch 2; ``math`` is the plain matmul-softmax baseline, ``flash`` restricts SDPA to
  its flash kernel).
- ``channels_last``: NHWC weights for the convolutional models (UNet, 2-D VAE), which cuDNN
  runs faster in half precision.
- ``fp16_vae``: an fp16-safe VAE in place of SDXL's, which must otherwise be upcast to float32
  for every decode.
- ``compile``: ``torch.compile`` of the denoiser with static shapes. Compiling happens in the
  replica's warm-up, over the configured sizes x images per call; afterwards a call of a shape
  that was not warmed runs the uncompiled denoiser, so no request ever waits for a compile.
  So does a call that changes the denoiser per request (LoRA adapters, go_fast's cache hooks:
  ``compile_scope``), and the request path never traces: a warmed graph whose guards no longer
  hold runs uncompiled too.

``apply_optimisations`` sets them; ``warm_up`` runs the warm-up generations through the
ordinary runner. Kept apart from the per-request speed mode (``go_fast``), which changes the
math of a call; these never do.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from deployments.speed_mode import caches
from deployments.weights import PipelineLoadError
from serve_app.config import CUDA_GRAPH_COMPILE_MODES, GoFastConfig, ModelConfig, Optimisations
from serve_app.work import CallShape

if TYPE_CHECKING:
    from deployments.pipeline_loader import PipelineSet

logger = logging.getLogger(__name__)

DENOISER_NAMES = ("unet", "transformer")
WARM_UP_PROMPT = "a photograph of a lighthouse on a cliff at dusk"


@dataclass
class Applied:
    """What ``apply_optimisations`` did, for logs and benchmarks."""

    attention: str = "default"
    channels_last: list[str] = field(default_factory=list)
    fp16_vae: str | None = None
    compiled: BucketedCompile | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "attention": self.attention,
            "channels_last": list(self.channels_last),
            "fp16_vae": self.fp16_vae,
            "compiled_buckets": None if self.compiled is None else len(self.compiled.warmed),
        }


def denoiser_of(pipe: Any) -> Any:
    for name in DENOISER_NAMES:
        module = getattr(pipe, name, None)
        if module is not None:
            return module
    raise ValueError(f"{type(pipe).__name__} has no unet or transformer")


def apply_optimisations(pipelines: PipelineSet, options: Optimisations, dtype: str) -> Applied:
    """Apply ``options`` to the loaded pipelines in place (all modes share the same modules)."""
    import torch

    pipe = pipelines.text_to_image
    applied = Applied()
    if options.fp16_vae is not None:
        _swap_vae(pipelines, options.fp16_vae, getattr(torch, dtype))
        applied.fp16_vae = options.fp16_vae
    if options.attention != "default":
        set_attention(denoiser_of(pipe), options.attention)
        # The VAE's attention has one 512-wide head, more than the flash kernel takes.
        set_attention(pipe.vae, "sdpa" if options.attention == "flash" else options.attention)
        applied.attention = options.attention
    if options.channels_last:
        for name in ("unet", "vae"):
            module = getattr(pipe, name, None)
            if module is not None and _has_conv2d(module):
                to_channels_last(module)
                applied.channels_last.append(name)
    if options.compile is not None:
        applied.compiled = BucketedCompile(denoiser_of(pipe), options.compile.mode, options.compile.backend)
    logger.info("optimisations applied: %s", applied.describe())
    return applied


# --- attention ----------------------------------------------------------------------------

# diffusers' attention-dispatch backends (transformer models: FLUX, Qwen-Image).
_DISPATCH_BACKENDS = {"math": "_native_math", "sdpa": "native", "flash": "_native_flash"}


def set_attention(module: Any, choice: str) -> None:
    """Use ``choice`` ("math" | "sdpa" | "flash") for every attention layer of ``module``."""
    processors = list(module.attn_processors.values()) if hasattr(module, "attn_processors") else []
    if not processors:
        return
    if all(hasattr(p, "_attention_backend") for p in processors):
        # Transformer processors call diffusers' dispatcher: choose its backend.
        for proc in processors:
            proc._attention_backend = _DISPATCH_BACKENDS[choice]
        return
    # UNet / VAE processors call torch directly: choose the processor class.
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    processor = {"math": AttnProcessor, "sdpa": AttnProcessor2_0, "flash": FlashSDPAProcessor}[choice]()
    module.set_attn_processor(processor)


def FlashSDPAProcessor() -> Any:
    """An SDPA processor limited to the flash kernel: it fails loudly where flash cannot run
    rather than falling back to a slower kernel unnoticed."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    class _FlashSDPAProcessor(AttnProcessor2_0):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                return super().__call__(*args, **kwargs)

    return _FlashSDPAProcessor()


def attention_kind(module: Any) -> set[str]:
    """The attention implementations ``module`` uses now (class names or dispatch backends)."""
    kinds = set()
    for proc in getattr(module, "attn_processors", {}).values():
        backend = getattr(proc, "_attention_backend", None)
        kinds.add(str(getattr(backend, "value", backend)) if backend is not None else type(proc).__name__)
    return kinds


# --- channels_last, VAE -----------------------------------------------------------------------


def _has_conv2d(module: Any) -> bool:
    import torch

    return any(isinstance(m, torch.nn.Conv2d) for m in module.modules())


def to_channels_last(module: Any) -> None:
    """NHWC layout for every 4-D weight (conv kernels); the convs then keep activations NHWC."""
    import torch

    with torch.no_grad():
        for param in module.parameters():
            if param.dim() == 4:
                param.data = param.data.contiguous(memory_format=torch.channels_last)


def _swap_vae(pipelines: PipelineSet, source: str, torch_dtype: Any) -> None:
    from diffusers import AutoencoderKL

    pipe = pipelines.text_to_image
    try:
        vae = AutoencoderKL.from_pretrained(source, torch_dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        raise PipelineLoadError(f"cannot load optimisations.fp16_vae {source!r}: {exc}") from exc
    vae = vae.to(pipe.vae.device)
    # The point of this VAE: it decodes in float16 without overflowing, so no upcast.
    vae.register_to_config(force_upcast=False)
    for each in pipelines.pipelines.values():
        each.register_modules(vae=vae)


# --- torch.compile with bucketed shapes -----------------------------------------------------


def call_signature(value: Any) -> Any:
    """A hashable key of a call's arguments as torch.compile guards them with static shapes:
    tensors by shape, dtype and device; Python scalars by value."""
    import torch

    if isinstance(value, torch.Tensor):
        return ("T", tuple(value.shape), str(value.dtype), str(value.device))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(call_signature(v) for v in value))
    if isinstance(value, dict):
        return ("D", tuple(sorted((k, call_signature(v)) for k, v in value.items())))
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return type(value).__name__


class BucketedCompile:
    """Routes a denoiser's calls to a ``torch.compile``d forward for warmed shapes only.

    The module keeps its identity (pipelines read its config, dtype and device); its
    ``forward`` is replaced by a dispatcher. While ``warming()``, every call goes through the
    compiled forward and its shape is recorded; afterwards only recorded shapes do, the rest
    run the original forward, so a new request shape never compiles on the request path.
    Inside ``uncompiled()`` every call runs the original forward.
    """

    def __init__(self, module: Any, mode: str = "default", backend: str = "inductor") -> None:
        import torch

        self.module = module
        self.mode = mode
        self.cuda_graphs = backend == "inductor" and mode in CUDA_GRAPH_COMPILE_MODES
        self.original_forward = module.forward
        # Modes are inductor options; the tracing-only backends take none.
        options = {"mode": mode} if backend == "inductor" else {}
        self.compiled_forward = torch.compile(self.original_forward, backend=backend, dynamic=False, **options)
        self.warmed: set[Any] = set()
        self.calls = {"compiled": 0, "eager": 0}
        self._warming = False
        self._uncompiled = False
        self._lock = threading.Lock()
        module.forward = self._dispatch
        module._bucketed_compile = self  # found by tests and benchmarks

    def _dispatch(self, *args: Any, **kwargs: Any) -> Any:
        key = call_signature((args, kwargs))
        if self._warming:
            self.warmed.add(key)
        elif self._uncompiled or key not in self.warmed:
            self.calls["eager"] += 1
            return self.original_forward(*args, **kwargs)
        self.calls["compiled"] += 1
        if not self.cuda_graphs:
            return self._run_compiled(args, kwargs)
        import torch

        # The denoiser cannot tell where a scheduler step begins (true CFG, as Qwen-Image runs
        # it, makes two calls per step), so every call marks a new step and its outputs are
        # copied out of the graph pool: the next replay may reuse that memory while the
        # pipeline still holds this output (one latent-sized copy per call).
        torch.compiler.cudagraph_mark_step_begin()
        return clone_tensors(self._run_compiled(args, kwargs))

    def _run_compiled(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        import torch

        if self._warming:
            return self.compiled_forward(*args, **kwargs)
        # A request never traces. Where a warmed graph's guards no longer hold, because the
        # module changed since the warm-up (once a LoRA is loaded, peft's layers wrap the
        # denoiser's linears, even while LoRA is off), dynamo runs the original forward.
        with torch.compiler.set_stance("eager_on_recompile"):
            return self.compiled_forward(*args, **kwargs)

    def remove(self) -> None:
        """Give the module back its own forward (the compiled code is dropped)."""
        self.module.forward = self.original_forward
        del self.module._bucketed_compile

    @contextlib.contextmanager
    def uncompiled(self) -> Iterator[None]:
        """Every denoiser call inside this block runs the original forward."""
        self._uncompiled = True
        try:
            yield
        finally:
            self._uncompiled = False

    @contextlib.contextmanager
    def warming(self) -> Iterator[None]:
        """Compile (and record) every shape the denoiser is called with inside this block."""
        import torch

        with self._lock:
            self._warming = True
            try:
                # Room for one graph per bucket, or dynamo would fall back to eager silently.
                limit = max(torch._dynamo.config.recompile_limit, 4 * len(self.warmed) + 64)
                torch._dynamo.config.recompile_limit = limit
                torch._dynamo.config.accumulated_recompile_limit = max(
                    torch._dynamo.config.accumulated_recompile_limit, limit
                )
                yield
            finally:
                self._warming = False


def clone_tensors(output: Any) -> Any:
    """``output`` with every tensor in it copied (tuples, lists, dicts and diffusers' output
    classes, which diffusers registers with torch's pytree)."""
    import torch
    from torch.utils._pytree import tree_map_only

    return tree_map_only(torch.Tensor, torch.Tensor.clone, output)


def compiled_of(module: Any) -> BucketedCompile | None:
    return getattr(module, "_bucketed_compile", None)


@contextlib.contextmanager
def compile_scope(pipelines: PipelineSet, shape: CallShape, go_fast: GoFastConfig) -> Iterator[None]:
    """Around one request's pipeline call: the compiled denoiser serves only a call that runs
    the denoiser as warmed. A call with LoRA adapters (peft layers, their scales) or go_fast's
    cache (hooks on the transformer's blocks) runs the uncompiled denoiser, as an unwarmed
    shape does: a graph for them would be traced on the request path, and one traced without
    them would give another image."""
    optimisations = pipelines.optimisations
    compiled = optimisations.compiled if optimisations is not None else None
    if compiled is None or not (shape.adapters or caches(go_fast, shape)):
        yield
        return
    with compiled.uncompiled():
        yield


# --- warm-up -------------------------------------------------------------------------------


def warm_up_calls(model: ModelConfig) -> list[tuple[CallShape, int]]:
    """The (shape, images) calls a replica runs before traffic.

    Without compile: one image at the default size and the fewest steps (a replica that
    cannot generate fails its start, not its first request). With compile: every configured
    size x images per call, at the default guidance (classifier-free guidance doubles the
    denoiser's batch, so guidance is part of the compiled shape) and two steps (the second
    step's inputs are where a scheduler's dtypes settle).
    """
    width, height = (int(side) for side in model.defaults.size.split("x"))
    compile_options = model.optimisations.compile
    if compile_options is None:
        shape = CallShape(
            width=width,
            height=height,
            steps=model.min_steps,
            guidance=0.0,
            with_negative_prompt=False,
            mode=model.rules.base_mode,  # an edit-only family warms up on an edit
        )
        return [(shape, 1)]
    calls = []
    for size in compile_options.sizes or [model.defaults.size]:
        w, h = (int(side) for side in size.split("x"))
        limit = model.batching.images_per_call(w, h)
        counts = compile_options.batch_sizes or _powers_of_two(limit)
        steps = max(model.min_steps, 2)
        shape = CallShape(
            width=w,
            height=h,
            steps=steps,
            guidance=model.defaults.guidance,
            with_negative_prompt=False,
            mode=model.rules.base_mode,
        )
        calls.extend((shape, n) for n in sorted(set(counts)) if n <= limit)
    return calls


def _powers_of_two(limit: int) -> list[int]:
    counts, n = [], 1
    while n <= limit:
        counts.append(n)
        n *= 2
    return counts


def warm_up(
    pipelines: PipelineSet, model: ModelConfig, run: Callable[[CallShape, list[str], list[int]], Any]
) -> list[tuple[CallShape, int]]:
    """Run the warm-up calls through ``run(shape, prompts, seeds)`` (the replica's runner),
    compiling the denoiser for each when compile is on. Returns the calls run."""
    calls = warm_up_calls(model)
    compiled = pipelines.optimisations.compiled if pipelines.optimisations is not None else None
    context = compiled.warming() if compiled is not None else contextlib.nullcontext()
    with context:
        for shape, n in calls:
            run(shape, [WARM_UP_PROMPT] * n, list(range(n)))
    if compiled is not None:
        logger.info("model %s: denoiser compiled for %d shapes", model.id, len(compiled.warmed))
    return calls
