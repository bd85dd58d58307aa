"""Typed application config: the ``args:`` of serve_config.yaml.

One pydantic model validates the whole tree at startup, so a bad config fails before any
replica starts, with pydantic's message naming the field (``models.0.limits.max_steps``).
"""

from __future__ import annotations

import os
import re
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve_app.families import FAMILIES, Family, get_family
from serve_app.go_fast import GoFastConfig
from serve_app.work import OUTPUT_FORMATS

# ASCII digits only (\d also matches other scripts' digits), matched whole with fullmatch
# ("$" would accept a trailing newline).
SIZE_PATTERN = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")

# Price per image is stored in exact integer units: one credit is a million units.
CREDIT_UNITS = 1_000_000


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelDefaults(StrictModel):
    size: str = "1024x1024"
    steps: int = Field(30, ge=1)
    guidance: float = Field(5.0, ge=0)
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_quality: int = Field(80, ge=0, le=100)
    strength: float = Field(
        0.8, gt=0, le=1, description="image-to-image strength when a request sends an image without one"
    )
    variation_strength: float = Field(
        0.7, gt=0, le=1, description="image-to-image strength of /v1/images/variations (empty prompt) unless sent"
    )
    response_format: Literal["b64_json", "url"] = Field(
        "b64_json",
        description="of a JSON answer whose request sends none (or null); url falls back to b64_json where the "
        "request cannot be given a URL (local storage without public_base_url, reached through a non-loopback "
        "address)",
    )

    @field_validator("size")
    @classmethod
    def _size_shape(cls, value: str) -> str:
        if not SIZE_PATTERN.fullmatch(value):
            raise ValueError(f"size must look like 1024x1024, got {value!r}")
        return value


class ModelLimits(StrictModel):
    max_pixels: int = Field(1024 * 1024, ge=64)
    min_side: int = Field(64, ge=8)
    max_side: int = Field(2048, ge=8)
    max_steps: int = Field(100, ge=1)
    max_n: int = Field(10, ge=1, le=10)
    max_prompt_chars: int = Field(4000, ge=1)
    max_input_image_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="encoded size of an input image or mask")
    max_input_image_pixels: int = Field(4096 * 4096, ge=64, description="decoded width x height of an input image")


class BatchingConfig(StrictModel):
    """Dynamic batching; both values can be changed at runtime through user_config."""

    max_batch_images: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.05, ge=0)
    batch_lane_grace_s: float = Field(
        0.1,
        ge=0,
        le=10,
        description="after a pipeline call that carried interactive work, how long the replica waits for the "
        "next interactive request before running Batch API work alone (deployments/coalescing.py)",
    )
    max_images_by_size: dict[str, int] = Field(
        default_factory=dict,
        max_length=32,
        description="a lower image limit for one pipeline call at a size (``1328x1328: 2``), chosen from the "
        "peak reserved memory bench/gpu_pipeline.py measures per batch size; other sizes use max_batch_images",
    )

    @field_validator("max_images_by_size")
    @classmethod
    def _sizes_and_limits(cls, limits: dict[str, int]) -> dict[str, int]:
        for size, limit in limits.items():
            if not SIZE_PATTERN.fullmatch(size):
                raise ValueError(f"max_images_by_size: size must look like 1024x1024, got {size!r}")
            if limit < 1:
                raise ValueError(f"max_images_by_size: {size} limit must be at least 1, got {limit}")
        return limits

    def images_per_call(self, width: int, height: int) -> int:
        """The most images one pipeline call at ``width`` x ``height`` may hold."""
        return min(self.max_batch_images, self.max_images_by_size.get(f"{width}x{height}", self.max_batch_images))


# torch.compile modes that capture CUDA graphs (static shapes, replayed without kernel launches).
CUDA_GRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")


