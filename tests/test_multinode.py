"""Two Ray nodes on one machine: a head with the ingress, a node that declares one GPU.

The production shape in miniature: the models ask for ``num_gpus: 1``, so Serve can place
their replicas only on the GPU node (its "GPU" is declared, the replicas run on CPU). The
test starts both nodes itself (`ray start --block` in a process group of its own) and stops
only those: never `ray stop`, which would stop every Ray on the machine.

It runs before every other test (conftest orders it first), while the session's shared Ray
instance is not up yet: one Ray cluster at a time on a 2-core machine.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import MODEL_CACHE, ROOT, free_port, run_cli

pytestmark = pytest.mark.multinode

MODEL = "tiny-sdxl"
# Ray notices a dead node after `health_check_failure_threshold` missed checks, one every
# `health_check_period_ms`: 1 s x 3 instead of the default 3 s x 5 (the same settings on a
# real cluster shorten the window in which requests still go to a dead node's replicas).
HEALTH_CHECK_ENV = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
# Ray 2.60 turns token authentication on for a cluster that `ray start --head` makes: every
# process of the cluster, and every client of it (`serve run`, the dashboard's REST API),
# needs the mode and the token (docs/production.md, "Ray's token authentication").
TOKEN = secrets.token_hex(32)
AUTH_ENV = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN}
AUTH_HEADER = {"Authorization": f"Bearer {TOKEN}"}


class Node:
    """One `ray start --block`: killing its process group stops that node and nothing else."""

    def __init__(self, *args: str, temp_dir: str, log: Path) -> None:
        self.log = log
        env = {**os.environ, **HEALTH_CHECK_ENV, **AUTH_ENV}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--disable-usage-stats", *args],
            cwd=ROOT,
            env=env,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.temp_dir = temp_dir

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.process.poll() is None or _group_alive(self.process.pid):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass
        self.process.wait(timeout=30)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _wait_for(what: str, check, timeout_s: float, every_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f} s waiting for {what}"
        time.sleep(every_s)


def _serve_details(dashboard: str) -> dict | None:
    """Serve's own view of the cluster, from the dashboard's REST API (what `serve status` reads)."""
    try:
        response = httpx.get(f"{dashboard}/api/serve/applications/", headers=AUTH_HEADER, timeout=5)
    except httpx.HTTPError:
        return None
    return response.json() if response.status_code == 200 else None


def _replica_nodes(details: dict | None, deployment: str) -> list[tuple[str, str]]:
    """(state, node_id) of each replica of ``deployment`` in Serve's state."""
    if not details:
        return []
    application = (details.get("applications") or {}).get("imagegen") or {}
    replicas = ((application.get("deployments") or {}).get(deployment) or {}).get("replicas") or []
    return [(replica["state"], replica.get("node_id")) for replica in replicas]


