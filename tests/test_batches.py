"""The Batch API against fakes: real accounts and batch rows (SQLite), the real service and
runner, a fake model router, image storage in a dict and files in a folder.

What must hold: a key sees only its own files and batches; malformed input lines are a 400
naming them; every line runs through the one request lifecycle at the batch price; output and
error files carry OpenAI's line shape; and a runner killed at any point loses nothing, runs no
line twice and charges none twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time

import openai.types as oai
import pytest

from serve_app.accounts import Accounts, LocalRateLimiter, issue_key, open_store
from serve_app.accounts.records import IdempotencyClaim
from serve_app.batches.runner import BatchRunner
from serve_app.batches.service import BatchService
from serve_app.batches.store import BatchStore
from serve_app.config import CREDIT_UNITS, AppConfig, LocalStorageConfig
from serve_app.errors import InvalidRequest, NotFound
from serve_app.protocol import ImagesResponse
from serve_app.serving import ImageGenerationService
from serve_app.storage import LocalImageStore, StorageError
from tests.fakes import FakeRouter, FakeStore

CONFIG = AppConfig.model_validate(
    {
        "models": [
            {
                "id": "m",
                "family": "sdxl",
                "weights": "builtin:tiny-sdxl",
                "defaults": {"size": "64x64", "steps": 2},
                "limits": {"max_pixels": 65536, "min_side": 32},
                "batching": {"max_batch_images": 2},
                "price_per_image": "1.5",
            }
        ],
        "batches": {"lease_s": 1, "retry_after_s": 0.05, "max_concurrent_lines": 3},
        "files": {"max_lines": 10},
    }
)


class World:
    def __init__(self, tmp_path, router=None, database_url=None):
        self.store = open_store(database_url or f"sqlite:///{tmp_path}/ledger.db")
        self.accounts = Accounts(self.store, default_rpm=1, default_ipm=1, rate_limiter=LocalRateLimiter())
        self.router = router or FakeRouter()
        self.images = FakeStore()
        self.files = LocalImageStore(LocalStorageConfig(root=tmp_path / "files"), 3600)
        self.batch_store = BatchStore(self.store)
        self.batches = BatchService(CONFIG, self.batch_store, self.files)
        # Edits read their file_id inputs through the Files API, as in the ingress.
        self.service = ImageGenerationService(CONFIG, self.router, self.accounts, store=self.images, files=self.batches)

    def runner(self, owner="replica-a", files=None, service=None):
        return BatchRunner(
            CONFIG, service or self.service, self.store, self.batch_store, files or self.files, owner=owner
        )

    def key(self, name="k", credits=100):
        secret = issue_key(self.store, name, credits_units=int(credits * CREDIT_UNITS)).secret
        return asyncio.run(self.accounts.authenticate(f"Bearer {secret}"))

    def balance(self, key):
        return self.store.key_by_id(key.id).balance_units / CREDIT_UNITS

    def close(self):
        self.batches.close()
        self.accounts.close()


@pytest.fixture
def world(tmp_path, database_url):
    """Over SQLite and PostgreSQL (where PostgreSQL is installed)."""
    world = World(tmp_path, database_url=database_url)
    yield world
    world.close()


def line(custom_id, url="/v1/images/generations", **body):
    body = {"model": "m", "prompt": "an apple", **body}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def jsonl(*lines):
    return ("\n".join(lines) + "\n").encode()


def upload(world, key, data, purpose="batch"):
    return asyncio.run(world.batches.upload_file(key, "requests.jsonl", purpose, data))


def create(world, key, file_id, endpoint="/v1/images/generations", **extra):
    payload = {"input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h", **extra}
    return asyncio.run(world.batches.create_batch(key, payload))


def run_all(runner):
    asyncio.run(runner.drain())


def step_and_wait(runner):
    """One runner round, and the lines it started run to their end."""

    async def scenario():
        await runner.step()
        while runner._running:
            await asyncio.wait(list(runner._running.values()))

    asyncio.run(scenario())


def content(world, key, file_id):
    return [json.loads(text) for text in asyncio.run(world.batches.file_content(key, file_id)).decode().splitlines()]


def as_openai(model, obj):
    """Validated by openai-python's own type, strictly (no field it does not know)."""
    data = obj.model_dump()
    parsed = model.model_validate(data)
    assert set(data) <= set(type(parsed).model_fields), set(data) - set(type(parsed).model_fields)
    return parsed