class CompileOptions(StrictModel):
    """torch.compile of the denoiser (UNet / transformer), done at replica start.

    Shapes are static (``dynamic=False``): each size x images-per-call bucket is compiled
    during warm-up, and a call of any other shape runs the uncompiled denoiser (same images,
    slower) instead of recompiling in the request path.
    """

    mode: Literal["default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune"] = Field(
        "max-autotune-no-cudagraphs",
        description="reduce-overhead / max-autotune also capture CUDA graphs (CUDA only)",
    )
    backend: Literal["inductor", "aot_eager", "eager"] = Field(
        "inductor",
        description="torch.compile backend: inductor generates kernels; aot_eager / eager only trace (to "
        "tell a tracing problem from a code-generation one, and cheap where there is no compiler)",
    )
    sizes: list[str] = Field(
        default_factory=list, max_length=16, description="sizes compiled at start; default: defaults.size"
    )
    batch_sizes: list[int] = Field(
        default_factory=list,
        max_length=16,
        description="images per call compiled at start; default: powers of two up to the size's batch limit",
    )

    @field_validator("sizes")
    @classmethod
    def _size_shape(cls, sizes: list[str]) -> list[str]:
        for size in sizes:
            if not SIZE_PATTERN.fullmatch(size):
                raise ValueError(f"compile.sizes: size must look like 1024x1024, got {size!r}")
        return sizes

    @field_validator("batch_sizes")
    @classmethod
    def _positive(cls, counts: list[int]) -> list[int]:
        if any(count < 1 for count in counts):
            raise ValueError("compile.batch_sizes must be at least 1")
        return counts

    @property
    def cuda_graphs(self) -> bool:
        return self.mode in CUDA_GRAPH_COMPILE_MODES


class Optimisations(StrictModel):
    """Speed-ups applied once when a replica loads its pipelines (deployments/optimisations.py).

    Each one is off by default (the embedded CPU config); serve_config.gpu.yaml turns on the
    ones that pay on a GPU. None changes what an image looks like beyond float rounding.
    """

    attention: Literal["default", "math", "sdpa", "flash"] = Field(
        "default",
        description="default: as loaded (diffusers picks SDPA); math: plain matmul-softmax; sdpa: "
        "torch's scaled_dot_product_attention; flash: SDPA restricted to its flash kernel (CUDA only)",
    )
    channels_last: bool = Field(False, description="UNet and VAE weights and activations in NHWC layout")
    compile: CompileOptions | None = Field(None, description="torch.compile the denoiser; absent: eager")
    fp16_vae: str | None = Field(
        None,
        min_length=1,
        max_length=512,
        description="hub id or local folder of an fp16-safe VAE (madebyollin/sdxl-vae-fp16-fix) loaded in "
        "place of the pipeline's, so float16 decoding needs no float32 upcast",
    )


class QualitySteps(StrictModel):
    """OpenAI's quality names mapped to denoising steps (``None``: the model default)."""

    low: int | None = Field(None, ge=1)
    medium: int | None = Field(None, ge=1)
    high: int | None = Field(None, ge=1)


class DeploymentOptions(StrictModel):
    """Passed through to Ray Serve's ``.options()`` for the model deployment."""

    num_replicas: int | Literal["auto"] | None = None
    autoscaling_config: dict[str, Any] | None = None
    ray_actor_options: dict[str, Any] = Field(default_factory=lambda: {"num_cpus": 1})
    max_ongoing_requests: int = Field(16, ge=1)
    health_check_period_s: float | None = None
    graceful_shutdown_timeout_s: float | None = None

    @model_validator(mode="after")
    def _one_scaling_mode(self) -> DeploymentOptions:
        if self.autoscaling_config is not None and isinstance(self.num_replicas, int):
            raise ValueError("set either num_replicas or autoscaling_config, not both")
        return self


ADAPTER_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class LoraAdapterConfig(StrictModel):
    """One LoRA a request may name in ``lora_weights`` / ``extra_lora_weights``."""

    source: str = Field(min_length=1, max_length=512, description="local folder, hub id, or builtin:<name>")
    weight_name: str | None = Field(None, max_length=256, description="the .safetensors file in source, if several")
    family: str = Field(description="the model family it was trained for; must be the model's")


class SafetyCheckerConfig(StrictModel):
    """An image classifier run on every image before delivery (diffusers'
    StableDiffusionSafetyChecker layout: ``safety_checker/`` and ``feature_extractor/``)."""

    weights: str = Field(
        min_length=1,
        max_length=1024,
        description="folder or hub id holding the checker; or builtin:tiny-safety-checker",
    )


