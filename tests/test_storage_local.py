"""The local image store: signed, expiring URLs, traversal, retention, shared secret."""

from __future__ import annotations

import asyncio
import os
import stat
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from pydantic import ValidationError

from serve_app.config import LocalStorageConfig, S3StorageConfig, StorageConfig
from serve_app.errors import Forbidden, NotFound
from serve_app.storage import ROUTE_PREFIX, LocalImageStore, StorageError, build_image_store
from serve_app.storage.signing import SIGNING_KEY_FILE, load_or_create_secret

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
TTL = 60


def make_store(root: Path, ttl: int = TTL, **local) -> LocalImageStore:
    return LocalImageStore(LocalStorageConfig(root=root, **local), url_ttl_s=ttl)


def put(store: LocalImageStore, name: str = "req_1/0.png", data: bytes = PNG, base: str = "http://testserver") -> str:
    return asyncio.run(store.put(name, data, "image/png", base))


def parts(url: str) -> tuple[str, str, str]:
    """(name, expires, signature) the way the ingress route sees them."""
    split = urlsplit(url)
    assert split.path.startswith(ROUTE_PREFIX)
    query = parse_qs(split.query)
    return unquote(split.path[len(ROUTE_PREFIX) :]), query["expires"][0], query["signature"][0]


@pytest.fixture
def store(tmp_path: Path) -> LocalImageStore:
    return make_store(tmp_path / "images")


def test_put_writes_the_file_and_returns_a_signed_expiring_url(store: LocalImageStore) -> None:
    before = int(time.time())
    url = put(store, base="http://example.test:8000/")
    assert url.startswith("http://example.test:8000/v1/files/images/req_1/0-")
    name, expires, signature = parts(url)
    assert name.endswith(".png") and len(name) > len("req_1/0-.png") + 20  # 128 random bits
    assert before + TTL <= int(expires) <= int(time.time()) + TTL
    assert len(signature) == 64 and int(signature, 16) >= 0

    path, content_type = store.resolve(name, expires, signature)
    assert path.read_bytes() == PNG and content_type == "image/png"
    assert path.is_relative_to(store.root)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp file left


def test_each_put_gets_its_own_unguessable_name(store: LocalImageStore) -> None:
    names = {parts(put(store))[0] for _ in range(3)}
    assert len(names) == 3


def test_public_base_url_wins_over_the_request_base(tmp_path: Path) -> None:
    store = make_store(tmp_path, public_base_url="https://images.example.com/api/")
    assert put(store, base="http://10.0.0.5:8000").startswith("https://images.example.com/api/v1/files/images/")


@pytest.mark.parametrize(
    ("ext", "content_type"), [("png", "image/png"), ("jpeg", "image/jpeg"), ("webp", "image/webp")]
)
def test_content_type_follows_the_format(store: LocalImageStore, ext: str, content_type: str) -> None:
    name, expires, signature = parts(put(store, f"req_1/0.{ext}"))
    assert store.resolve(name, expires, signature)[1] == content_type


def test_tampered_urls_are_forbidden(store: LocalImageStore) -> None:
    name, expires, signature = parts(put(store))
    other_name, _, _ = parts(put(store, "req_1/1.png"))
    flipped = ("0" if signature[0] != "0" else "1") + signature[1:]
    for bad in [
        (name, expires, flipped),  # altered signature
        (name, str(int(expires) + 3600), signature),  # extended expiry
        (other_name, expires, signature),  # signature of another file
        (name, expires, ""),  # no signature
        (name, expires, None),
        (name, None, signature),  # no expiry
        (name, "soon", signature),
        (name, f"+{expires}", signature),  # only plain digits
        (name, f"{expires[:4]}_{expires[4:]}", signature),
        (name, expires, signature[:-2]),  # truncated
        (name, expires, "é" * 64),  # non-ASCII
    ]:
        with pytest.raises(Forbidden) as info:
            store.resolve(*bad)
        assert info.value.status_code == 403 and signature not in info.value.message
    assert store.resolve(name, expires, signature.upper())[0].is_file()  # hex is hex


def test_expired_url_is_forbidden(store: LocalImageStore) -> None:
    name, expires, signature = parts(put(store))
    assert store.resolve(name, expires, signature, now=int(expires))[0].is_file()
    with pytest.raises(Forbidden, match="expired"):
        store.resolve(name, expires, signature, now=int(expires) + 1)


def test_a_url_from_a_store_with_another_secret_is_forbidden(tmp_path: Path) -> None:
    name, expires, signature = parts(put(make_store(tmp_path)))
    with pytest.raises(Forbidden):
        make_store(tmp_path, signing_secret="another secret of enough length").resolve(name, expires, signature)


@pytest.mark.parametrize(
    "name",
    [
        "../outside.png",
        "req_1/../../outside.png",
        "/etc/passwd",
        "req_1//0.png",
        "req_1/./0.png",
        SIGNING_KEY_FILE,
        "req_1/.tmp-abc",
        "%2e%2e/outside.png",
        "req_1\\..\\0.png",
        "",
        "a/" * 20 + "x.png",
    ],
)
def test_traversal_and_hidden_names_are_rejected_even_when_signed(store: LocalImageStore, name: str) -> None:
    (store.root.parent / "outside.png").write_bytes(b"secret")
    expires = int(time.time()) + 60
    with pytest.raises(NotFound):
        store.resolve(name, expires, store._signer.signature(name, expires))
    # The store never writes outside its root, whatever name (or client-chosen request id)
    # the caller passes: unsafe parts are cleaned, not trusted.
    stored, expires, signature = parts(put(store, name))
    path, _ = store.resolve(stored, expires, signature)
    assert path.is_relative_to(store.root) and path.read_bytes() == PNG
    assert (store.root.parent / "outside.png").read_bytes() == b"secret"