# -- files ---------------------------------------------------------------------------------
def test_upload_list_retrieve_download_delete(world):
    key, other = world.key("a"), world.key("b")
    data = jsonl(line("r1"), line("r2", n=2))
    uploaded = upload(world, key, data)
    parsed = as_openai(oai.FileObject, uploaded)
    assert (parsed.purpose, parsed.bytes, parsed.filename, parsed.status) == (
        "batch",
        len(data),
        "requests.jsonl",
        "processed",
    )
    assert parsed.expires_at == parsed.created_at + CONFIG.files.retention_s
    assert asyncio.run(world.batches.retrieve_file(key, uploaded.id)) == uploaded
    assert asyncio.run(world.batches.file_content(key, uploaded.id)) == data
    # Bytes in the file store's own folder, not with the images.
    assert list((world.files.root).glob("file-*.jsonl"))

    second = upload(world, key, jsonl(line("x")))
    listed = asyncio.run(world.batches.list_files(key, after=None, limit=None, order=None, purpose=None))
    assert [f.id for f in listed.data] == [second.id, uploaded.id] and not listed.has_more
    page = asyncio.run(world.batches.list_files(key, after=None, limit="1", order="asc", purpose="batch"))
    assert [f.id for f in page.data] == [uploaded.id] and page.has_more
    rest = asyncio.run(world.batches.list_files(key, after=uploaded.id, limit="1", order="asc", purpose=None))
    assert [f.id for f in rest.data] == [second.id] and not rest.has_more

    # Another key sees none of it.
    for call in (world.batches.retrieve_file, world.batches.file_content, world.batches.delete_file):
        with pytest.raises(NotFound):
            asyncio.run(call(other, uploaded.id))
    assert asyncio.run(world.batches.list_files(other, after=None, limit=None, order=None, purpose=None)).data == []

    deleted = asyncio.run(world.batches.delete_file(key, uploaded.id))
    assert as_openai(oai.FileDeleted, deleted).deleted
    with pytest.raises(NotFound):
        asyncio.run(world.batches.retrieve_file(key, uploaded.id))
    assert len(list(world.files.root.glob("file-*.jsonl"))) == 1


def test_every_malformed_line_is_named(world):
    key = world.key()
    bad = jsonl(
        line("ok"),
        "not json",
        "[1]",
        json.dumps({"custom_id": "x", "method": "GET", "url": "/v1/images/generations", "body": {}}),
        json.dumps({"custom_id": "y", "method": "POST", "url": "/v1/chat/completions", "body": {}}),
        line("ok"),
        json.dumps({"method": "POST", "url": "/v1/images/generations", "body": {}}),
        json.dumps({"custom_id": "z", "method": "POST", "url": "/v1/images/generations", "body": {}, "extra": 1}),
    )
    with pytest.raises(InvalidRequest) as caught:
        upload(world, key, bad)
    message = caught.value.message
    assert caught.value.param == "file"
    for number in (2, 3, 4, 5, 6, 7, 8):
        assert f"line {number}:" in message
    assert "line 1:" not in message and "duplicates line 1" in message and "'extra'" in message
    with pytest.raises(InvalidRequest, match="at most 10"):
        upload(world, key, jsonl(*(line(f"r{i}") for i in range(11))))
    with pytest.raises(InvalidRequest, match="no requests"):
        upload(world, key, b"\n\n")
    with pytest.raises(InvalidRequest, match="purpose"):
        upload(world, key, jsonl(line("r")), purpose="fine-tune")
    with pytest.raises(InvalidRequest, match="UTF-8"):
        upload(world, key, b"\xff\xfe")


