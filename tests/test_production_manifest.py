"""The KubeRay manifest of docs/production.md: valid for KubeRay, and the GPU config it serves.

Kubernetes prunes fields a CRD does not know instead of refusing them, so a misspelt key
(`serveConfigv2`) would be dropped silently at `kubectl apply`: besides the schema's types,
enums and required fields, every key must be one the schema names.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from serve_app.config import AppConfig

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "deploy" / "kuberay"
MANIFEST = KUBERAY / "rayservice.gpu.yaml"
CRD = KUBERAY / "ray.io_rayservices.v1.7.0.yaml.gz"


@pytest.fixture(scope="module")
def manifest() -> dict:
    return yaml.safe_load(MANIFEST.read_text())


@pytest.fixture(scope="module")
def schema() -> dict:
    crd = yaml.safe_load(gzip.decompress(CRD.read_bytes()))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def unknown_keys(document, schema: dict, path: str = "") -> list[str]:
    """Keys of ``document`` that ``schema`` does not name (and so Kubernetes would prune)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found = []
    if isinstance(document, dict):
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, value in document.items():
            if properties is not None and key in properties:
                found += unknown_keys(value, properties[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                found += unknown_keys(value, extra, f"{path}.{key}")
            elif properties is not None:
                found.append(f"{path}.{key}")
    elif isinstance(document, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(document):
            found += unknown_keys(item, schema["items"], f"{path}[{index}]")
    return found


def test_manifest_is_a_valid_rayservice(manifest, schema):
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")
    jsonschema.Draft7Validator(schema).validate(manifest)
    assert unknown_keys(manifest, schema) == []


def test_schema_check_catches_what_kubernetes_would_prune(manifest, schema):
    misspelt = {**manifest, "spec": {**manifest["spec"], "serveConfigv2": "x"}}
    assert unknown_keys(misspelt, schema) == [".spec.serveConfigv2"]
    with pytest.raises(jsonschema.ValidationError):
        bad_mode = yaml.safe_load(MANIFEST.read_text())
        bad_mode["spec"]["rayClusterConfig"]["authOptions"]["mode"] = "password"
        jsonschema.Draft7Validator(schema).validate(bad_mode)


def test_serve_config_is_serve_config_gpu_yaml_verbatim():
    spec = importlib.util.spec_from_file_location("render", KUBERAY / "render.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    current = MANIFEST.read_text()
    assert render.rendered(current, (ROOT / "serve_config.gpu.yaml").read_text()) == current, (
        "the manifest is out of date: python deploy/kuberay/render.py"
    )


def test_cluster_fits_the_serve_config(manifest):
    cluster = manifest["spec"]["rayClusterConfig"]
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    (application,) = serve_config["applications"]
    config = AppConfig.model_validate(application["args"])

    # The image's Ray must be the one this package is built and tested against.
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["authOptions"]["mode"] == "token"
    groups = {group["groupName"]: group for group in cluster["workerGroupSpecs"]}
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in groups.values()]
    containers = [c for pod in pods for c in pod["spec"]["containers"]]
    # One image everywhere (every node imports serve_app: replicas and the proxy guard), and
    # every node gets the secrets, since any node may run the ingress or build the app.
    assert len({c["image"] for c in containers}) == 1
    for container in containers:
        assert {"secretRef": {"name": "imagegen-secrets"}} in container["envFrom"]

    gpu_limit = int(groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    gpu_replicas = 0
    for model in config.models:
        actor = model.deployment.ray_actor_options or {}
        assert model.device == "cuda" and actor.get("num_gpus") == 1 <= gpu_limit, model.id
        gpu_replicas += model.deployment.autoscaling_config["max_replicas"]
        # The smallest cluster already runs every model's minimum.
    assert groups["gpu"]["maxReplicas"] * gpu_limit >= gpu_replicas
    assert groups["gpu"]["minReplicas"] * gpu_limit >= sum(
        m.deployment.autoscaling_config["min_replicas"] for m in config.models
    )
    # The head takes no replica (num-cpus 0): the ingress lives on the cpu group.
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    cpu_per_pod = int(groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    ingress = config.ingress
    assert groups["cpu"]["maxReplicas"] * cpu_per_pod >= (
        ingress.autoscaling_config["max_replicas"] * ingress.ray_actor_options["num_cpus"]
    )
