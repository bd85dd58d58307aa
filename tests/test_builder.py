"""Builder checks: the bound graph, without starting Serve."""

import subprocess
import sys
from pathlib import Path

from serve_app.app import INGRESS_DEPLOYMENT_NAME, build_app
from serve_app.config import load_app_config

ROOT = Path(__file__).resolve().parents[1]


def bound_models(app):
    ingress = app._bound_deployment
    return ingress, {model_id: handle._bound_deployment for model_id, handle in ingress.init_args[1].items()}


def test_embedded_default_binds_one_deployment_per_model():
    config = load_app_config(ROOT / "serve_config.yaml")
    ingress, models = bound_models(build_app(config))
    assert ingress.name == INGRESS_DEPLOYMENT_NAME
    assert set(models) == {"tiny-sdxl", "tiny-qwen-image", "tiny-flux", "tiny-qwen-image-edit"}
    sdxl = models["tiny-sdxl"]
    assert sdxl.name == "model-tiny-sdxl"
    # Every model at its most replicas fits on 2 cores.
    most = sum(
        m.ray_actor_options["num_cpus"] * m._deployment_config.autoscaling_config.max_replicas for m in models.values()
    )
    assert most <= 2
    assert sdxl.max_ongoing_requests == 16
    assert sdxl.user_config == {
        "max_batch_images": 8,
        "batch_wait_timeout_s": 0.0,
        "batch_lane_grace_s": 0.1,
        "max_images_by_size": {},
    }
    autoscaling = sdxl._deployment_config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas) == (1, 2)
    model_arg, cache_dir = sdxl.init_args
    assert model_arg["weights"] == "builtin:tiny-sdxl"
    assert Path(cache_dir).is_absolute()


def test_gpu_config_asks_for_one_gpu_per_replica():
    config = load_app_config(ROOT / "serve_config.gpu.yaml")
    _, models = bound_models(build_app(config))
    assert set(models) == {"stable-diffusion-xl-base-v10", "qwen-image", "flux-1-schnell", "qwen-image-edit-2509"}
    edit = config.model("qwen-image-edit-2509")
    assert (edit.family, edit.weights) == ("qwen-image-edit", "Qwen/Qwen-Image-Edit-2509")
    for deployment in models.values():
        assert deployment.ray_actor_options["num_gpus"] == 1
        assert deployment._deployment_config.autoscaling_config.max_replicas > 1
    assert config.model("qwen-image").dtype == "bfloat16"
    schnell = config.model("flux-1-schnell")
    assert (schnell.family, schnell.weights, schnell.dtype) == ("flux", "black-forest-labs/FLUX.1-schnell", "bfloat16")
    assert (schnell.defaults.steps, schnell.defaults.guidance) == (4, 0.0)  # few steps, no guidance input
    assert config.model("stable-diffusion-xl-base-v10").dtype == "float16"


def serve_schema(serve_config_text: str):
    """A Serve config as Serve's own schema reads it (a bad config fails here)."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema.model_validate(yaml.safe_load(serve_config_text))


def test_gpu_config_is_a_valid_serve_config_with_the_proxy_guard():
    from serve_app.proxy_guard import PROXY_CALLBACK

    schema = serve_schema((ROOT / "serve_config.gpu.yaml").read_text())
    assert [app.import_path for app in schema.applications] == ["serve_app.app:build_app"]
    assert schema.controller_options.runtime_env["env_vars"] == {
        "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": PROXY_CALLBACK
    }


def test_ingress_package_imports_without_torch():
    code = (
        "import sys, serve_app.app, serve_app.cli; assert 'torch' not in sys.modules and 'diffusers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_the_default_config_installs_the_proxy_guard_and_can_switch_to_throughput_mode():
    """serve_config.yaml is a valid Serve config whose controller_options install
    serve_app.proxy_guard in Serve's proxy; the README's throughput mode is its two commented
    env_vars lines, which uncommented keep it valid and set both flags."""
    from serve_app.proxy_guard import PROXY_CALLBACK

    text = (ROOT / "serve_config.yaml").read_text()
    assert serve_schema(text).controller_options.runtime_env["env_vars"] == {
        "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": PROXY_CALLBACK
    }
    uncommented = "\n".join(
        line.replace("# ", "", 1) if line.lstrip().startswith("# RAY_SERVE_") else line for line in text.splitlines()
    )
    assert serve_schema(uncommented).controller_options.runtime_env["env_vars"] == {
        "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": PROXY_CALLBACK,
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    }


def test_the_proxy_callback_gives_serve_a_valid_middleware_list():
    """What Serve's proxy does with RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH at startup."""
    from ray.serve._private.http_util import validate_http_proxy_callback_return
    from ray.serve._private.utils import call_function_from_import_path

    from serve_app.proxy_guard import PROXY_CALLBACK, ProxyGuard

    middlewares = validate_http_proxy_callback_return(call_function_from_import_path(PROXY_CALLBACK))
    assert [middleware.cls for middleware in middlewares] == [ProxyGuard]