def test_image_files_for_edits(world):
    """purpose vision / user_data keeps a PNG, JPEG or WEBP still image, checked from its
    header within the input-image limits of the most generous model; per key, as any file."""
    import os

    from PIL import Image

    from serve_app.batches.service import image_upload_policy

    key = world.key()
    kept = {}
    for purpose, fmt in (("vision", "PNG"), ("user_data", "JPEG"), ("vision", "WEBP")):
        data = image_bytes(fmt=fmt)
        uploaded = as_openai(
            oai.FileObject, asyncio.run(world.batches.upload_file(key, f"photo.{fmt.lower()}", purpose, data))
        )
        assert (uploaded.purpose, uploaded.bytes, uploaded.filename) == (purpose, len(data), f"photo.{fmt.lower()}")
        assert asyncio.run(world.batches.file_content(key, uploaded.id)) == data
        kept[uploaded.id] = fmt
    assert sorted(path.suffix for path in world.files.root.glob("file-*")) == [".jpg", ".png", ".webp"]
    unnamed = asyncio.run(world.batches.upload_file(key, "", "vision", image_bytes()))
    assert unnamed.filename == "file.png"
    listed = asyncio.run(world.batches.list_files(key, after=None, limit=None, order=None, purpose="vision"))
    assert {f.id for f in listed.data} == {unnamed.id} | {i for i, fmt in kept.items() if fmt != "JPEG"}
    # An image file is no batch's input.
    with pytest.raises(InvalidRequest, match="purpose batch"):
        create(world, key, unnamed.id)

    def refused(data, purpose="vision", service=None):
        with pytest.raises(InvalidRequest) as caught:
            asyncio.run((service or world.batches).upload_file(key, "x", purpose, data))
        assert caught.value.param == "file", caught.value
        return caught.value.message

    assert "PNG, JPEG or WEBP" in refused(jsonl(line("r")))
    assert "PNG, JPEG or WEBP" in refused(image_bytes(fmt="GIF"), purpose="user_data")
    assert "PNG, JPEG or WEBP" in refused(image_bytes(fmt="TIFF"))
    assert "empty" in refused(b"")
    frames = image_bytes(fmt="PNG", save_all=True, append_images=[Image.new("RGB", (64, 64))])
    assert "animated" in refused(frames)
    # Pixels from the header, without decoding: the default 4096 x 4096 of input images.
    assert image_upload_policy(CONFIG).max_pixels == 4096 * 4096
    assert "pixels" in refused(image_bytes(size=(5000, 4000)))
    # Bytes: the largest limits.max_input_image_bytes of the configured models.
    models = [
        {**CONFIG.models[0].model_dump(mode="json"), "id": f"m{i}", "limits": {"max_input_image_bytes": most}}
        for i, most in enumerate((2048, 4096))
    ]
    small = AppConfig.model_validate({**CONFIG.model_dump(mode="json", exclude={"models"}), "models": models})
    assert image_upload_policy(small).max_bytes == 4096
    service = BatchService(small, world.batch_store, world.files)
    try:
        small_png = image_bytes()
        assert asyncio.run(service.upload_file(key, "x", "vision", small_png)).bytes == len(small_png) <= 4096
        assert "larger than 4096 bytes" in refused(b"\x89PNG" + os.urandom(5000), service=service)
    finally:
        service.close()