def test_a_symlink_out_of_the_root_is_not_followed(store: LocalImageStore) -> None:
    outside = store.root.parent / "outside.png"
    outside.write_bytes(b"secret")
    (store.root / "req_1").mkdir()
    (store.root / "req_1" / "link.png").symlink_to(outside)
    expires = int(time.time()) + 60
    with pytest.raises(NotFound):
        store.resolve("req_1/link.png", expires, store._signer.signature("req_1/link.png", expires))


def test_a_swept_or_never_stored_file_is_not_found(store: LocalImageStore) -> None:
    name, expires, signature = parts(put(store))
    (store.root / name).unlink()
    with pytest.raises(NotFound):
        store.resolve(name, expires, signature)


def test_sweep_deletes_only_files_whose_urls_have_expired(store: LocalImageStore) -> None:
    old_name, _, _ = parts(put(store, "req_old/0.png"))
    new_name, _, _ = parts(put(store, "req_new/0.png"))
    now = time.time()
    os.utime(store.root / old_name, (now - TTL - 5, now - TTL - 5))
    stale_tmp = store.root / "req_new" / ".tmp-crashed"
    stale_tmp.write_bytes(b"partial")
    os.utime(stale_tmp, (now - TTL - 5, now - TTL - 5))
    key = store.root / SIGNING_KEY_FILE
    os.utime(key, (now - 10 * TTL, now - 10 * TTL))

    assert store.sweep(now) == 2
    assert not (store.root / "req_old").exists()  # emptied folder removed too
    assert (store.root / new_name).is_file() and not stale_tmp.exists()
    assert key.is_file()

    assert store.sweep(now + TTL + 1) == 1
    assert sorted(p.name for p in store.root.iterdir()) == [SIGNING_KEY_FILE]
    put(store, "req_new/1.png")  # writing into a swept folder works


def test_sweep_never_deletes_a_file_whose_url_still_works(store: LocalImageStore) -> None:
    name, expires, signature = parts(put(store))
    assert store.sweep(int(expires)) == 0
    assert store.resolve(name, expires, signature, now=int(expires))[0].is_file()
    assert store.sweep(int(expires) + 2) == 1


def test_background_sweeper_runs_until_close(tmp_path: Path) -> None:
    store = make_store(tmp_path, sweep_interval_s=0.02)

    async def scenario() -> None:
        name = parts(await store.put("req_1/0.png", PNG, "image/png", "http://t"))[0]
        os.utime(store.root / name, (time.time() - TTL - 1,) * 2)
        task = store.start_sweeper()
        assert store.start_sweeper() is task  # idempotent
        for _ in range(200):
            if not (store.root / name).exists():
                break
            await asyncio.sleep(0.01)
        assert not (store.root / name).exists()
        await store.close()
        assert task.cancelled()

    asyncio.run(scenario())


def test_the_generated_secret_is_shared_by_every_store_on_the_root(tmp_path: Path) -> None:
    first, second = make_store(tmp_path), make_store(tmp_path)
    key = tmp_path / SIGNING_KEY_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    name, expires, signature = parts(put(first))
    assert second.resolve(name, expires, signature)[0].read_bytes() == PNG  # another replica
    assert make_store(tmp_path).resolve(name, expires, signature)  # after a restart


def test_concurrent_first_start_agrees_on_one_secret(tmp_path: Path) -> None:
    results: list[bytes] = []
    barrier = threading.Barrier(8)

    def start() -> None:
        barrier.wait()
        results.append(load_or_create_secret(tmp_path))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8 and len(set(results)) == 1 and len(results[0]) == 32
    assert [p.name for p in tmp_path.iterdir()] == [SIGNING_KEY_FILE]  # no temp files left


def test_a_configured_secret_is_used_and_no_key_file_is_written(tmp_path: Path) -> None:
    a = make_store(tmp_path, signing_secret="0123456789abcdef-configured")
    b = make_store(tmp_path, signing_secret="0123456789abcdef-configured")
    assert not (tmp_path / SIGNING_KEY_FILE).exists()
    assert b.resolve(*parts(put(a)))


def test_a_write_failure_is_a_storage_error(store: LocalImageStore) -> None:
    (store.root / "req_x").write_bytes(b"a file where a folder should be")
    with pytest.raises(StorageError) as info:
        put(store, "req_x/0.png")
    assert info.value.status_code == 502 and str(store.root) not in info.value.message


def test_build_image_store_picks_the_backend(tmp_path: Path) -> None:
    local = build_image_store(StorageConfig(url_ttl_s=120, local=LocalStorageConfig(root=tmp_path)))
    assert isinstance(local, LocalImageStore) and local.url_ttl_s == 120
    s3 = build_image_store(StorageConfig(backend="s3", s3=S3StorageConfig(bucket="bucket", region="us-east-1")))
    assert type(s3).__name__ == "S3ImageStore" and s3.url_ttl_s == 3600
    with pytest.raises(ValidationError, match="7 days"):
        StorageConfig(backend="s3", url_ttl_s=8 * 24 * 3600, s3=S3StorageConfig(bucket="bucket"))
