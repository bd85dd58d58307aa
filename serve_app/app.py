"""``build_app``: the import path of serve_config.yaml.

No ``from __future__ import annotations`` here: Serve reads the builder's annotation to
validate ``args:`` into ``AppConfig`` itself, and needs the real class, not a string.
"""

from pathlib import Path
from typing import Any

from ray.serve import Application

from deployments.model_deployment import ImageModel
from deployments.prompt_enhancer import PromptEnhancer
from serve_app.config import AppConfig, DeploymentOptions, ModelConfig, PromptEnhancerConfig
from serve_app.ingress import ImageGenerationIngress

INGRESS_DEPLOYMENT_NAME = "ImageGenerationIngress"
ENHANCER_DEPLOYMENT_NAME = "PromptEnhancer"


def build_app(config: AppConfig) -> Application:
    """One model deployment per configured model, and the ingress holding their handles."""
    config = anchor_paths(AppConfig.model_validate(config), Path.cwd())
    handles = {model.id: bind_model(model, config.cache_dir) for model in config.models}
    ingress = config.ingress
    options: dict[str, Any] = {
        "name": INGRESS_DEPLOYMENT_NAME,
        "ray_actor_options": ingress.ray_actor_options,
        "max_ongoing_requests": ingress.max_ongoing_requests,
    }
    if ingress.autoscaling_config is not None:
        options["autoscaling_config"] = ingress.autoscaling_config
    elif ingress.num_replicas is not None:
        options["num_replicas"] = ingress.num_replicas
    enhancer = bind_enhancer(config.prompt_enhancer, config.cache_dir)
    return ImageGenerationIngress.options(**options).bind(config.model_dump(mode="json"), handles, enhancer)


def bind_enhancer(enhancer: PromptEnhancerConfig | None, cache_dir: Path) -> Application | None:
    """The prompt enhancer's own deployment, when it is a model served here (not a URL)."""
    if enhancer is None or enhancer.weights is None:
        return None
    options = _deployment_options(enhancer.deployment)
    return PromptEnhancer.options(name=ENHANCER_DEPLOYMENT_NAME, **options).bind(
        enhancer.model_dump(mode="json"), str(cache_dir)
    )


def _deployment_options(deployment: DeploymentOptions) -> dict[str, Any]:
    options: dict[str, Any] = {
        "ray_actor_options": deployment.ray_actor_options,
        "max_ongoing_requests": deployment.max_ongoing_requests,
    }
    if deployment.autoscaling_config is not None:
        options["autoscaling_config"] = deployment.autoscaling_config
    elif deployment.num_replicas is not None:
        options["num_replicas"] = deployment.num_replicas
    for optional in ("health_check_period_s", "graceful_shutdown_timeout_s"):
        value = getattr(deployment, optional)
        if value is not None:
            options[optional] = value
    return options


def bind_model(model: ModelConfig, cache_dir: Path) -> Application:
    options = _deployment_options(model.deployment)
    # Batch limits travel as user_config so operators can change them without a restart.
    return ImageModel.options(name=model.deployment_name, user_config=model.batching.model_dump(), **options).bind(
        model.model_dump(mode="json"), str(cache_dir)
    )


def anchor_paths(config: AppConfig, base: Path) -> AppConfig:
    """Make relative paths absolute against the directory ``serve run`` was started in.

    Replicas run in other processes (possibly other working directories), so every path
    they see must already be absolute. ``IMAGEGEN_DATABASE_URL`` is applied here too, on
    the side that reads the operator's environment.
    """
    database_url = config.accounts.resolved_database_url()
    prefix = "sqlite:///"
    if database_url.startswith(prefix) and not database_url.startswith(prefix + "/"):
        database_url = prefix + str(base / database_url[len(prefix) :])
    local_storage = config.storage.local.model_copy(
        update={"root": base / config.storage.local.root, "files_root": base / config.storage.local.files_root}
    )
    return config.model_copy(
        update={
            "cache_dir": base / config.cache_dir,
            "accounts": config.accounts.model_copy(update={"database_url": database_url}),
            "storage": config.storage.model_copy(update={"local": local_storage}),
        }
    )