# -- batches -------------------------------------------------------------------------------
def test_a_batch_runs_every_line_at_the_batch_price(world):
    world.router.flag_seeds = {7}  # the safety checker withholds the image of seed 7
    key = world.key(credits=100)
    source = upload(
        world,
        key,
        jsonl(
            line("two", n=2, seed=1),
            line("bad-size", size="13x13"),
            line("flagged", seed=7),
            line("unknown-model", model="nope"),
            line("streamed", stream=True),
        ),
    )
    batch = create(world, key, source.id, metadata={"project": "catalogue"})
    parsed = as_openai(oai.Batch, batch)
    assert parsed.status == "in_progress" and parsed.request_counts.total == 5 and parsed.model is None
    assert parsed.metadata == {"project": "catalogue"} and parsed.expires_at == parsed.created_at + 86400

    run_all(world.runner())
    done = as_openai(oai.Batch, asyncio.run(world.batches.retrieve_batch(key, batch.id)))
    assert done.status == "completed" and done.completed_at and done.finalizing_at
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (5, 1, 4)

    outputs = content(world, key, done.output_file_id)
    assert [o["custom_id"] for o in outputs] == ["two"]
    response = outputs[0]["response"]
    assert response["status_code"] == 200 and response["request_id"].startswith("req_") and outputs[0]["error"] is None
    images = ImagesResponse.model_validate(response["body"])
    assert [item.seed for item in images.data] == [1, 2] and images.data[0].b64_json
    assert oai.ImagesResponse.model_validate(response["body"]).data[0].b64_json

    errors = {e["custom_id"]: e for e in content(world, key, done.error_file_id)}
    assert set(errors) == {"bad-size", "flagged", "unknown-model", "streamed"}
    assert errors["bad-size"]["response"]["status_code"] == 400
    assert errors["bad-size"]["response"]["body"]["error"]["param"] == "size"
    assert errors["flagged"]["response"]["body"]["error"]["code"] == "content_policy_violation"
    assert errors["unknown-model"]["response"]["status_code"] == 404
    assert errors["streamed"]["response"]["body"]["error"]["param"] == "stream"
    for entry in errors.values():
        assert (
            entry["error"] is None
            and entry["response"]["request_id"] == entry["response"]["body"]["error"]["request_id"]
        )

    # 2 images at half of 1.5; the key's rpm of 1 did not hold the batch back.
    assert world.balance(key) == pytest.approx(100 - 2 * 0.75)
    assert world.store.inconsistencies() == []
    output_file = as_openai(oai.FileObject, asyncio.run(world.batches.retrieve_file(key, done.output_file_id)))
    assert output_file.purpose == "batch_output" and output_file.filename == f"{batch.id}_output.jsonl"
    # The per-line results were folded into the files and removed.
    assert not list((world.files.root / batch.id).glob("*")) if (world.files.root / batch.id).exists() else True
    # Batch jobs went to the model in the batch lane.
    assert {job.priority for job in world.router.jobs} == {"batch"}


def image_bytes(size=(64, 64), colour=(200, 30, 30), fmt="PNG", **options) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, fmt, **options)
    return buffer.getvalue()