def _gpu_node_ids(dashboard: str) -> set[str]:
    """The nodes that declare a GPU (the dashboard may still list a dead one as alive)."""
    nodes = httpx.get(f"{dashboard}/nodes?view=summary", headers=AUTH_HEADER, timeout=5).json()["data"]["summary"]
    return {node["raylet"]["nodeId"] for node in nodes if (node["raylet"].get("resourcesTotal") or {}).get("GPU")}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    data = tmp_path_factory.mktemp("multinode")
    # Ray's socket paths must stay short: a temp dir of our own under /tmp, not pytest's.
    temp_dir = tempfile.mkdtemp(prefix="ray-mn-", dir="/tmp")
    gcs_port, dashboard_port, serve_port = free_port(), free_port(), free_port()
    head = Node(
        "--head",
        f"--port={gcs_port}",
        "--num-cpus=2",
        "--num-gpus=0",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        f"--temp-dir={temp_dir}",
        temp_dir=temp_dir,
        log=data / "head.log",
    )
    address = f"127.0.0.1:{gcs_port}"
    # No CPUs on the GPU node: the ingress (one CPU) can only run on the head.
    gpu_args = (f"--address={address}", "--num-cpus=0", "--num-gpus=1")
    gpu = Node(*gpu_args, temp_dir=temp_dir, log=data / "gpu-node.log")

    config_path = data / "serve_config.yaml"
    database_url = f"sqlite:///{data}/imagegen.db"
    config_path.write_text(yaml.safe_dump(_gpu_shaped_config(data, database_url, serve_port)))
    serve_run = None
    state = {"gpu": gpu}
    try:
        dashboard = f"http://127.0.0.1:{dashboard_port}"
        _wait_for("the dashboard", lambda: _serve_details(dashboard) is not None, 60)
        serve_run = subprocess.Popen(
            [sys.executable, "-m", "ray.serve.scripts", "run", str(config_path)],
            cwd=ROOT,
            env={**os.environ, **AUTH_ENV, "RAY_ADDRESS": address},
            stdout=(data / "serve-run.log").open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        # Without the token, Ray's own API refuses (what an operator meets with `serve status`).
        refused = httpx.get(f"{dashboard}/api/serve/applications/", timeout=5)
        assert (refused.status_code, refused.text) == (401, "Unauthorized: Missing authentication token")
        state.update(
            {
                "base_url": f"http://127.0.0.1:{serve_port}",
                "dashboard": dashboard,
                "database_url": database_url,
                "head": head,
                "gpu": gpu,
                "restart_gpu": lambda: Node(*gpu_args, temp_dir=temp_dir, log=data / "gpu-node.log"),
                "logs": data,
            }
        )
        yield state
    finally:
        if serve_run is not None:
            serve_run.send_signal(signal.SIGINT)
            try:
                serve_run.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(serve_run.pid, signal.SIGKILL)
        for node in (state["gpu"], head):
            node.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _gpu_shaped_config(data: Path, database_url: str, port: int) -> dict:
    document = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    document["http_options"] = {"host": "127.0.0.1", "port": port}
    args = document["applications"][0]["args"]
    args["cache_dir"] = str(MODEL_CACHE)
    args["accounts"]["database_url"] = database_url
    args["storage"]["local"]["root"] = str(data / "images")
    args["ingress"]["ray_actor_options"] = {"num_cpus": 1}
    # A model asking for a GPU on a SQLite ledger and local image files: both Ray nodes run
    # on this one machine and share its disk, which the config must declare.
    args["single_machine"] = True
    (model,) = [m for m in args["models"] if m["id"] == MODEL]
    model["deployment"]["ray_actor_options"] = {"num_cpus": 0, "num_gpus": 1}
    model["deployment"]["autoscaling_config"] = None
    model["deployment"]["num_replicas"] = 1
    args["models"] = [model]
    return document


def _generate(base_url: str, key: str, timeout_s: float = 60) -> httpx.Response:
    return httpx.post(
        f"{base_url}/v1/images/generations",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": MODEL, "prompt": "a red cube", "seed": 7},
        timeout=timeout_s,
    )


def test_models_run_on_the_gpu_node_and_survive_it_going_away(cluster):
    base_url, dashboard = cluster["base_url"], cluster["dashboard"]
    deployment = f"model-{MODEL}"
    key = run_cli("keys", "create", "--name", "mn", "--credits", "100", database_url=cluster["database_url"])
    key = key.strip().splitlines()[-1]

    # Served: an image comes back, and Serve's state puts the model replica on the GPU node
    # and the ingress on the head.
    _wait_for(
        "the model replica",
        lambda: "RUNNING" in [s for s, _ in _replica_nodes(_serve_details(dashboard), deployment)],
        180,
    )
    first = _wait_for("a first image", lambda: (r := _generate(base_url, key)).status_code == 200 and r, 60)
    assert len(first.json()["data"]) == 1
    (gpu_node,) = _gpu_node_ids(dashboard)
    details = _serve_details(dashboard)
    assert _replica_nodes(details, deployment) == [("RUNNING", gpu_node)]
    ingress_nodes = {node for _, node in _replica_nodes(details, "ImageGenerationIngress")}
    assert ingress_nodes and gpu_node not in ingress_nodes

    # The GPU node goes away: once Ray has noticed, every request is a fast 503 with
    # Retry-After, in the documented error shape, and nothing is charged for it.
    cluster["gpu"].stop()
    _wait_for(
        "Serve to see the replica gone",
        lambda: "RUNNING" not in [s for s, _ in _replica_nodes(_serve_details(dashboard), deployment)],
        60,
    )
    for _ in range(3):
        started = time.monotonic()
        response = _generate(base_url, key, timeout_s=30)
        elapsed = time.monotonic() - started
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "model_unavailable"
        assert int(response.headers["retry-after"]) >= 1
        assert elapsed < 5, f"a 503 took {elapsed:.1f} s"
    usage = httpx.get(f"{base_url}/v1/usage", headers={"Authorization": f"Bearer {key}"}, timeout=10).json()

    # The node comes back: Serve places the replica there again and images flow.
    cluster["gpu"] = cluster["restart_gpu"]()
    again = _wait_for(
        "an image after the node's return",
        lambda: (r := _generate(base_url, key)).status_code == 200 and r,
        180,
        every_s=2,
    )
    assert len(again.json()["data"]) == 1
    # A node that rejoins is a new node to Ray: the replica runs on it, the other GPU node.
    # (The dashboard's node list catches up within seconds.)
    (new_gpu_node,) = _wait_for("the new node in the node list", lambda: _gpu_node_ids(dashboard) - {gpu_node}, 30)
    replicas = _replica_nodes(_serve_details(dashboard), deployment)
    assert [node for state, node in replicas if state == "RUNNING"] == [new_gpu_node], replicas
    after = httpx.get(f"{base_url}/v1/usage", headers={"Authorization": f"Bearer {key}"}, timeout=10).json()
    # One credit per image delivered, none for the 503s, nothing left reserved.
    assert (usage["total_images"], usage["balance"], usage["reserved"]) == (1, 99.0, 0.0)
    assert (after["total_images"], after["balance"], after["reserved"]) == (2, 98.0, 0.0)
