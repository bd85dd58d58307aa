"""Shared fixtures: one Ray instance and one served application for the whole session."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
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


@pytest.fixture(scope="session")
def ray_session():
    """The one Ray instance of the test session (never `ray stop`: we stop what we started)."""
    import ray
    from ray import serve

    ray.init(num_cpus=4, include_dashboard=False, namespace="imagegen-tests")
    yield ray
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def served(ray_session, tmp_path_factory):
    """The embedded default config, served on a free port, with its own database."""
    from ray import serve

    from serve_app.app import build_app
    from serve_app.config import load_app_config

    data = tmp_path_factory.mktemp("served")
    base = load_app_config(ROOT / "serve_config.yaml")
    config = base.model_copy(
        update={
            "cache_dir": MODEL_CACHE,
            "accounts": base.accounts.model_copy(update={"database_url": f"sqlite:///{data}/imagegen.db"}),
            "storage": base.storage.model_copy(
                update={"local": base.storage.local.model_copy(update={"root": data / "images"})}
            ),
        }
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config), name="imagegen", route_prefix="/")
    yield Served(config=config, base_url=f"http://127.0.0.1:{port}", database_url=config.accounts.database_url)
    serve.delete("imagegen")


class Served:
    def __init__(self, config, base_url: str, database_url: str) -> None:
        self.config = config
        self.base_url = base_url
        self.database_url = database_url
        self._key_count = 0

    def create_key(self, credits: str = "1000", *extra: str) -> str:
        """A fresh key through the operator CLI, as an operator would make one."""
        self._key_count += 1
        output = run_cli("keys", "create", "--name", f"key-{self._key_count}-{os.getpid()}", "--credits", credits, *extra,
                         database_url=self.database_url)
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