def test_edit_lines_take_the_json_form_of_v1_images_edits(world):
    """A batch edit line is read as POST /v1/images/edits reads JSON: data URLs, file_ids of
    the line's own key (purpose vision or user_data), URLs only from allowed hosts."""
    import base64

    data = image_bytes()
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    key, other = world.key("a"), world.key("b")
    mine = upload(world, key, data, purpose="vision")
    theirs = upload(world, other, data, purpose="user_data")
    requests = upload(world, key, jsonl(line("r")))  # a batch input file is no image
    edits = "/v1/images/edits"
    source = upload(
        world,
        key,
        jsonl(
            line("edit", url=edits, images=[{"image_url": url}], seed=3),
            line("by-file", url=edits, images=[{"file_id": mine.id}], seed=3),
            line("unknown-file", url=edits, images=[{"file_id": "file-abc"}]),
            line("other-keys-file", url=edits, images=[{"file_id": theirs.id}]),
            line("batch-file", url=edits, images=[{"file_id": requests.id}]),
            line("http", url=edits, images=[{"image_url": "https://images.example/a.png"}]),
            line("no-image", url=edits),
            line("two-images", url=edits, images=[{"image_url": url}, {"file_id": mine.id}]),
        ),
    )
    batch = create(world, key, source.id, endpoint=edits)
    assert batch.model == "m"
    run_all(world.runner())
    done = asyncio.run(world.batches.retrieve_batch(key, batch.id))
    assert sorted(o["custom_id"] for o in content(world, key, done.output_file_id)) == ["by-file", "edit"]
    errors = {e["custom_id"]: e["response"]["body"]["error"] for e in content(world, key, done.error_file_id)}
    assert {name: error["param"] for name, error in errors.items()} == {
        "unknown-file": "images[0].file_id",
        "other-keys-file": "images[0].file_id",
        "batch-file": "images[0].file_id",
        "http": "images[0].image_url",
        "no-image": "images",
        "two-images": "images",  # sdxl takes one image, as on /v1/images/edits
    }
    assert "purpose 'batch'" in errors["batch-file"]["message"]
    assert "operator allows" in errors["http"]["message"]
    by_url, by_file = world.router.jobs
    assert by_url.shape.mode.value == by_file.shape.mode.value == "image-to-image"
    assert by_url.image == by_file.image and by_url.seeds == by_file.seeds


