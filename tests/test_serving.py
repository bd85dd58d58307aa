"""Serving logic against fakes: real accounts (SQLite), a fake model router and store.

Billing must follow delivery: charge exactly the images delivered, refund the rest on any
failure, and keep every balance equal to its ledger.
"""

from __future__ import annotations

import asyncio

import pytest

from serve_app.accounts import Accounts, LocalRateLimiter, issue_key, open_store
from serve_app.config import CREDIT_UNITS, AppConfig, ImageInputConfig
from serve_app.errors import GenerationTimeout, IdempotencyConflict, InsufficientFunds, InvalidRequest, UpstreamError
from serve_app.serving import ImageGenerationService
from tests.fakes import FakeRouter, FakeStore, answer, serve

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
        ]
    }
)


@pytest.fixture
def accounts(tmp_path):
    store = open_store(f"sqlite:///{tmp_path}/ledger.db")
    accounts = Accounts(store, default_rpm=1000, default_ipm=1000, rate_limiter=LocalRateLimiter())
    yield accounts
    accounts.close()


def make_key(accounts, credits):
    return issue_key(accounts.store, "k", credits_units=int(credits * CREDIT_UNITS)).secret


def service(accounts, router, store=None):
    return ImageGenerationService(CONFIG, router, accounts, store=store)


async def generate(svc, key, **fields):
    served = await serve(svc, key, {"model": "m", "prompt": "apple", **fields})
    await answer(served)
    return served


async def balance(accounts, key):
    api_key = await accounts.authenticate(f"Bearer {key}")
    return (await accounts.usage(api_key)).balance_units / CREDIT_UNITS


def test_success_charges_delivered_images(accounts):
    key = make_key(accounts, 10)
    router = FakeRouter()
    served = asyncio.run(generate(service(accounts, router), key, n=3, seed=5))
    assert [item.seed for item in served.body.data] == [5, 6, 7]
    assert [len(job.seeds) for job in router.calls[0]] == [2, 1]  # split by max_batch_images
    assert served.headers["x-credits-charged"] == "4.5"
    assert served.headers["x-credits-remaining"] == "5.5"
    assert "x-ratelimit-remaining-requests" in served.headers
    assert asyncio.run(balance(accounts, key)) == 5.5
    assert accounts.store.inconsistencies() == []


def test_failure_mid_way_refunds_everything(accounts):
    key = make_key(accounts, 10)
    with pytest.raises(UpstreamError):
        asyncio.run(generate(service(accounts, FakeRouter(fail_job=1)), key, n=3))
    assert asyncio.run(balance(accounts, key)) == 10
    assert accounts.store.inconsistencies() == []


def test_timeout_refunds(accounts):
    key = make_key(accounts, 3)
    with pytest.raises(GenerationTimeout):
        asyncio.run(generate(service(accounts, FakeRouter(fail_job=0, failure=GenerationTimeout("slow"))), key, n=2))
    assert asyncio.run(balance(accounts, key)) == 3


def test_client_disconnect_refunds(accounts):
    key = make_key(accounts, 3)

    async def disconnect():
        task = asyncio.create_task(generate(service(accounts, FakeRouter(hang=True)), key, n=2))
        await asyncio.sleep(0.2)
        task.cancel()  # what Serve does when the HTTP client goes away
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.2)

    asyncio.run(disconnect())
    assert asyncio.run(balance(accounts, key)) == 3
    assert accounts.store.inconsistencies() == []


def test_insufficient_funds_starts_nothing(accounts):
    key = make_key(accounts, 2)
    router = FakeRouter()
    with pytest.raises(InsufficientFunds):
        asyncio.run(generate(service(accounts, router), key, n=2))
    assert router.calls == []
    assert asyncio.run(balance(accounts, key)) == 2


def test_url_delivery_charges_only_stored_images(accounts):
    key = make_key(accounts, 10)
    store = FakeStore(fail_seeds={11})
    served = asyncio.run(generate(service(accounts, FakeRouter(), store), key, n=3, seed=10, response_format="url"))
    assert [item.seed for item in served.body.data] == [10, 12]
    assert all(item.url.startswith("http://h/files/req_test_1/") for item in served.body.data)
    assert served.headers["x-credits-charged"] == "3"
    assert asyncio.run(balance(accounts, key)) == 7


