"""Builder checks: the bound graph, without starting Serve."""

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from serve_app.app import INGRESS_DEPLOYMENT_NAME, build_app
from serve_app.config import AppConfig, load_app_config

ROOT = Path(__file__).resolve().parents[1]


def bound_models(app):
    ingress = app._bound_deployment
    return ingress, {model_id: handle._bound_deployment for model_id, handle in ingress.init_args[1].items()}


def test_embedded_default_binds_one_deployment_per_model():
    config = load_app_config(ROOT / "serve_config.yaml")
    ingress, models = bound_models(build_app(config))
    assert ingress.name == INGRESS_DEPLOYMENT_NAME
    assert set(models) == {"tiny-sdxl", "tiny-qwen-image", "tiny-flux"}
    sdxl = models["tiny-sdxl"]
    assert sdxl.name == "model-tiny-sdxl"
    # Every model at its most replicas fits on 2 cores.
    most = sum(m.ray_actor_options["num_cpus"] * m._deployment_config.autoscaling_config.max_replicas
               for m in models.values())
    assert most <= 2
    assert sdxl.max_ongoing_requests == 16
    assert sdxl.user_config == {"max_batch_images": 8, "batch_wait_timeout_s": 0.0}
    autoscaling = sdxl._deployment_config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas) == (1, 2)
    model_arg, cache_dir = sdxl.init_args
    assert model_arg["weights"] == "builtin:tiny-sdxl"
    assert Path(cache_dir).is_absolute()


def test_gpu_config_asks_for_one_gpu_per_replica():
    config = load_app_config(ROOT / "serve_config.gpu.yaml")
    _, models = bound_models(build_app(config))
    assert set(models) == {"stable-diffusion-xl-base-v10", "qwen-image", "flux-1-schnell"}
    for deployment in models.values():
        assert deployment.ray_actor_options["num_gpus"] == 1
        assert deployment._deployment_config.autoscaling_config.max_replicas > 1
    assert config.model("qwen-image").dtype == "bfloat16"
    schnell = config.model("flux-1-schnell")
    assert (schnell.family, schnell.weights, schnell.dtype) == ("flux", "black-forest-labs/FLUX.1-schnell", "bfloat16")
    assert (schnell.defaults.steps, schnell.defaults.guidance) == (4, 0.0)  # few steps, no guidance input
    assert config.model("stable-diffusion-xl-base-v10").dtype == "float16"


def controller_env_vars(serve_config_text: str) -> dict[str, str]:
    """The env vars a Serve config gives its controller, once Serve's own schema accepts it."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(yaml.safe_load(serve_config_text))
    return schema.controller_options.runtime_env["env_vars"]


def test_gpu_config_is_a_valid_serve_config_with_the_proxy_middleware():
    from serve_app.edge import PROXY_CALLBACK

    env_vars = controller_env_vars((ROOT / "serve_config.gpu.yaml").read_text())
    assert env_vars == {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": PROXY_CALLBACK}


def test_relative_paths_are_anchored_for_replicas(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("IMAGEGEN_DATABASE_URL", raising=False)
    config = load_app_config(ROOT / "serve_config.yaml")
    ingress, _ = bound_models(build_app(config))
    anchored = AppConfig.model_validate(ingress.init_args[0])
    assert anchored.accounts.database_url == f"sqlite:///{tmp_path}/data/imagegen.db"
    assert anchored.storage.local.root == tmp_path / "data/images"


def test_deployment_names_are_derived_from_model_ids():
    config = AppConfig.model_validate(
        {"models": [{"id": "org/sdxl-1.0", "family": "sdxl", "weights": "org/sdxl-1.0"}]}
    )
    _, models = bound_models(build_app(config))
    assert models["org/sdxl-1.0"].name == "model-org-sdxl-1-0"


@pytest.mark.parametrize(
    "model, field",
    [
        ({"family": "dalle"}, "family"),
        ({"dtype": "int8"}, "dtype"),
        ({"limits": {"max_n": 11}}, "max_n"),
        ({"price_per_image": "-1"}, "price_per_image"),
        ({"defaults": {"size": "big"}}, "size"),
        ({"batching": {"max_batch_images": 0}}, "max_batch_images"),
        ({"surprise": True}, "surprise"),
        ({"family": "qwen-image", "defaults": {"size": "64x64", "steps": 1}}, "defaults.steps"),
        ({"family": "qwen-image", "quality_steps": {"low": 1}}, "quality_steps.low"),
    ],
)
def test_bad_config_names_the_field(model, field):
    base = {"id": "m", "family": "sdxl", "weights": "builtin:tiny-sdxl"}
    with pytest.raises(ValidationError) as caught:
        AppConfig.model_validate({"models": [{**base, **model}]})
    assert field in str(caught.value)


def test_stale_reservations_wait_past_the_longest_timeout():
    base = {"id": "m", "family": "sdxl", "weights": "builtin:tiny-sdxl", "timeout_s": 100}
    assert AppConfig.model_validate({"models": [base]}).stale_reservation_after_s == 500
    custom = AppConfig.model_validate({"models": [base], "accounts": {"release_stale_after_s": 150}})
    assert custom.stale_reservation_after_s == 150
    with pytest.raises(ValidationError, match="release_stale_after_s"):
        AppConfig.model_validate({"models": [base], "accounts": {"release_stale_after_s": 100}})


def test_duplicate_model_ids_are_rejected():
    model = {"id": "m", "family": "sdxl", "weights": "builtin:tiny-sdxl"}
    with pytest.raises(ValidationError, match="duplicate model id"):
        AppConfig.model_validate({"models": [model, model]})


def test_ingress_package_imports_without_torch():
    code = "import sys, serve_app.app, serve_app.cli; assert 'torch' not in sys.modules and 'diffusers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_the_default_config_installs_the_proxy_middleware_and_can_switch_to_throughput_mode():
    """serve_config.yaml is a valid Serve config whose controller_options install
    serve_app.edge in Serve's proxy; the README's throughput mode is its two commented
    env_vars lines, which uncommented keep it valid and set both flags."""
    from serve_app.edge import PROXY_CALLBACK

    text = (ROOT / "serve_config.yaml").read_text()
    assert controller_env_vars(text) == {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": PROXY_CALLBACK}

    uncommented = "\n".join(
        line.replace("# ", "", 1) if line.lstrip().startswith("# RAY_SERVE_") else line for line in text.splitlines()
    )
    assert controller_env_vars(uncommented) == {
        "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": PROXY_CALLBACK,
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    }


def test_the_proxy_callback_gives_serve_a_valid_middleware_list():
    """What Serve's proxy does with RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH at startup."""
    from ray.serve._private.http_util import validate_http_proxy_callback_return
    from ray.serve._private.utils import call_function_from_import_path

    from serve_app.edge import PROXY_CALLBACK, EdgeRejections

    middlewares = validate_http_proxy_callback_return(call_function_from_import_path(PROXY_CALLBACK))
    assert [middleware.cls for middleware in middlewares] == [EdgeRejections]