def test_an_image_file_is_decoded_when_an_edit_uses_it(world):
    """The upload reads the header only; the pixels are decoded by the edit, after the
    reservation, under the decoding budget: a truncated image is that edit's 400, refunded."""
    data = image_bytes(size=(64, 64), fmt="PNG", compress_level=0)
    key = world.key(credits=10)
    truncated = asyncio.run(world.batches.upload_file(key, "cut.png", "vision", data[: len(data) // 2]))
    body = {"model": "m", "prompt": "x", "images": [{"file_id": truncated.id}]}
    with pytest.raises(InvalidRequest) as caught:
        asyncio.run(world.service.edit(key, body, request_id="req-cut", base_url=None))
    assert caught.value.param == "images[0].file_id" and "corrupt or truncated" in caught.value.message
    assert world.balance(key) == 10 and world.router.jobs == []


def test_create_refusals_and_a_mismatched_endpoint(world):
    key, other = world.key("a"), world.key("b")
    source = upload(world, key, jsonl(line("g"), line("e", url="/v1/images/edits")))
    with pytest.raises(NotFound):
        create(world, other, source.id)
    with pytest.raises(InvalidRequest, match="endpoint"):
        create(world, key, source.id, endpoint="/v1/chat/completions")
    with pytest.raises(InvalidRequest, match="completion_window"):
        create(world, key, source.id, completion_window="1h")
    with pytest.raises(InvalidRequest, match="metadata"):
        create(world, key, source.id, metadata={"k" * 65: "v"})
    failed = as_openai(oai.Batch, create(world, key, source.id))
    assert failed.status == "failed" and failed.failed_at and failed.request_counts.total == 0
    assert [(e.line, e.param) for e in failed.errors.data] == [(2, "url")]


def test_list_and_cancel(world):
    key, other = world.key("a"), world.key("b")
    source = upload(world, key, jsonl(*(line(f"r{i}") for i in range(4))))
    first, second, third = (create(world, key, source.id) for _ in range(3))
    listed = asyncio.run(world.batches.list_batches(key, after=None, limit="2"))
    assert [b.id for b in listed.data] == [third.id, second.id] and listed.has_more
    page = asyncio.run(world.batches.list_batches(key, after=second.id, limit=None))
    assert [b.id for b in page.data] == [first.id] and not page.has_more
    assert asyncio.run(world.batches.list_batches(other, after=None, limit=None)).data == []
    with pytest.raises(NotFound):
        asyncio.run(world.batches.cancel_batch(other, first.id))

    cancelled = as_openai(oai.Batch, asyncio.run(world.batches.cancel_batch(key, first.id)))
    assert cancelled.status == "cancelling" and cancelled.cancelling_at
    asyncio.run(world.batches.cancel_batch(key, second.id))
    asyncio.run(world.batches.cancel_batch(key, third.id))
    run_all(world.runner())
    ended = as_openai(oai.Batch, asyncio.run(world.batches.retrieve_batch(key, first.id)))
    assert ended.status == "cancelled" and ended.cancelled_at and ended.output_file_id is None
    assert {e["error"]["code"] for e in content(world, key, ended.error_file_id)} == {"batch_cancelled"}
    assert world.router.calls == [] and world.balance(key) == 100  # nothing ran, nothing charged


def test_queued_lines_expire_with_the_completion_window(world, monkeypatch):
    key = world.key()
    source = upload(world, key, jsonl(line("late")))
    batch = create(world, key, source.id)
    monkeypatch.setattr(time, "time", lambda real=time.time: real() + 86400 + 1)
    run_all(world.runner())
    ended = asyncio.run(world.batches.retrieve_batch(key, batch.id))
    assert ended.status == "expired" and ended.expired_at
    assert [e["error"]["code"] for e in content(world, key, ended.error_file_id)] == ["batch_expired"]
    assert world.router.calls == []


# -- killed runners --------------------------------------------------------------------------
def test_lines_of_a_runner_that_died_are_taken_over(world):
    key = world.key()
    source = upload(world, key, jsonl(*(line(f"r{i}", seed=i) for i in range(4))))
    batch = create(world, key, source.id)
    # Runner A claims three lines and dies before it runs any of them.
    dead = world.batch_store.claim_lines("replica-a", 3, lease_s=1, max_attempts=3)
    assert len(dead) == 3
    survivor = world.runner("replica-b")
    step_and_wait(survivor)  # only the fourth is free while A's leases hold
    assert len(world.router.calls) == 1
    time.sleep(1.1)
    run_all(survivor)
    done = asyncio.run(world.batches.retrieve_batch(key, batch.id))
    assert done.status == "completed" and done.request_counts.completed == 4
    assert sorted(o["custom_id"] for o in content(world, key, done.output_file_id)) == [f"r{i}" for i in range(4)]
    assert len(world.router.jobs) == 4  # every line ran once
    assert world.balance(key) == pytest.approx(100 - 4 * 0.75)
    assert world.store.inconsistencies() == []


class FailingResults(LocalImageStore):
    """A file store that loses every line result it is asked to save: the runner dies
    between its line's settlement and the record of it."""

    async def save(self, name, data, content_type):
        if "/line-" in name:
            raise StorageError("the runner died here")
        return await super().save(name, data, content_type)


def test_a_line_charged_before_its_runner_died_is_replayed_not_charged_again(world, tmp_path):
    key = world.key()
    source = upload(world, key, jsonl(line("r0", n=2, seed=4), line("r1", seed=9)))
    batch = create(world, key, source.id)
    dying = world.runner("replica-a", files=FailingResults(LocalStorageConfig(root=world.files.root), 3600))
    step_and_wait(dying)
    assert len(world.router.jobs) >= 2  # both lines generated and were charged...
    charged = 100 - 3 * 0.75
    assert world.balance(key) == pytest.approx(charged)
    assert world.batch_store.line_states() == {"running": 2}  # ...but never recorded
    time.sleep(1.1)  # A's leases run out
    generated = len(world.router.jobs)
    run_all(world.runner("replica-b"))
    done = asyncio.run(world.batches.retrieve_batch(key, batch.id))
    assert done.status == "completed" and done.request_counts.completed == 2
    outputs = {o["custom_id"]: o for o in content(world, key, done.output_file_id)}
    assert [d["seed"] for d in outputs["r0"]["response"]["body"]["data"]] == [4, 5]
    assert outputs["r0"]["response"]["body"]["data"][0]["b64_json"]  # images replayed from storage
    assert len(world.router.jobs) == generated  # nothing generated twice
    assert world.balance(key) == pytest.approx(charged)  # nor charged twice
    assert world.store.inconsistencies() == []


def test_a_line_whose_runner_died_mid_generation_waits_for_its_refund(world):
    key = world.key()
    source = upload(world, key, jsonl(line("r0", seed=1)))
    batch = create(world, key, source.id)
    [claimed] = world.batch_store.claim_lines("replica-a", 1, lease_s=1, max_attempts=3)
    # Replica A reserved the line (with its Idempotency-Key) and died generating it.
    asked = hashlib.sha256(json.dumps(json.loads(claimed.body), sort_keys=True).encode()).hexdigest()
    claim = IdempotencyClaim(f"batch-line-{claimed.id}", asked, 3600)
    world.store.reserve(key.id, claimed.request_id, "m", 1, 750_000, owner="replica-a", claim=claim)
    time.sleep(1.1)
    survivor = world.runner("replica-b")
    step_and_wait(survivor)
    assert world.batch_store.line_states() == {"queued": 1}  # 409 in use: back to the queue
    world.store.release_orphaned(["replica-a"])  # the orphan sweep refunds A's reservation
    time.sleep(0.06)
    run_all(survivor)
    done = asyncio.run(world.batches.retrieve_batch(key, batch.id))
    assert done.status == "completed" and done.request_counts.completed == 1
    assert world.balance(key) == pytest.approx(100 - 0.75)
    assert world.store.inconsistencies() == []


def test_a_line_that_keeps_killing_its_runner_fails(world):
    key = world.key()
    source = upload(world, key, jsonl(line("poison")))
    batch = create(world, key, source.id)
    for _ in range(3):
        assert world.batch_store.claim_lines("replica-x", 1, lease_s=0.01, max_attempts=3)
        time.sleep(0.02)
    run_all(world.runner("replica-b"))
    done = asyncio.run(world.batches.retrieve_batch(key, batch.id))
    assert done.status == "completed" and done.request_counts.failed == 1
    assert [e["error"]["code"] for e in content(world, key, done.error_file_id)] == ["batch_request_failed"]
    assert world.router.calls == []


# -- the operator's CLI --------------------------------------------------------------------
def test_imagegen_batches_list_show_cancel(tmp_path, capsys):
    from serve_app import cli

    world = World(tmp_path)
    try:
        key = world.key("shop")
        source = upload(world, key, jsonl(line("r0"), line("r1")))
        batch = create(world, key, source.id)
        url = f"sqlite:///{tmp_path}/ledger.db"
        env = {"IMAGEGEN_DATABASE_URL": url}

        def imagegen(*args):
            with pytest.MonkeyPatch.context() as patch:
                for name, value in env.items():
                    patch.setenv(name, value)
                patch.chdir(tmp_path)
                status = cli.main(list(args))
            out = capsys.readouterr()
            assert status == 0, out.err
            return out.out

        listing = imagegen("batches", "list")
        assert batch.id in listing and "shop" in listing and "in_progress" in listing and "0/2" in listing
        shown = json.loads(imagegen("batches", "show", batch.id, "--json"))
        assert oai.Batch.model_validate(shown).request_counts.total == 2
        assert "requests: 2 total" in imagegen("batches", "show", batch.id)
        assert "Cancelling" in imagegen("batches", "cancel", batch.id)
        assert "nothing to cancel" not in imagegen("batches", "list", "--status", "cancelling")
        assert json.loads(imagegen("batches", "list", "--key", "shop", "--json"))[0]["status"] == "cancelling"
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("IMAGEGEN_DATABASE_URL", url)
            patch.chdir(tmp_path)
            assert cli.main(["batches", "show", "batch_nope"]) == 1
        assert "no batch" in capsys.readouterr().err
    finally:
        world.close()