class ModelConfig(StrictModel):
    id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
    family: str = Field(description="a model family: " + ", ".join(sorted(FAMILIES)))
    weights: str = Field(min_length=1, max_length=1024, description="hub id, local folder, or builtin:<name>")
    device: str = Field("cpu", max_length=64)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    defaults: ModelDefaults = Field(default_factory=ModelDefaults)
    limits: ModelLimits = Field(default_factory=ModelLimits)
    quality_steps: QualitySteps = Field(default_factory=QualitySteps)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    price_per_image: Decimal = Field(Decimal(1), ge=0, decimal_places=6)
    timeout_s: float = Field(300.0, gt=0, description="deadline for one request's images")
    warmup: bool = Field(True, description="one generation of the fewest steps at the default size before traffic")
    optimisations: Optimisations = Field(default_factory=Optimisations)
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions)
    loras: dict[str, LoraAdapterConfig] = Field(
        default_factory=dict, max_length=256, description="adapters requests may name, by name"
    )
    lora_cache_size: int = Field(
        4, ge=1, le=64, description="adapters a replica keeps loaded (least recently used out)"
    )
    go_fast: GoFastConfig | None = Field(None, description="default: the family's speed mode")
    safety_checker: SafetyCheckerConfig | None = None

    @field_validator("loras")
    @classmethod
    def _adapter_names(cls, loras: dict[str, LoraAdapterConfig]) -> dict[str, LoraAdapterConfig]:
        for name in loras:
            if not re.fullmatch(ADAPTER_NAME, name):
                raise ValueError(f"LoRA name {name!r}: letters, digits, '.', '_' and '-', at most 64")
        return loras

    @property
    def speed_mode(self) -> GoFastConfig:
        return self.go_fast if self.go_fast is not None else self.rules.default_go_fast

    @field_validator("family")
    @classmethod
    def _known_family(cls, value: str) -> str:
        get_family(value)
        return value

    @property
    def rules(self) -> Family:
        """This model's family: its size multiple, guidance, pipelines (``serve_app.families``)."""
        return get_family(self.family)

    @property
    def deployment_name(self) -> str:
        """Serve deployment name from the id (``org/sdxl-1.0`` -> ``model-org-sdxl-1-0``)."""
        return "model-" + "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in self.id)

    @property
    def price_units(self) -> int:
        return int(self.price_per_image * CREDIT_UNITS)

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> ModelConfig:
        width, height = (int(v) for v in self.defaults.size.split("x"))
        multiple = self.rules.size_multiple
        if width % multiple or height % multiple:
            raise ValueError(f"defaults.size {self.defaults.size} must be a multiple of {multiple}")
        if width * height > self.limits.max_pixels:
            raise ValueError(f"defaults.size {self.defaults.size} exceeds limits.max_pixels")
        if self.defaults.steps > self.limits.max_steps:
            raise ValueError("defaults.steps exceeds limits.max_steps")
        self.rules.check_model(self)
        for name, adapter in self.loras.items():
            if adapter.family != self.family:
                raise ValueError(f"loras.{name} is a {adapter.family!r} adapter; model {self.id!r} is {self.family!r}")
        if self.speed_mode.cache != "none" and not self.rules.transformer_cache:
            raise ValueError(f"go_fast.cache: a {self.family} model has no transformer to cache; use step_fraction")
        if self.batching.max_batch_images > self.deployment.max_ongoing_requests * self.limits.max_n:
            raise ValueError("batching.max_batch_images can never fill: raise deployment.max_ongoing_requests")
        self._check_optimisations()
        return self

    def _check_optimisations(self) -> None:
        options = self.optimisations
        on_cuda = self.device.startswith("cuda")
        if options.attention == "flash" and not on_cuda:
            raise ValueError(f"optimisations.attention flash needs a CUDA device, not {self.device!r}")
        if options.compile is not None:
            if not self.warmup:
                raise ValueError("optimisations.compile compiles during warm-up: it needs warmup: true")
            if options.compile.cuda_graphs and options.compile.backend != "inductor":
                raise ValueError(f"optimisations.compile.mode {options.compile.mode} needs backend inductor")
            if options.compile.cuda_graphs and not on_cuda:
                raise ValueError(
                    f"optimisations.compile.mode {options.compile.mode} captures CUDA graphs: it needs a CUDA "
                    f"device, not {self.device!r}"
                )
            for size in options.compile.sizes:
                self.check_size(size, "optimisations.compile.sizes")
        if options.fp16_vae is not None:
            if not self.rules.vae_upcast_in_float16:
                raise ValueError(f"optimisations.fp16_vae: a {self.family} VAE is not upcast in float16")
        for size in self.batching.max_images_by_size:
            self.check_size(size, "batching.max_images_by_size")

    def check_size(self, size: str, name: str) -> None:
        """Raise ValueError unless ``size`` is one this model can be asked for."""
        width, height = (int(v) for v in size.split("x"))
        multiple, limits = self.rules.size_multiple, self.limits
        if width % multiple or height % multiple:
            raise ValueError(f"{name}: {size} must be a multiple of {multiple}")
        if (
            width * height > limits.max_pixels
            or min(width, height) < limits.min_side
            or max(width, height) > limits.max_side
        ):
            raise ValueError(f"{name}: {size} is outside limits")

    @property
    def min_steps(self) -> int:
        """The fewest denoising steps this model's pipeline produces an image with."""
        return self.rules.min_steps

    def quality_steps_set(self) -> list[tuple[str, int]]:
        return [(f"quality_steps.{name}", steps) for name, steps in self.quality_steps if steps is not None]

    def steps_for_quality(self, quality: str) -> int:
        """``auto``/``standard`` give the default; ``hd`` is ``high``."""
        default = self.defaults.steps
        table = {
            "low": self.quality_steps.low or max(self.min_steps, default // 2),
            "medium": self.quality_steps.medium or default,
            "high": self.quality_steps.high or min(self.limits.max_steps, default * 2),
        }
        table["standard"] = table["medium"]
        table["hd"] = table["high"]
        return table.get(quality, default)


class AccountsConfig(StrictModel):
    database_url: str = Field(
        "sqlite:///data/imagegen.db",
        description="sqlite:///relative/path or sqlite:////absolute/path (one machine), "
        "postgresql+psycopg://user@host/database (a cluster); env IMAGEGEN_DATABASE_URL overrides",
    )
    default_requests_per_minute: int = Field(60, ge=1)
    default_images_per_minute: int = Field(120, ge=1)
    release_stale_after_s: float | None = Field(
        None,
        gt=0,
        description="refund reservations left open this long (a replica died mid-request); "
        "default: twice the longest model timeout_s plus 300 s",
    )
    release_stale_every_s: float = Field(60.0, gt=0)
    orphan_check_every_s: float = Field(
        15.0, gt=0, description="how often an ingress replica refunds the reservations of ingress replicas that died"
    )
    idempotency_window_s: float = Field(
        86400.0,
        gt=0,
        description="how long a request's Idempotency-Key returns its first outcome; at most storage.url_ttl_s, "
        "which keeps the outcome's images",
    )

    def resolved_database_url(self) -> str:
        return os.environ.get("IMAGEGEN_DATABASE_URL") or self.database_url


class LocalStorageConfig(StrictModel):
    root: Path = Path("data/images")
    files_root: Path = Field(
        Path("data/files"),
        description="uploaded and batch output files (/v1/files): their own folder, which the image sweep never "
        "touches; they are kept until files.retention_s or a DELETE",
    )
    public_base_url: str | None = Field(
        None, description="external base URL of the ingress; default: the request's own base URL"
    )
    signing_secret: str | None = Field(
        None, description="HMAC secret for URLs; default: a random one kept in <root>/.signing_key"
    )
    sweep_interval_s: float = Field(300.0, gt=0)


class S3StorageConfig(StrictModel):
    bucket: str = Field(min_length=3)
    prefix: str = "images/"
    files_prefix: str = Field(
        "files/", description="/v1/files objects: keep them out of the images prefix's lifecycle rule"
    )
    region: str | None = None
    endpoint_url: str | None = None
    addressing_style: Literal["path", "virtual"] | None = Field(
        None, description="default: virtual-hosted on AWS, path-style with a custom endpoint_url"
    )


class StorageConfig(StrictModel):
    backend: Literal["local", "s3"] = "local"
    url_ttl_s: int = Field(3600, ge=1)
    local: LocalStorageConfig = Field(default_factory=LocalStorageConfig)
    s3: S3StorageConfig | None = None

    @model_validator(mode="after")
    def _backend_configured(self) -> StorageConfig:
        if self.backend == "s3" and self.s3 is None:
            raise ValueError("backend 's3' needs an s3: section with at least a bucket")
        if self.backend == "s3" and self.url_ttl_s > 7 * 24 * 3600:
            raise ValueError("url_ttl_s: S3 presigned URLs live at most 7 days (604800 s)")
        return self


class FilesConfig(StrictModel):
    """``/v1/files``: OpenAI's limits on an upload for the Batch API, and how long files live."""

    max_bytes: int = Field(200 * 1024 * 1024, ge=1024, description="largest upload (OpenAI: 200 MB for a batch)")
    max_lines: int = Field(50_000, ge=1, description="requests in one batch input file (OpenAI: 50,000)")
    max_line_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="one JSONL line (an edit's input image travels in it)"
    )
    retention_s: int = Field(
        30 * 86400, ge=3600, description="files are deleted this long after their creation (OpenAI: 30 days)"
    )


