"""What every model family module provides.

A family (SDXL, Qwen-Image, FLUX.1, ...) is one module holding everything that differs
between families: its diffusers pipeline classes per mode, its size multiple and minimum
steps, what guidance means and whether it takes a negative prompt, how a pipeline call's
arguments are built, fixes applied after loading, and the name of its built-in tiny model
(whose builder is no part of the product: ``builtin_models/<family>.py``). The ingress
reads only the plain attributes and the request checks; the pipeline side imports torch and
diffusers inside the methods that need them, so importing a family module stays cheap.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar

from serve_app.errors import InvalidRequest
from serve_app.go_fast import GoFastConfig
from serve_app.work import CallShape, Mode

if TYPE_CHECKING:
    from serve_app.config import ModelConfig


class GuidanceKind(str, Enum):
    CLASSIFIER_FREE = "classifier-free"  # SDXL: a second, unconditional (or negative) pass
    TRUE_CFG = "true-cfg"  # Qwen-Image: CFG against a negative prompt (blank when none)
    DISTILLED = "distilled"  # FLUX.1: a guidance value fed to the model; no second pass


class Family:
    """One model family's rules. Subclasses set the class attributes and override the hooks."""

    name: ClassVar[str]
    # Sides must be multiples of this: the VAE's downsampling times any latent patching.
    size_multiple: ClassVar[int]
    # Fewest denoising steps the pipeline produces an image with.
    min_steps: ClassVar[int] = 1
    guidance: ClassVar[GuidanceKind]
    takes_negative_prompt: ClassVar[bool] = True
    # Input images one edit can use (image-to-image and inpainting take one; a multi-reference
    # edit family, Mode.EDIT, several).
    max_reference_images: ClassVar[int] = 1
    # diffusers pipeline class per mode; the other modes are built from the ``base_mode``
    # pipeline's loaded components (``from_pipe``), so they cost no second copy of the weights.
    pipeline_classes: ClassVar[Mapping[Mode, str]]
    # The mode whose pipeline is loaded from the weights (the others are made from it).
    base_mode: ClassVar[Mode] = Mode.TEXT_TO_IMAGE
    # Most images one pipeline call may make (None: as many as the batching config allows);
    # diffusers' QwenImageEditPlusPipeline takes one prompt per call.
    max_images_per_call: ClassVar[int | None] = None
    # model_index.json "_class_name" prefix of this family's saved pipelines.
    class_name_prefix: ClassVar[str]
    # The name of the built-in tiny model (``builtin:<name>``); its builder is no part of the
    # product: ``builtin_models/<family>.py``, registered in ``builtin_models/__init__.py``.
    tiny_model: ClassVar[str]
    # Whether the pipeline decodes with the VAE upcast to float32 when run in float16 (SDXL's
    # VAE overflows in float16), so that an fp16-safe VAE (optimisations.fp16_vae) pays.
    vae_upcast_in_float16: ClassVar[bool] = False
    # Whether the denoiser is a diffusers transformer with caching hooks (CacheMixin), and
    # the attribute of the pipeline that holds the denoiser (the LoRA target).
    transformer_cache: ClassVar[bool] = False
    denoiser: ClassVar[str] = "transformer"
    # The pipeline's tokenizer attributes a request's ``usage.text_tokens`` is counted with
    # (the largest count wins): those of the encoders whose token sequence the denoiser reads.
    text_tokenizers: ClassVar[tuple[str, ...]] = ("tokenizer",)

    @property
    def default_go_fast(self) -> GoFastConfig:
        """What ``go_fast: true`` does on this family unless a model's config says otherwise."""
        return GoFastConfig()

    # --- the ingress side: plain Python ---------------------------------------------------

    def check_model(self, model: ModelConfig) -> None:
        """Config rules of this family beyond the generic ones; raise ValueError."""
        for name, steps in [("defaults.steps", model.defaults.steps), *model.quality_steps_set()]:
            if steps < self.min_steps:
                raise ValueError(f"{name} is {steps}: a {self.name} model needs at least {self.min_steps}")

    def check_guidance(self, model: ModelConfig, guidance: float, requested: bool, negative_prompt: str | None) -> None:
        """Refuse a guidance / negative prompt combination this family cannot honour.

        ``requested`` says whether the client sent ``guidance`` (else it is the model's default).
        """
        if negative_prompt is not None and guidance <= 1:
            # CFG pipelines skip the unconditional pass at guidance <= 1: the negative prompt
            # would be silently ignored.
            raise InvalidRequest(
                "Invalid 'negative_prompt': it only has an effect with guidance above 1.", param="negative_prompt"
            )

    def denoising_steps(self, steps: int, strength: float) -> int:
        """Steps an image-to-image call really runs at ``strength`` (diffusers' get_timesteps)."""
        # Flow-match image-to-image pipelines: t_start = int(steps - steps * strength).
        return steps - int(max(steps - steps * strength, 0))

    # --- the pipeline side: torch and diffusers imported inside -----------------------------

    def call_arguments(
        self, shape: CallShape, prompts: list[str], negative_prompts: list[str] | None
    ) -> dict[str, Any]:
        """Family-specific keyword arguments of one pipeline call (prompts, guidance)."""
        raise NotImplementedError

    def preview_latents(self, pipe: Any, latents: Any, height: int, width: int) -> Any:
        """The latents a step callback sees (``callback_kwargs["latents"]``) as
        [B, C, height / 8, width / 8] in the VAE's pipeline space, for previews
        (``deployments.previews``): families that pack latent patches unpack them here."""
        raise NotImplementedError

    def prompt_token_limit(self, tokenizer: Any, shape: CallShape) -> int | None:
        """The most tokens of a prompt's own text that ``tokenizer``'s encoder reads in a call
        of ``shape`` (the pipeline truncates the rest); None: no limit."""
        return None

    def count_text_tokens(self, pipe: Any, shape: CallShape, text: str) -> int:
        """``text``'s tokens as a response's ``usage`` reports them (serve_app/usage.py): under
        each of ``text_tokenizers``, without special tokens, padding or prompt template, at
        most ``prompt_token_limit``; the largest of those counts."""
        counts = [0]
        for attribute in self.text_tokenizers:
            tokenizer = getattr(pipe, attribute, None)
            if tokenizer is None:
                continue
            limit = self.prompt_token_limit(tokenizer, shape)
            bounds = {"verbose": False} if limit is None else {"truncation": True, "max_length": limit}
            counts.append(len(tokenizer(text, add_special_tokens=False, **bounds)["input_ids"]))
        return max(counts)

    def load_components(self, source: str) -> dict[str, Any]:
        """Components to pass to the base pipeline's ``from_pretrained`` instead of loading
        them from ``source`` (a folder or hub id): none, unless a family's own loader is needed."""
        return {}

    def call_scope(self, pipe: Any) -> contextlib.AbstractContextManager[None]:
        """A context around one call of ``pipe`` (a family whose pipeline reads settings that
        diffusers keeps at module level sets them here)."""
        return contextlib.nullcontext()

    def after_load(self, pipe: Any, model: ModelConfig | None) -> None:
        """Fixes and checks once the text-to-image pipeline is loaded (``model`` is None
        when loaded outside a served model, e.g. in a benchmark)."""

    def pipeline_class(self, mode: Mode) -> type:
        import diffusers

        return getattr(diffusers, self.pipeline_classes[mode])