def test_url_delivery_with_nothing_stored_is_502_and_refunded(accounts):
    key = make_key(accounts, 10)
    store = FakeStore(fail_seeds={1, 2})
    with pytest.raises(UpstreamError) as caught:
        asyncio.run(generate(service(accounts, FakeRouter(), store), key, n=2, seed=1, response_format="url"))
    assert caught.value.status_code == 502 and caught.value.code == "upstream_error"
    assert asyncio.run(balance(accounts, key)) == 10
    assert accounts.store.inconsistencies() == []


# ----------------------------------------------------------------------------------------
# Images in: the input reaches the model's jobs, fitted; a URL only from a listed host


def _png(width=48, height=32) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_an_image_url_from_a_listed_host_becomes_an_image_to_image_job(accounts):
    import http.server
    import threading

    from serve_app.work import Mode

    body = _png()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("content-type", "image/png")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/in.png"
    try:
        key = make_key(accounts, 10)
        router = FakeRouter()
        closed = ImageGenerationService(CONFIG, router, accounts)
        with pytest.raises(InvalidRequest) as caught:  # the default lists no host
            asyncio.run(generate(closed, key, image=url))
        assert caught.value.param == "image"
        inside = CONFIG.model_copy(
            update={"image_input": ImageInputConfig(allowed_url_hosts=["127.0.0.1"], allow_private_addresses=True)}
        )
        listed_but_private = CONFIG.model_copy(
            update={"image_input": ImageInputConfig(allowed_url_hosts=["127.0.0.1"])}
        )
        with pytest.raises(InvalidRequest, match="(?i)address"):
            asyncio.run(generate(ImageGenerationService(listed_but_private, router, accounts), key, image=url))
        served = asyncio.run(generate(ImageGenerationService(inside, router, accounts), key, image=url, strength=0.5))
    finally:
        server.shutdown()
    job = router.calls[0][0]
    assert job.shape.mode is Mode.IMAGE_TO_IMAGE and job.shape.strength == 0.5
    assert (job.image.width, job.image.height) == (48, 32)  # the input's size, on the 8-pixel grid
    assert job.image.pixels[:3] == bytes([200, 10, 10])
    assert served.body.size == "48x32"
    assert asyncio.run(balance(accounts, key)) == 8.5  # only the delivered image


def test_edits_with_a_mask_become_inpainting_jobs_and_too_many_images_cost_nothing(accounts):
    import io

    from PIL import Image

    from serve_app.serving import EditUpload
    from serve_app.work import Mode

    rgba = Image.new("RGBA", (48, 32), (0, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 24, 32))
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    key = make_key(accounts, 10)
    router = FakeRouter()
    svc = service(accounts, router)

    async def edit(upload):
        served = await serve(svc, key, upload, endpoint="edit", request_id="req_e")
        await answer(served)
        return served

    served = asyncio.run(edit(EditUpload({"model": "m", "prompt": "x", "n": "2"}, [_png()], buffer.getvalue())))
    job = router.calls[0][0]
    assert job.shape.mode is Mode.INPAINT and job.shape.strength == 1.0
    assert job.mask.pixels[0] == 255 and job.mask.pixels[47] == 0  # left half repainted
    assert len(served.body.data) == 2
    with pytest.raises(InvalidRequest) as caught:
        asyncio.run(edit(EditUpload({"model": "m", "prompt": "x"}, [_png(), _png()])))
    assert caught.value.param == "image"
    assert asyncio.run(balance(accounts, key)) == 7


# ----------------------------------------------------------------------------------------
# Idempotency-Key: a retry returns the first outcome, never a second charge