class BatchesConfig(StrictModel):
    """The Batch API's runner: an asyncio task in every ingress replica that claims lines of
    the database with leases (serve_app/batches/runner.py)."""

    enabled: bool = True
    price_factor: Decimal = Field(
        Decimal("0.5"), ge=0, le=1, decimal_places=6, description="a batch image costs price_per_image x this"
    )
    completion_window_s: float = Field(
        86400.0, gt=0, description="'24h': queued lines of a batch older than this expire"
    )
    max_concurrent_lines: int = Field(
        2,
        ge=1,
        le=256,
        description="lines one ingress replica runs at once; keep it below the models' max_ongoing_requests so "
        "batch work never fills a replica's request slots",
    )
    lease_s: float = Field(
        60.0,
        ge=1,
        description="a claimed line is another replica's to take when its lease (renewed while it runs) runs "
        "out: its runner died",
    )
    poll_interval_s: float = Field(1.0, gt=0, le=60)
    max_attempts: int = Field(
        3, ge=1, le=20, description="claims of one line before it fails (a line that keeps killing its runner)"
    )
    retry_after_s: float = Field(5.0, gt=0, description="wait before a line refused for now (503, in use) runs again")


class IngressOptions(StrictModel):
    num_replicas: int | Literal["auto"] | None = 1
    autoscaling_config: dict[str, Any] | None = None
    ray_actor_options: dict[str, Any] = Field(default_factory=lambda: {"num_cpus": 0.25})
    max_ongoing_requests: int = Field(256, ge=1)


