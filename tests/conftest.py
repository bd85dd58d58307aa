"""Shared fixtures: one Ray instance and one served application for the whole session."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Built-in tiny models are built once per checkout and reused across test sessions.
MODEL_CACHE = ROOT / ".cache" / "models"

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pytest_collection_modifyitems(items):
    """Tests with a Ray cluster of their own run first, before the shared instance starts:
    one Ray cluster at a time on a 2-core machine."""
    items.sort(key=lambda item: item.get_closest_marker("multinode") is None)


@pytest.fixture(scope="session")
def ray_session():
    """The one Ray instance of the test session (never `ray stop`: we stop what we started)."""
    import ray
    from ray import serve

    ray.init(num_cpus=4, include_dashboard=False, namespace="imagegen-tests")
    yield ray
    serve.shutdown()
    ray.shutdown()


# The ledger of the served application: SQLite (the embedded default) unless
# IMAGEGEN_TEST_DATABASE=postgresql (.ci/run's second pass over the Serve tests).
TEST_DATABASE = os.environ.get("IMAGEGEN_TEST_DATABASE", "sqlite")


@pytest.fixture(scope="session")
def served(ray_session, tmp_path_factory, request):
    """The embedded default config, served on a free port, with its own database."""
    from ray import serve

    from serve_app.app import build_app
    from serve_app.config import load_app_config, load_controller_options

    data = tmp_path_factory.mktemp("served")
    if TEST_DATABASE == "postgresql":
        database_url = request.getfixturevalue("postgres").create_database()
    elif TEST_DATABASE == "sqlite":
        database_url = f"sqlite:///{data}/imagegen.db"
    else:
        raise ValueError(f"IMAGEGEN_TEST_DATABASE: sqlite or postgresql, not {TEST_DATABASE!r}")
    base = load_app_config(ROOT / "serve_config.yaml")
    config = base.model_copy(
        update={
            "cache_dir": MODEL_CACHE,
            # Sweep for stale reservations every second, so a test can watch one go.
            "accounts": base.accounts.model_copy(
                update={
                    "database_url": database_url,
                    "release_stale_every_s": 1.0,
                    "orphan_check_every_s": 2.0,
                }
            ),
            # Batch lines of a killed ingress are taken over after 5 s, not a minute.
            "batches": base.batches.model_copy(update={"lease_s": 15.0, "retry_after_s": 1.0}),
            "storage": base.storage.model_copy(
                update={
                    "local": base.storage.local.model_copy(update={"root": data / "images", "files_root": data / "files"})
                }
            ),
        }
    )
    port = free_port()
    # As `serve run serve_config.yaml` starts Serve: its controller_options install
    # serve_app.proxy_guard in the proxy.
    controller_options = load_controller_options(ROOT / "serve_config.yaml")
    serve.start(http_options={"host": "127.0.0.1", "port": port}, controller_options=controller_options)
    serve.run(build_app(config), name="imagegen", route_prefix="/")
    yield Served(config=config, base_url=f"http://127.0.0.1:{port}", database_url=config.accounts.database_url)
    serve.delete("imagegen")


@pytest.fixture(scope="session")
def failure_app(served):
    """A second application for the failure paths, on the same database. Its models:

    - ``needs-gpu`` asks for a GPU this machine lacks, so its replica never runs;
    - ``tight-deadline`` is the tiny SDXL with a 0.5 s deadline per request.

    Returns the base URL of its ingress, which does come up.
    """
    import httpx
    from ray import serve

    from serve_app.app import build_app
    from serve_app.config import AppConfig

    tiny = served.config.model("tiny-sdxl")
    needs_gpu = tiny.model_copy(
        update={
            "id": "needs-gpu",
            "deployment": tiny.deployment.model_copy(
                update={
                    "ray_actor_options": {"num_cpus": 0, "num_gpus": 1},
                    "autoscaling_config": None,
                    "num_replicas": 1,
                }
            ),
        }
    )
    tight_deadline = tiny.model_copy(
        update={
            "id": "tight-deadline",
            "timeout_s": 0.5,
            "deployment": tiny.deployment.model_copy(update={"autoscaling_config": None, "num_replicas": 1}),
        }
    )
    models = [needs_gpu.model_dump(), tight_deadline.model_dump()]
    # A model asking for a GPU: the config must say the SQLite ledger is on one machine.
    # Its ingress runs no batch runner: batch lines belong to whichever runner claims them, and
    # one on the same database with other models would answer them 404 (README, Batch API).
    batches = {**served.config.batches.model_dump(), "enabled": False}
    config = AppConfig.model_validate(
        {**served.config.model_dump(), "models": models, "single_machine": True, "batches": batches}
    )
    serve.run_many(
        [serve.RunTarget(build_app(config), name="failure-app", route_prefix="/failures")],
        wait_for_applications_running=False,
    )
    base_url = f"{served.base_url}/failures"
    deadline = time.monotonic() + 90
    while not _deployment_running("failure-app", tight_deadline.deployment_name):
        assert time.monotonic() < deadline, "failure-app never came up"
        time.sleep(0.5)
    while httpx.get(f"{base_url}/health").status_code != 200:
        assert time.monotonic() < deadline, "the ingress of failure-app never came up"
        time.sleep(0.5)
    yield base_url
    serve.delete("failure-app", _blocking=False)


def _deployment_running(app_name: str, deployment_name: str) -> bool:
    from ray import serve

    application = serve.status().applications.get(app_name)
    if application is None or deployment_name not in application.deployments:
        return False
    return application.deployments[deployment_name].replica_states.get("RUNNING", 0) > 0


class Served:
    def __init__(self, config, base_url: str, database_url: str) -> None:
        self.config = config
        self.base_url = base_url
        self.database_url = database_url
        self._key_count = 0

    def create_key(self, credits: str = "1000", *extra: str, name: str | None = None) -> str:
        """A fresh key through the operator CLI, as an operator would make one."""
        self._key_count += 1
        name = name or f"key-{self._key_count}"
        output = run_cli("keys", "create", "--name", name, "--credits", credits, *extra, database_url=self.database_url)
        return output.strip().splitlines()[-1]

    def client(self, key: str | None = None, **options):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.base_url}/v1", api_key=key or self.create_key(), max_retries=0, **options)


def run_cli(*args: str, database_url: str, check: bool = True) -> str:
    env = {**os.environ, "IMAGEGEN_DATABASE_URL": database_url}
    result = subprocess.run(
        [sys.executable, "-m", "serve_app.cli", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    if check and result.returncode != 0:
        raise AssertionError(f"imagegen {' '.join(args)} failed: {result.stderr}")
    return result.stdout


NODE_MODULES = Path(os.environ.get("OPENAI_NODE_MODULES", ROOT / ".cache" / "node" / "node_modules"))


def run_node_sdk(script: str, *args: str) -> dict:
    """Run ``tests/node/<script>`` with the official OpenAI Node SDK and return the JSON it
    prints last (skips where node or the SDK is missing; .ci/run installs both)."""
    import json
    import shutil

    node = shutil.which("node")
    if node is None or not (NODE_MODULES / "openai").is_dir():
        pytest.skip("needs node and `npm install --prefix .cache/node openai@6` (done by .ci/run)")
    result = subprocess.run(
        [node, str(ROOT / "tests" / "node" / script), *args],
        env={**os.environ, "OPENAI_NODE_MODULES": str(NODE_MODULES)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL server for the session (tests/postgres_server.py); skips
    where PostgreSQL is not installed (.ci/run installs it)."""
    from tests.postgres_server import PostgresServer, find_bin_dir

    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.skip("needs PostgreSQL's binaries (Debian: apt-get install postgresql; done by .ci/run)")
    server = PostgresServer(bin_dir).start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """A fresh accounts database URL, once per backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'nested' / 'dir' / 'accounts.db'}"
    return request.getfixturevalue("postgres").create_database()