def test_an_idempotent_retry_returns_the_first_outcome_across_replicas(tmp_path):
    """Two ingress replicas (two Accounts on one database): a duplicate while the first
    attempt runs is told to retry (409 in use, Retry-After), and after it gets the first
    attempt's images and charge; nothing is generated or charged twice."""
    url = f"sqlite:///{tmp_path}/ledger.db"
    first_replica = Accounts(open_store(url), rate_limiter=LocalRateLimiter(), owner="app:ingress:a")
    second_replica = Accounts(open_store(url), rate_limiter=LocalRateLimiter(), owner="app:ingress:b")
    key = make_key(first_replica, 10)
    router = FakeRouter(delay_s=0.3)
    store = FakeStore()  # both replicas' storage (S3 in a cluster)
    body = {"model": "m", "prompt": "apple", "n": 2, "seed": 9}

    async def attempt(accounts, body):
        svc = ImageGenerationService(CONFIG, router, accounts, store=store)
        served = await serve(svc, key, body, request_id="r", base_url=None, idempotency_key="retry-1")
        await answer(served)
        return served

    async def main():
        first = asyncio.create_task(attempt(first_replica, body))
        await asyncio.sleep(0.1)
        with pytest.raises(IdempotencyConflict) as caught:
            await attempt(second_replica, dict(body))
        assert caught.value.code == "idempotency_key_in_use" and caught.value.retry_after_s
        return await first, await attempt(second_replica, dict(body))

    one, two = asyncio.run(main())
    assert [d.b64_json for d in one.body.data] == [d.b64_json for d in two.body.data]
    assert len(router.calls) == 1, "generated once"
    assert "idempotent-replayed" not in one.headers and two.headers["idempotent-replayed"] == "true"
    assert one.headers["x-credits-charged"] == two.headers["x-credits-charged"] == "3"
    assert asyncio.run(balance(first_replica, key)) == 7
    with pytest.raises(IdempotencyConflict) as caught:  # the same key for another request
        asyncio.run(attempt(second_replica, {"model": "m", "prompt": "pear"}))
    assert caught.value.status_code == 409 and caught.value.param == "Idempotency-Key"
    assert first_replica.store.inconsistencies() == []
    first_replica.close()
    second_replica.close()


def test_a_failed_attempt_is_forgotten_so_its_retry_runs(accounts):
    key = make_key(accounts, 10)

    async def attempt(router, idempotency_key="k-2"):
        svc = ImageGenerationService(CONFIG, router, accounts, store=FakeStore())
        served = await serve(svc, key, {"model": "m", "prompt": "x"}, request_id="r", idempotency_key=idempotency_key)
        await answer(served)
        return served

    with pytest.raises(UpstreamError):
        asyncio.run(attempt(FakeRouter(fail_job=0)))
    served = asyncio.run(attempt(FakeRouter()))
    assert len(served.body.data) == 1 and "idempotent-replayed" not in served.headers
    with pytest.raises(InvalidRequest):
        asyncio.run(attempt(FakeRouter(), idempotency_key="bad key\n"))
    assert asyncio.run(balance(accounts, key)) == 8.5


def test_reservations_of_a_dead_ingress_replica_are_refunded_by_a_live_one(tmp_path):
    url = f"sqlite:///{tmp_path}/ledger.db"
    live = Accounts(open_store(url), rate_limiter=LocalRateLimiter(), owner="app:ingress:alive")
    key = make_key(live, 10)
    record = live.store.key_by_id(1)
    dead_hold = live.store.reserve(record.id, "r-dead", "m", 2, CREDIT_UNITS, owner="app:ingress:gone")
    running = live.store.reserve(record.id, "r-running", "m", 1, CREDIT_UNITS, owner="app:ingress:busy")
    other_app = live.store.reserve(record.id, "r-other", "m", 1, CREDIT_UNITS, owner="other:ingress:x")
    mine = live.store.reserve(record.id, "r-mine", "m", 1, CREDIT_UNITS, owner="app:ingress:alive")
    released = asyncio.run(live.release_orphaned(lambda: {"app:ingress:alive", "app:ingress:busy"}))
    assert [s.reservation_id for s in released] == [dead_hold.id]
    assert asyncio.run(balance(live, key)) == 10 - 3  # only the dead replica's hold came back
    for reservation in (running, other_app, mine):
        live.store.settle(reservation.id, 1)
    assert live.store.inconsistencies() == []
    live.close()


def test_a_response_never_handed_over_is_never_charged(accounts):
    """The ingress dies between generating and handing the response over: the reservation
    stays open (to be refunded as its replica's), never charged."""
    key = make_key(accounts, 10)
    svc = service(accounts, FakeRouter())
    served = asyncio.run(serve(svc, key, {"model": "m", "prompt": "x"}, request_id="r", base_url=None))
    assert served.headers["x-credits-charged"] == "1.5" and served.headers["x-credits-remaining"] == "8.5"
    record = accounts.store.key_by_name("k")
    assert accounts.store.usage(record.id).reserved_units == int(1.5 * CREDIT_UNITS)  # held, not charged
    assert len(accounts.store.release_stale(-1)) == 1  # what the dead replica's sweep does
    assert asyncio.run(balance(accounts, key)) == 10
    assert accounts.store.inconsistencies() == []