class ImageInputConfig(StrictModel):
    """Where input images (``image`` as an http(s) URL) may come from, and what decoding
    them may cost (serve_app.image_input)."""

    allowed_url_hosts: list[str] = Field(
        default_factory=list, max_length=256, description="exact host names an image URL may name; empty: no URLs"
    )
    allow_private_addresses: bool = Field(
        False, description="let listed hosts resolve to loopback / private / link-local addresses (internal stores)"
    )
    fetch_timeout_s: float = Field(10.0, gt=0, le=120)
    max_jpeg_scans: int = Field(
        100,
        ge=1,
        le=10_000,
        description="scans (SOS markers) an input JPEG may hold; each costs a pass over the image, a progressive "
        "JPEG has about 10",
    )
    decode_threads: int = Field(
        2, ge=1, le=64, description="threads of the ingress's own pool that decode input images and masks"
    )

    @field_validator("allowed_url_hosts")
    @classmethod
    def _lowercase_hosts(cls, hosts: list[str]) -> list[str]:
        return [host.strip().lower() for host in hosts]


class PromptEnhancerConfig(StrictModel):
    """What ``enhance_prompt: true`` uses: a text-generation model served as its own
    deployment in this application (``weights``), or an OpenAI-compatible chat endpoint
    (``url``). Exactly one of the two."""

    weights: str | None = Field(
        None, max_length=1024, description="causal LM: folder, hub id, or builtin:tiny-enhancer"
    )
    url: str | None = Field(None, max_length=2048, description="base URL of an OpenAI-compatible API (…/v1)")
    model: str = Field("default", max_length=256, description="the chat model name sent to url")
    api_key_env: str | None = Field(None, max_length=256, description="environment variable holding the url's API key")
    instruction: str = Field(
        "Rewrite this image prompt with more visual detail (subject, style, lighting, composition). "
        "Answer with the prompt only.",
        max_length=4000,
    )
    max_new_tokens: int = Field(96, ge=1, le=1024)
    timeout_s: float = Field(20.0, gt=0, le=300, description="past this the original prompt is used")
    device: str = Field("cpu", max_length=64)
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions)

    @model_validator(mode="after")
    def _one_source(self) -> PromptEnhancerConfig:
        if (self.weights is None) == (self.url is None):
            raise ValueError("prompt_enhancer: set exactly one of weights (a served model) or url (a chat endpoint)")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError("prompt_enhancer.url must be an http(s) URL")
        return self


