"""The S3 image store against real S3-compatible HTTP servers started by the tests.

moto's server mode (PyPI ``moto[server]``) serves put, presign and GET but checks neither
signatures nor expiry, so expiry is checked there through what the URL says; s3rver
(npm) does enforce expiry and is used for the real thing when node and the package are
present (``npm install --prefix .cache/s3rver s3rver@3.7.1``, or set ``S3RVER_JS``).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import time
from calendar import timegm
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import boto3
import httpx
import pytest

from serve_app.config import S3StorageConfig
from serve_app.storage import StorageError
from serve_app.storage.s3 import S3ImageStore

REPO = Path(__file__).resolve().parents[1]
S3RVER_JS = Path(os.environ.get("S3RVER_JS") or REPO / ".cache/s3rver/node_modules/s3rver/bin/s3rver.js")
ACCESS_KEY, SECRET_KEY = "AKIDSTORAGETEST", "storage-test-secret-never-shown"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """boto3's standard chain finds these credentials and nothing from the host."""
    for name in (
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_CA_BUNDLE",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    pytest.importorskip("moto.server", reason="needs moto[server]")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def make_bucket(endpoint: str, bucket: str) -> None:
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    client.close()


def store_for(endpoint: str, bucket: str, ttl: int, prefix: str = "images/") -> S3ImageStore:
    config = S3StorageConfig(bucket=bucket, prefix=prefix, region="us-east-1", endpoint_url=endpoint)
    return S3ImageStore(config, url_ttl_s=ttl)


def put(store: S3ImageStore, name: str, data: bytes, content_type: str) -> str:
    return asyncio.run(store.put(name, data, content_type, "http://ignored-by-s3"))


def test_endpoint_and_credentials_from_the_environment(aws_env, moto_endpoint: str, monkeypatch) -> None:
    """As serve_config.gpu.yaml runs it: no endpoint in the config, boto3's variables set
    on the node; a custom endpoint gets path-style URLs (no wildcard DNS needed)."""
    make_bucket(moto_endpoint, "images-env")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_endpoint)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    store = S3ImageStore(S3StorageConfig(bucket="images-env"), url_ttl_s=60)
    url = put(store, "req_env/0.png", PNG, "image/png")
    assert url.startswith(f"{moto_endpoint}/images-env/images/req_env/0-")
    assert httpx.get(url).content == PNG
    asyncio.run(store.close())


def signed_at(url: str) -> int:
    date = parse_qs(urlsplit(url).query)["X-Amz-Date"][0]
    return timegm(time.strptime(date, "%Y%m%dT%H%M%SZ"))


@pytest.mark.parametrize(
    ("ext", "content_type"), [("png", "image/png"), ("jpeg", "image/jpeg"), ("webp", "image/webp")]
)
def test_put_then_fetch_the_presigned_url(aws_env, moto_endpoint: str, ext: str, content_type: str) -> None:
    make_bucket(moto_endpoint, f"images-{ext}")
    store = store_for(moto_endpoint, f"images-{ext}", ttl=900)
    data = PNG + ext.encode()

    url = put(store, f"req_abc/0.{ext}", data, content_type)

    split = urlsplit(url)
    key = unquote(split.path).removeprefix(f"/images-{ext}/")
    assert re.fullmatch(rf"images/req_abc/0-[A-Za-z0-9_-]{{22}}\.{ext}", key)
    query = parse_qs(split.query)
    assert query["X-Amz-Expires"] == ["900"]  # moto does not enforce it; the URL must say it
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    assert abs(signed_at(url) - time.time()) < 60
    assert SECRET_KEY not in url

    response = httpx.get(url)
    assert response.status_code == 200
    assert response.content == data
    assert response.headers["content-type"] == content_type
    asyncio.run(store.close())


def test_each_put_is_a_distinct_object(aws_env, moto_endpoint: str) -> None:
    make_bucket(moto_endpoint, "images-distinct")
    store = store_for(moto_endpoint, "images-distinct", ttl=60, prefix="")
    urls = {put(store, "req_1/0.png", PNG, "image/png") for _ in range(2)}
    assert len(urls) == 2
    assert all(urlsplit(u).path.startswith("/images-distinct/req_1/0-") for u in urls)


def test_a_store_failure_is_a_storage_error_without_secrets(aws_env, moto_endpoint: str) -> None:
    store = store_for(moto_endpoint, "no-such-bucket", ttl=60)
    with pytest.raises(StorageError) as info:
        put(store, "req_1/0.png", PNG, "image/png")
    error = info.value
    assert error.status_code == 502 and error.code == "upstream_error"
    assert "NoSuchBucket" in error.detail  # for the log
    for text in (error.message, str(error), repr(error)):
        assert SECRET_KEY not in text and ACCESS_KEY not in text
    assert "no-such-bucket" not in error.message and moto_endpoint not in error.message


# -- s3rver: a server that enforces presigned URL expiry -----------------------------------


@pytest.fixture(scope="module")
def s3rver_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    node = shutil.which("node")
    if node is None or not S3RVER_JS.is_file():
        pytest.skip("needs node and s3rver: `npm install --prefix .cache/s3rver s3rver@3.7.1` (or set S3RVER_JS)")
    data = tmp_path_factory.mktemp("s3rver")
    process = subprocess.Popen(
        [node, str(S3RVER_JS), "-d", str(data), "-a", "127.0.0.1", "-p", "0", "--configure-bucket", "images"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        port = None
        while port is None and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            match = re.search(r"listening on [\d.]+:(\d+)", line)
            port = match and match.group(1)
        if port is None:
            pytest.fail("s3rver did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def s3rver_env(aws_env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "S3RVER")  # s3rver's built-in account
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "S3RVER")


def test_presigned_url_expires_on_a_server_that_enforces_it(s3rver_env, s3rver_endpoint: str) -> None:
    ttl = 2
    store = store_for(s3rver_endpoint, "images", ttl=ttl)
    url = put(store, "req_exp/0.png", PNG, "image/png")
    assert parse_qs(urlsplit(url).query)["X-Amz-Expires"] == [str(ttl)]

    fresh = httpx.get(url)
    assert fresh.status_code == 200, fresh.text
    assert fresh.content == PNG and fresh.headers["content-type"] == "image/png"

    # (s3rver checks the access key and the expiry of a presigned URL, not its signature.)
    time.sleep(max(0.0, signed_at(url) + ttl + 1.2 - time.time()))
    expired = httpx.get(url)
    assert expired.status_code == 403
    assert "expired" in expired.text


def test_rejected_credentials_are_a_storage_error(aws_env, s3rver_endpoint: str) -> None:
    store = store_for(s3rver_endpoint, "images", ttl=60)
    with pytest.raises(StorageError) as info:
        put(store, "req_1/0.png", PNG, "image/png")
    assert "InvalidAccessKeyId" in info.value.detail
    for text in (info.value.message, str(info.value)):
        assert ACCESS_KEY not in text and SECRET_KEY not in text