# -- configs that could split the ledger or the image store --------------------------------
def _gpu_args(**changes):
    import yaml

    args = yaml.safe_load((ROOT / "serve_config.gpu.yaml").read_text())["applications"][0]["args"]
    args.update(changes)
    return args


def test_gpu_config_uses_one_server_ledger_and_object_storage():
    config = load_app_config(ROOT / "serve_config.gpu.yaml")
    assert config.accounts.database_url.startswith("postgresql+psycopg://")
    assert "@" in config.accounts.database_url and ":" not in config.accounts.database_url.split("//")[1].split("@")[0]
    assert config.storage.backend == "s3" and config.storage.s3.endpoint_url is None  # from the environment
    assert not config.single_machine


def test_a_config_that_can_run_on_several_nodes_refuses_a_local_ledger_or_image_store(monkeypatch):
    import pytest
    from pydantic import ValidationError

    from serve_app.config import AppConfig

    monkeypatch.delenv("IMAGEGEN_DATABASE_URL", raising=False)
    sqlite = {"database_url": "sqlite:////var/lib/imagegen/imagegen.db"}
    with pytest.raises(ValidationError, match=r"accounts.database_url: a SQLite ledger .*models.0.deployment"):
        AppConfig.model_validate(_gpu_args(accounts=sqlite))
    with pytest.raises(ValidationError, match=r"storage.backend: local image files .*max_replicas is 4"):
        AppConfig.model_validate(_gpu_args(storage={"backend": "local"}))
    # the operator says it is one machine
    assert AppConfig.model_validate(_gpu_args(accounts=sqlite, storage={"backend": "local"}, single_machine=True))
    # the environment's database URL is the one that counts
    monkeypatch.setenv("IMAGEGEN_DATABASE_URL", "postgresql+psycopg://imagegen@db/imagegen")
    assert AppConfig.model_validate(_gpu_args(accounts=sqlite, storage=_gpu_args()["storage"]))

    # CPU models, but an ingress that can scale out
    monkeypatch.delenv("IMAGEGEN_DATABASE_URL")
    embedded = load_app_config(ROOT / "serve_config.yaml").model_dump(mode="json")
    assert AppConfig.model_validate(embedded).multi_node_reasons() == []
    for ingress, reason in [
        ({"num_replicas": 2}, "ingress.num_replicas is 2"),
        ({"num_replicas": "auto"}, "ingress.num_replicas is 'auto'"),
        ({"autoscaling_config": {"min_replicas": 1, "max_replicas": 3}}, "max_replicas is 3"),
    ]:
        with pytest.raises(ValidationError, match=reason):
            AppConfig.model_validate({**embedded, "ingress": ingress})
    assert AppConfig.model_validate({**embedded, "ingress": {"num_replicas": 2}, "single_machine": True})


def test_stale_reservations_outlast_the_enhancer_and_the_model_deadlines():
    """Credits are reserved before the prompt enhancer runs: the sweeper must not refund a
    request that is still within its enhancer's and its model's deadlines."""
    import pytest

    config = load_app_config(ROOT / "serve_config.yaml")
    assert config.prompt_enhancer is not None
    longest = config.prompt_enhancer.timeout_s + max(m.timeout_s for m in config.models)
    assert config.longest_request_s == longest
    document = config.model_dump()
    document["accounts"]["release_stale_after_s"] = longest - 1
    with pytest.raises(ValueError, match="plus prompt_enhancer.timeout_s"):
        type(config).model_validate(document)
    document["accounts"]["release_stale_after_s"] = longest + 1
    assert type(config).model_validate(document).stale_reservation_after_s == longest + 1