class AppConfig(StrictModel):
    models: list[ModelConfig] = Field(min_length=1)
    default_model: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="the model of a request that names none (model absent or null); default: the first of models",
    )
    cache_dir: Path = Field(Path("data/models"), description="where built-in models are built")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    body_read_timeout_s: float = Field(
        30.0,
        gt=0,
        le=600,
        description="deadline for reading a whole request body, from its first read: a client that sends it "
        "slower (or sends headers, then nothing) gets a 408 request_timeout and its connection is closed",
    )
    api_docs: bool = Field(
        False,
        description="serve /docs (Swagger UI) and /redoc: pages that load their scripts from a CDN on the same "
        "origin as the playground; /openapi.json is always served",
    )
    ingress: IngressOptions = Field(default_factory=IngressOptions)
    accounts: AccountsConfig = Field(default_factory=AccountsConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    image_input: ImageInputConfig = Field(default_factory=ImageInputConfig)
    prompt_enhancer: PromptEnhancerConfig | None = Field(None, description="none: enhance_prompt is a 400")
    files: FilesConfig = Field(default_factory=FilesConfig)
    batches: BatchesConfig = Field(default_factory=BatchesConfig)
    single_machine: bool = Field(
        False,
        description="the operator declares that every replica of this application runs on one machine: "
        "a SQLite ledger and local image files are then allowed with several ingress replicas or GPU models",
    )

    @field_validator("models")
    @classmethod
    def _unique_ids(cls, models: list[ModelConfig]) -> list[ModelConfig]:
        seen: set[str] = set()
        for model in models:
            if model.id in seen:
                raise ValueError(f"duplicate model id {model.id!r}")
            seen.add(model.id)
        return models

    def model(self, model_id: str) -> ModelConfig | None:
        return next((m for m in self.models if m.id == model_id), None)

    @property
    def default_model_id(self) -> str:
        """The model of a request that names none: ``default_model``, else the first model."""
        return self.default_model if self.default_model is not None else self.models[0].id

    @model_validator(mode="after")
    def _default_model_is_configured(self) -> AppConfig:
        if self.default_model is not None and self.model(self.default_model) is None:
            known = ", ".join(model.id for model in self.models)
            raise ValueError(f"default_model {self.default_model!r} is not one of models ({known})")
        return self

    @property
    def stale_reservation_after_s(self) -> float:
        """How long a reservation may stay open before it is refunded: well past any request
        that is still running (its images are due within its model's ``timeout_s``; delivery
        and settlement follow at once)."""
        configured = self.accounts.release_stale_after_s
        return configured if configured is not None else default_stale_after_s(self.longest_request_s)

    @property
    def idempotency_replay_window_s(self) -> float:
        """How long an Idempotency-Key's charged outcome is replayed: its images are kept in
        the storage backend for ``storage.url_ttl_s``, and an outcome refers to them."""
        return min(self.accounts.idempotency_window_s, float(self.storage.url_ttl_s))

    @property
    def longest_request_s(self) -> float:
        """The longest a request can hold its reservation before it delivers: the prompt
        enhancer's deadline (credits are reserved before it runs) plus the longest model's."""
        enhancer = self.prompt_enhancer.timeout_s if self.prompt_enhancer is not None else 0.0
        return enhancer + max(m.timeout_s for m in self.models)

    def multi_node_reasons(self) -> list[str]:
        """Why this config can put replicas on more than one node (empty: it cannot)."""
        reasons = []
        ingress = self.ingress
        if ingress.num_replicas == "auto":
            reasons.append("ingress.num_replicas is 'auto'")
        elif ingress.autoscaling_config is not None:
            if int(ingress.autoscaling_config.get("max_replicas", 1)) > 1:
                reasons.append(
                    f"ingress.autoscaling_config.max_replicas is {ingress.autoscaling_config['max_replicas']}"
                )
        elif (ingress.num_replicas or 1) > 1:
            reasons.append(f"ingress.num_replicas is {ingress.num_replicas}")
        for index, model in enumerate(self.models):
            gpus = model.deployment.ray_actor_options.get("num_gpus") or 0
            if gpus > 0:
                reasons.append(f"models.{index}.deployment.ray_actor_options.num_gpus is {gpus:g}")
        return reasons

    @model_validator(mode="after")
    def _one_ledger_and_one_image_store(self) -> AppConfig:
        """Two nodes must not get two ledgers (a key would spend its credits once per node)
        or two image folders (a URL would 404 on the node that did not store the image)."""
        if self.single_machine:
            return self
        reasons = self.multi_node_reasons()
        if not reasons:
            return self
        why = "; ".join(reasons)
        if not is_server_database_url(self.accounts.resolved_database_url()):
            raise ValueError(
                f"accounts.database_url: a SQLite ledger lives on one machine, but this config can run "
                f"replicas on several nodes ({why}): use postgresql+psycopg://user@host/database "
                "(or IMAGEGEN_DATABASE_URL), or set single_machine: true if every replica runs on this one machine"
            )
        if self.storage.backend == "local":
            raise ValueError(
                f"storage.backend: local image files live on one machine, but this config can run replicas "
                f"on several nodes ({why}): use backend: s3, or set single_machine: true if every replica "
                "runs on this one machine"
            )
        return self

    @model_validator(mode="after")
    def _stale_after_outlasts_requests(self) -> AppConfig:
        longest = self.longest_request_s
        if self.stale_reservation_after_s <= longest:
            raise ValueError(
                "accounts.release_stale_after_s must exceed the longest a request can run: the longest model "
                f"timeout_s plus prompt_enhancer.timeout_s ({longest:g} s)"
            )
        return self


def is_server_database_url(url: str) -> bool:
    """Whether a database URL names a server every node can reach (not a local file)."""
    return url.split(":", 1)[0] in ("postgresql", "postgresql+psycopg")


def default_stale_after_s(longest_timeout_s: float) -> float:
    """``accounts.release_stale_after_s`` unless set: twice the longest model deadline plus
    5 minutes, well past any request that may still deliver."""
    return 2 * longest_timeout_s + 300


def _read_serve_config(path: str | Path) -> dict[str, Any]:
    import yaml

    with open(path, encoding="utf-8") as handle:
        return yaml.safe_load(handle) or {}


def load_controller_options(path: str | Path) -> dict[str, Any] | None:
    """The ``controller_options:`` of a Serve config file, for ``serve.start`` to start Serve
    as ``serve run`` would (they install ``serve_app.proxy_guard`` in Serve's proxy)."""
    return _read_serve_config(path).get("controller_options")


def load_app_config(path: str | Path) -> AppConfig:
    """Read the ``args:`` of the first application in a Serve config file."""
    document = _read_serve_config(path)
    applications = document.get("applications") or []
    if not applications:
        raise ValueError(f"{path}: no applications: section")
    return AppConfig.model_validate(applications[0].get("args") or {})


__all__ = [
    "CREDIT_UNITS",
    "OUTPUT_FORMATS",
    "AccountsConfig",
    "AppConfig",
    "BatchesConfig",
    "BatchingConfig",
    "CompileOptions",
    "DeploymentOptions",
    "FilesConfig",
    "GoFastConfig",
    "ImageInputConfig",
    "LocalStorageConfig",
    "LoraAdapterConfig",
    "ModelConfig",
    "Optimisations",
    "PromptEnhancerConfig",
    "S3StorageConfig",
    "SafetyCheckerConfig",
    "StorageConfig",
    "load_app_config",
    "load_controller_options",
]
