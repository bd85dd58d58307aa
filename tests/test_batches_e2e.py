"""The Batch API on the served embedded default, driven by the official Python SDK: upload,
create, poll, download; mixed lines; an edit batch; and an ingress killed mid-batch."""

from __future__ import annotations

import base64
import json
import time

import httpx
import numpy as np
import openai.types as oai
import pytest

from builtin_models.safety_checker import flag_pattern
from serve_app.accounts.store import open_store
from tests.test_extensions_e2e import data_uri
from tests.test_recovery import _ingress_actor, balance

pytestmark = pytest.mark.serve

FINAL = ("completed", "failed", "expired", "cancelled")


def request_line(custom_id: str, url: str = "/v1/images/generations", **body) -> str:
    body = {"model": "tiny-sdxl", "prompt": "a lighthouse", "num_inference_steps": 4, **body}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def submit(client, lines, endpoint="/v1/images/generations", **extra):
    data = ("\n".join(lines) + "\n").encode()
    uploaded = client.files.create(file=("requests.jsonl", data), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == len(data)
    return client.batches.create(input_file_id=uploaded.id, endpoint=endpoint, completion_window="24h", **extra)


def wait(client, batch_id, timeout_s=180.0, until=FINAL):
    deadline = time.monotonic() + timeout_s
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in until:
            return batch
        assert time.monotonic() < deadline, f"batch {batch_id} is still {batch.status}: {batch.request_counts}"
        time.sleep(0.5)


def lines_of(client, file_id):
    return [json.loads(text) for text in client.files.content(file_id).text.splitlines()]


def test_a_batch_of_mixed_lines_through_the_sdk(served):
    key = served.create_key("100")
    client = served.client(key)
    flagged = {
        "image": data_uri(flag_pattern(64, 64)),
        "strength": 0.5,
        "go_fast": False,
        "n": 2,
        "seed": 1,
        "prompt": "a picture",
    }
    batch = submit(
        client,
        [
            request_line("valid", n=2, seed=5),
            request_line("invalid", size="13x13"),
            request_line("flagged", **flagged),
            request_line("unknown-field", colour="red"),
        ],
        metadata={"project": "e2e"},
    )
    assert isinstance(batch, oai.Batch) and batch.status == "in_progress" and batch.metadata == {"project": "e2e"}
    assert batch.model == "tiny-sdxl" and batch.request_counts.total == 4
    done = wait(client, batch.id)
    assert done.status == "completed", done
    assert (done.request_counts.completed, done.request_counts.failed) == (1, 3)

    [output] = lines_of(client, done.output_file_id)
    assert output["custom_id"] == "valid" and output["error"] is None
    response = output["response"]
    assert response["status_code"] == 200 and response["request_id"]
    images = oai.ImagesResponse.model_validate(response["body"])
    assert [item.model_extra["seed"] for item in images.data] == [5, 6] and images.data[0].b64_json

    errors = {entry["custom_id"]: entry["response"] for entry in lines_of(client, done.error_file_id)}
    assert errors["invalid"]["status_code"] == 400 and errors["invalid"]["body"]["error"]["param"] == "size"
    assert errors["flagged"]["body"]["error"]["code"] == "content_policy_violation"
    assert errors["unknown-field"]["body"]["error"]["param"] == "colour"

    # Two images at half of the interactive price of 1; the failures cost nothing.
    assert balance(served, key) == 99
    files = client.files.list()
    assert {f.id for f in files.data} >= {done.input_file_id, done.output_file_id, done.error_file_id}
    assert client.batches.list().data[0].id == batch.id
    assert client.files.delete(done.input_file_id).deleted


def test_an_edit_batch_and_a_cancelled_one(served):
    from PIL import Image

    client = served.client(served.create_key("100"))
    photo = data_uri(Image.new("RGB", (64, 64), (30, 90, 200)))
    kept = client.files.create(file=("photo.png", base64.b64decode(photo.split(",", 1)[1])), purpose="vision")
    edit = {"seed": 2, "strength": 0.6}
    edits = submit(
        client,
        [
            request_line("edit", "/v1/images/edits", images=[{"image_url": photo}], **edit),
            request_line("by-file", "/v1/images/edits", images=[{"file_id": kept.id}], **edit),
            request_line("no-such-file", "/v1/images/edits", images=[{"file_id": "file-x"}]),
        ],
        endpoint="/v1/images/edits",
    )
    many = submit(client, [request_line(f"r{i}", seed=i, num_inference_steps=20) for i in range(8)])
    cancelling = client.batches.cancel(many.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = wait(client, edits.id)
    outputs = {line["custom_id"]: line["response"]["body"] for line in lines_of(client, done.output_file_id)}
    assert sorted(outputs) == ["by-file", "edit"]  # a file_id edits as its data URL does
    by_file, by_url = (_pixels(outputs[name]["data"][0]["b64_json"]) for name in ("by-file", "edit"))
    assert np.abs(by_file - by_url).max() <= 1
    [error] = lines_of(client, done.error_file_id)
    assert error["custom_id"] == "no-such-file"
    assert error["response"]["body"]["error"]["param"] == "images[0].file_id"
    cancelled = wait(client, many.id)
    assert cancelled.status == "cancelled" and cancelled.cancelled_at
    assert cancelled.request_counts.completed + cancelled.request_counts.failed == 8


def test_a_killed_ingress_loses_no_line_and_charges_none_twice(served):
    import ray

    key = served.create_key("100")
    client = served.client(key, timeout=30)
    lines = [
        request_line(f"r{i}", seed=10 * i, n=2, size="128x128", num_inference_steps=30, go_fast=False) for i in range(6)
    ]
    batch = submit(client, lines)
    wait(client, batch.id, until=FINAL + ("in_progress",))
    deadline = time.monotonic() + 120
    while client.batches.retrieve(batch.id).request_counts.completed < 1:  # some done, some running
        assert time.monotonic() < deadline
        time.sleep(0.2)
    ray.kill(_ingress_actor(served))
    killed_at = time.monotonic()
    while True:
        try:
            if httpx.get(f"{served.base_url}/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() - killed_at < 90, "the ingress never came back"
        time.sleep(0.5)
    done = wait(client, batch.id, timeout_s=240)
    print(f"batch done {time.monotonic() - killed_at:.1f} s after its ingress was killed")
    assert done.status == "completed" and done.request_counts.completed == 6, done
    outputs = lines_of(client, done.output_file_id)
    assert sorted(line["custom_id"] for line in outputs) == [f"r{i}" for i in range(6)]  # each once
    for line in outputs:
        seed = int(line["custom_id"][1:]) * 10
        assert [d["seed"] for d in line["response"]["body"]["data"]] == [seed, seed + 1]
    # 12 images at 0.5: whatever the killed replica held was refunded, nothing charged twice.
    deadline = time.monotonic() + 60
    while balance(served, key) != 94:
        assert time.monotonic() < deadline, balance(served, key)
        time.sleep(0.5)
    store = open_store(served.database_url)
    try:
        assert store.inconsistencies() == []
        charged = [e for e in store.ledger(_key_id(store, key)) if e.kind == "charge"]
        assert sum(e.images for e in charged) == 12
    finally:
        store.close()


def _pixels(b64: str):
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def _key_id(store, secret):
    from serve_app.accounts.keys import hash_key

    return store.key_by_hash(hash_key(secret)).id
