"""The accounts store and facade: keys, the ledger, reservations under concurrency.

Every test taking ``store`` or ``database_url`` runs on SQLite and on PostgreSQL (the
``database_url`` fixture of conftest.py)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from serve_app.accounts import (
    Accounts,
    DuplicateKeyName,
    IdempotencyClaim,
    InsufficientCredits,
    KeyNotFound,
    KeyRevoked,
    LocalRateLimiter,
    Replay,
    Reservation,
    SchemaTooNew,
    format_credits,
    issue_key,
    open_store,
    parse_credits,
)
from serve_app.accounts.errors import IdempotencyKeyInUse, IdempotencyKeyReused
from serve_app.accounts.keys import bearer_token, generate_key, hash_key, looks_like_key
from serve_app.accounts.migrate import head_revision
from serve_app.accounts.store import sqlite_path_from_url
from serve_app.config import CREDIT_UNITS
from serve_app.errors import (
    InsufficientFunds,
    InvalidAPIKey,
    MissingAPIKey,
    ModelNotPermitted,
    RateLimitExceeded,
)

PRICE = CREDIT_UNITS  # one credit per image
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(database_url):
    s = open_store(database_url)
    yield s
    s.close()


def assert_sound(store):
    assert store.inconsistencies() == []
    for key in store.list_keys():
        assert key.balance_units >= 0
        assert key.balance_units == sum(e.amount_units for e in store.ledger(key.id))


# -- keys --------------------------------------------------------------------------------
def test_generated_keys_have_the_documented_shape():
    keys = {generate_key() for _ in range(50)}
    assert len(keys) == 50
    for key in keys:
        assert key.startswith("qbt_") and len(key) - 4 >= 32
        assert looks_like_key(key)
        assert len(hash_key(key)) == 64 and key not in hash_key(key)
    assert not looks_like_key("qbt_short")
    assert not looks_like_key("sk-" + "a" * 40)
    assert not looks_like_key("qbt_" + "a" * 200)


@pytest.mark.parametrize(
    ("header", "token"),
    [
        (None, None),
        ("", None),
        ("Bearer", None),
        ("Bearer   ", None),
        ("Basic dXNlcjpwYXNz", None),
        ("Bearer qbt_abc", "qbt_abc"),
        ("bearer  qbt_abc ", "qbt_abc"),
    ],
)
def test_bearer_token(header, token):
    assert bearer_token(header) == token


def test_records_never_show_key_material(store):
    issued = issue_key(store, "alice", credits_units=PRICE)
    assert issued.secret not in repr(issued)
    assert hash_key(issued.secret) not in repr(issued)
    assert hash_key(issued.secret) not in repr(store.key_by_name("alice"))
    # only the hash is stored
    with store.engine.connect() as conn:
        raw = conn.execute(sa.text("SELECT * FROM keys")).all()
    assert issued.secret not in repr(raw)
    assert store.key_by_hash(hash_key(issued.secret)).name == "alice"
    assert store.key_by_hash(hash_key(generate_key())) is None


# -- the database: migrations -------------------------------------------------------------
def _revision(store) -> str:
    with store.engine.connect() as conn:
        return conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one()


def test_sqlite_database_is_created_in_wal_mode_at_the_newest_revision(tmp_path):
    path = tmp_path / "a" / "b" / "x.db"
    store = open_store(f"sqlite:///{path}")
    try:
        assert path.exists() and _revision(store) == head_revision()
        conn = sqlite3.connect(path)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.close()
    finally:
        store.close()
    # reopening is a no-op migration and keeps the data
    issue_key(open_store(f"sqlite:///{path}"), "k1")
    assert [k.name for k in open_store(f"sqlite:///{path}").list_keys()] == ["k1"]


def test_the_tables_match_their_migrations(store):
    """schema.py (what the queries use) and the Alembic revisions (what builds the
    database) describe the same tables, columns and indexes."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from serve_app.accounts.schema import metadata

    with store.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []


def test_a_newer_schema_is_refused(database_url):
    open_store(database_url).close()
    engine = sa.create_engine(database_url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999_from_the_future'"))
    engine.dispose()
    with pytest.raises(SchemaTooNew, match="9999_from_the_future"):
        open_store(database_url)


def test_concurrent_first_opens_migrate_once(database_url):
    """Every ingress replica opens the database at startup: on a fresh one, all at once."""
    errors: list[BaseException] = []
    stores = []

    def opener() -> None:
        try:
            stores.append(open_store(database_url))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=opener) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    issue_key(stores[0], "alice", credits_units=PRICE)
    assert [k.name for k in stores[-1].list_keys()] == ["alice"]
    for s in stores:
        s.close()


# What the hand-written SQLite migrations (PRAGMA user_version) of the previous release
# created, frozen here: a database made by that code must upgrade in place.
LEGACY_SQLITE_V1 = """
CREATE TABLE keys (
    id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE, key_hash TEXT NOT NULL UNIQUE,
    created REAL NOT NULL, revoked_at REAL,
    balance_units INTEGER NOT NULL DEFAULT 0 CHECK (balance_units >= 0), allowed_models TEXT,
    rpm INTEGER CHECK (rpm IS NULL OR rpm > 0), ipm INTEGER CHECK (ipm IS NULL OR ipm > 0));
CREATE TABLE reservations (
    id INTEGER PRIMARY KEY AUTOINCREMENT, key_id INTEGER NOT NULL REFERENCES keys(id),
    request_id TEXT NOT NULL, model TEXT NOT NULL, images INTEGER NOT NULL CHECK (images > 0),
    price_units INTEGER NOT NULL CHECK (price_units >= 0), created REAL NOT NULL, settled_at REAL,
    delivered INTEGER CHECK (delivered IS NULL OR delivered BETWEEN 0 AND images));
CREATE INDEX reservations_open ON reservations(created) WHERE settled_at IS NULL;
CREATE INDEX reservations_key_model ON reservations(key_id, model);
CREATE TABLE ledger (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, request_id TEXT,
    key_id INTEGER NOT NULL REFERENCES keys(id), model TEXT,
    kind TEXT NOT NULL CHECK (kind IN ('reserve', 'charge', 'refund', 'credit')),
    images INTEGER NOT NULL DEFAULT 0 CHECK (images >= 0), amount_units INTEGER NOT NULL,
    reservation_id INTEGER REFERENCES reservations(id));
CREATE INDEX ledger_key ON ledger(key_id);
CREATE INDEX ledger_request ON ledger(request_id);
CREATE UNIQUE INDEX ledger_once ON ledger(reservation_id, kind) WHERE reservation_id IS NOT NULL;
PRAGMA user_version = 1;
"""
LEGACY_SQLITE_V2 = """
ALTER TABLE reservations ADD COLUMN owner TEXT;
CREATE INDEX reservations_open_owner ON reservations(owner) WHERE settled_at IS NULL;
CREATE TABLE idempotency (
    key_id INTEGER NOT NULL REFERENCES keys(id), idem_key TEXT NOT NULL, fingerprint TEXT NOT NULL,
    owner TEXT, created REAL NOT NULL, outcome BLOB, PRIMARY KEY (key_id, idem_key));
CREATE INDEX idempotency_created ON idempotency(created);
PRAGMA user_version = 2;
"""
LEGACY_DATA = f"""
INSERT INTO keys (name, key_hash, created, balance_units) VALUES ('old', '{"a" * 64}', 1.0, 7000000);
INSERT INTO reservations (key_id, request_id, model, images, price_units, created) VALUES (1, 'r1', 'm1', 3, 1000000, 2.0);
INSERT INTO ledger (ts, key_id, kind, amount_units) VALUES (1.0, 1, 'credit', 10000000);
INSERT INTO ledger (ts, request_id, key_id, model, kind, images, amount_units, reservation_id)
    VALUES (2.0, 'r1', 1, 'm1', 'reserve', 3, -3000000, 1);
"""


@pytest.mark.parametrize("version", [1, 2])
def test_a_database_of_the_previous_release_upgrades_in_place(tmp_path, version):
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript(LEGACY_SQLITE_V1 + LEGACY_DATA + (LEGACY_SQLITE_V2 if version == 2 else ""))
    conn.close()

    store = open_store(f"sqlite:///{path}")
    try:
        assert _revision(store) == head_revision()
        old = store.key_by_name("old")
        assert not old.may_disable_safety_checker  # revision 0003: existing keys may not
        assert old.balance_units == 7 * PRICE and store.usage(old.id).reserved_units == 3 * PRICE
        assert store.settle(1, 2).refunded_units == PRICE  # the open reservation settles
        claim = IdempotencyClaim("idem", "digest")
        held = store.reserve(old.id, "r2", "m1", 1, PRICE, owner="app:ingress:replica-1", claim=claim)
        assert store.open_owners() == {"app:ingress:replica-1"}
        store.settle(held.id, 1, b"outcome")
        assert store.reserve(old.id, "r3", "m1", 1, PRICE, claim=claim) == Replay(b"outcome")
        assert_sound(store)
    finally:
        store.close()
    # and again: nothing left to do
    open_store(f"sqlite:///{path}").close()


def test_database_urls(tmp_path):
    assert str(sqlite_path_from_url("sqlite:///data/imagegen.db")) == "data/imagegen.db"
    assert str(sqlite_path_from_url("sqlite:////srv/x.db")) == "/srv/x.db"
    for bad in ("sqlite://", "sqlite:///:memory:", "data.db"):
        with pytest.raises(ValueError):
            sqlite_path_from_url(bad)
    with pytest.raises(ValueError, match="unsupported"):
        open_store("mysql://db/imagegen")


# -- credits -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "units"), [("0", 0), ("1", 1_000_000), ("12.5", 12_500_000), ("0.000001", 1), (" 3 ", 3_000_000)]
)
def test_parse_credits(text, units):
    assert parse_credits(text) == units
    assert parse_credits(format_credits(units)) == units


@pytest.mark.parametrize("text", ["-1", "abc", "1.0000001", "nan", "inf", ""])
def test_parse_credits_rejects(text):
    with pytest.raises(ValueError):
        parse_credits(text)


def test_format_credits():
    assert format_credits(12_500_000) == "12.5"
    assert format_credits(3) == "0.000003"
    assert format_credits(0) == "0"
    assert format_credits(10 * CREDIT_UNITS) == "10"


# -- key administration ------------------------------------------------------------------
def test_create_list_revoke_and_add_credits(store):
    issue_key(store, "alice", credits_units=5 * PRICE, allowed_models=["m1", "m2"], rpm=10, ipm=20)
    issue_key(store, "bob")
    with pytest.raises(DuplicateKeyName):
        issue_key(store, "alice")
    alice = store.key_by_name("alice")
    assert alice.allowed_models == frozenset({"m1", "m2"})
    assert (alice.rpm, alice.ipm, alice.balance_units) == (10, 20, 5 * PRICE)
    assert store.key_by_name("bob").allowed_models is None
    assert [k.name for k in store.list_keys()] == ["alice", "bob"]

    assert store.add_credits("alice", PRICE // 2).balance_units == 5 * PRICE + PRICE // 2
    with pytest.raises(KeyNotFound):
        store.add_credits("nobody", PRICE)
    with pytest.raises(ValueError):
        store.add_credits("alice", 0)

    assert store.revoke_key("bob").revoked
    assert store.revoke_key("bob").revoked  # idempotent
    with pytest.raises(KeyRevoked):
        store.add_credits("bob", PRICE)
    with pytest.raises(KeyNotFound):
        store.revoke_key("nobody")
    assert [e.kind for e in store.ledger(alice.id)] == ["credit", "credit"]
    assert_sound(store)


# -- reservations ------------------------------------------------------------------------
def test_reserve_then_settle_charges_delivered_and_refunds_the_rest(store):
    key = issue_key(store, "alice", credits_units=10 * PRICE).record
    reservation = store.reserve(key.id, "req-1", "m1", 4, PRICE)
    assert store.key_by_id(key.id).balance_units == 6 * PRICE
    assert store.usage(key.id).reserved_units == 4 * PRICE

    settlement = store.settle(reservation.id, 3)
    assert (settlement.charged_units, settlement.refunded_units, settlement.balance_units) == (
        3 * PRICE,
        PRICE,
        7 * PRICE,
    )
    assert settlement.credit_headers() == {"x-credits-charged": "3", "x-credits-remaining": "7"}

    again = store.settle(reservation.id, 0)  # e.g. a failure path plus a finally
    assert again.already_settled and again.charged_units == 3 * PRICE and again.balance_units == 7 * PRICE
    assert store.key_by_id(key.id).balance_units == 7 * PRICE

    rows = [(e.kind, e.request_id, e.model, e.images, e.amount_units) for e in store.ledger(key.id)]
    assert rows == [
        ("credit", None, None, 0, 10 * PRICE),
        ("reserve", "req-1", "m1", 4, -4 * PRICE),
        ("charge", "req-1", "m1", 3, 0),
        ("refund", "req-1", "m1", 1, PRICE),
    ]
    assert_sound(store)


def test_insufficient_funds_writes_nothing(store):
    key = issue_key(store, "alice", credits_units=3 * PRICE).record
    with pytest.raises(InsufficientCredits, match="balance is 3"):
        store.reserve(key.id, "req-1", "m1", 4, PRICE)
    assert store.key_by_id(key.id).balance_units == 3 * PRICE
    assert [e.kind for e in store.ledger(key.id)] == ["credit"]
    store.reserve(key.id, "req-2", "m1", 3, PRICE)  # exactly enough
    assert store.key_by_id(key.id).balance_units == 0
    assert_sound(store)


def test_a_revoked_key_cannot_reserve(store):
    key = issue_key(store, "alice", credits_units=3 * PRICE).record
    store.revoke_key("alice")
    with pytest.raises(KeyRevoked):
        store.reserve(key.id, "req-1", "m1", 1, PRICE)


def test_settle_never_charges_beyond_the_hold_and_free_models_work(store):
    key = issue_key(store, "alice", credits_units=2 * PRICE).record
    s = store.settle(store.reserve(key.id, "r1", "m1", 2, PRICE).id, 5)
    assert (s.delivered, s.charged_units) == (2, 2 * PRICE)
    free = store.settle(store.reserve(key.id, "r2", "free", 3, 0).id, 1)
    assert (free.charged_units, free.refunded_units, free.balance_units) == (0, 0, 0)
    assert_sound(store)


def test_usage_by_model(store):
    key = issue_key(store, "alice", credits_units=100 * PRICE).record
    store.settle(store.reserve(key.id, "r1", "m1", 2, PRICE).id, 2)
    store.settle(store.reserve(key.id, "r2", "m1", 4, PRICE).id, 1)
    store.settle(store.reserve(key.id, "r3", "m2", 1, 3 * PRICE).id, 1)
    store.settle(store.reserve(key.id, "r4", "m3", 1, PRICE).id, 0)  # failed: nothing used
    store.reserve(key.id, "r5", "m2", 2, PRICE)  # in flight
    usage = store.usage(key.id)
    assert [(m.model, m.requests, m.images, m.credits_units) for m in usage.by_model] == [
        ("m1", 2, 3, 3 * PRICE),
        ("m2", 1, 1, 3 * PRICE),
    ]
    assert (usage.images, usage.credits_units) == (4, 6 * PRICE)
    assert usage.reserved_units == 2 * PRICE
    assert usage.balance_units == (100 - 6 - 2) * PRICE
    body = usage.as_json()
    assert body["balance"] == 92.0 and body["data"][0] == {
        "object": "usage.model",
        "model": "m1",
        "requests": 2,
        "images": 3,
        "credits": 3.0,
    }
    assert_sound(store)


def test_release_stale_refunds_abandoned_reservations(store):
    key = issue_key(store, "alice", credits_units=5 * PRICE).record
    store.reserve(key.id, "r1", "m1", 2, PRICE)
    assert store.release_stale(3600) == []
    released = store.release_stale(0)
    assert len(released) == 1 and released[0].refunded_units == 2 * PRICE
    assert store.key_by_id(key.id).balance_units == 5 * PRICE
    assert_sound(store)


# -- Idempotency-Key claims ----------------------------------------------------------------
def test_an_idempotency_claim_lives_exactly_as_long_as_its_reservation(store):
    key = issue_key(store, "alice", credits_units=10 * PRICE).record
    first = IdempotencyClaim("order-1", "digest-a")
    held = store.reserve(key.id, "r1", "m1", 2, PRICE, owner="replica-1", claim=first)
    with pytest.raises(IdempotencyKeyInUse):  # the first attempt holds its reservation
        store.reserve(key.id, "r2", "m1", 2, PRICE, claim=first)
    with pytest.raises(IdempotencyKeyReused):  # the same key for another request
        store.reserve(key.id, "r2", "m1", 2, PRICE, claim=IdempotencyClaim("order-1", "digest-b"))
    # a charge stores the outcome in its own transaction: replays are never charged again
    assert store.settle(held.id, 2, b'{"body": 1}').charged_units == 2 * PRICE
    balance = store.key_by_id(key.id).balance_units
    assert store.reserve(key.id, "r3", "m1", 2, PRICE, claim=first) == Replay(b'{"body": 1}')
    assert store.key_by_id(key.id).balance_units == balance

    # a refund ends the claim with it: the retry runs anew, and is charged once
    second = IdempotencyClaim("order-2", "digest-c")
    failed = store.reserve(key.id, "r4", "m1", 1, PRICE, claim=second)
    store.settle(failed.id, 0, b"never stored")
    retry = store.reserve(key.id, "r5", "m1", 1, PRICE, claim=second)
    assert isinstance(retry, Reservation)
    # a reservation refunded by the stale or orphan sweeper takes its claim along
    store.release_orphaned(["replica-gone"])
    store.release_stale(0)
    assert isinstance(store.reserve(key.id, "r6", "m1", 1, PRICE, claim=second), Reservation)
    # a refused reservation leaves no claim behind
    poor = issue_key(store, "bob").record
    with pytest.raises(InsufficientCredits):
        store.reserve(poor.id, "r7", "m1", 1, PRICE, claim=first)
    store.add_credits("bob", PRICE)
    assert isinstance(store.reserve(poor.id, "r8", "m1", 1, PRICE, claim=first), Reservation)
    # outcomes are forgotten after the window; open claims end with their reservations only
    assert store.forget_idempotency(3600) == 0
    assert store.forget_idempotency(0) == 1
    with pytest.raises(IdempotencyKeyInUse):
        store.reserve(poor.id, "r9", "m1", 1, PRICE, claim=first)
    assert_sound(store)


def test_concurrent_idempotent_reservations_have_one_winner(store):
    key = issue_key(store, "alice", credits_units=100 * PRICE).record
    start = threading.Barrier(8)
    outcomes: list[str] = []

    def claimant(i: int) -> None:
        start.wait()
        try:
            store.reserve(key.id, f"r{i}", "m1", 1, PRICE, owner=f"replica-{i}", claim=IdempotencyClaim("o", "d"))
            outcomes.append("reserved")
        except IdempotencyKeyInUse:
            outcomes.append("in use")

    threads = [threading.Thread(target=claimant, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["in use"] * 7 + ["reserved"]
    assert store.usage(key.id).reserved_units == PRICE


# -- concurrency: 40 requests of 2 images, credits for exactly 30 images -------------------
_WORKER = r"""
import os, sys, time
from serve_app.accounts import InsufficientCredits, open_store
url, key_id, count, gate = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
store = open_store(url)
open(gate + "." + str(os.getpid()), "w").close()  # ready
while not os.path.exists(gate):
    time.sleep(0.001)
ok = 0
for i in range(count):
    try:
        store.reserve(key_id, "p%d-%d" % (os.getpid(), i), "m1", 2, 1_000_000)
        ok += 1
    except InsufficientCredits:
        pass
print(ok)
"""


def test_concurrent_reservations_across_processes(database_url, tmp_path):
    """4 processes x 10 reservations of 2 images, credits for 30 images: exactly 15 hold."""
    store = open_store(database_url)
    key = issue_key(store, "alice", credits_units=30 * PRICE).record
    gate = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, database_url, str(key.id), "10", str(gate)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(4)
    ]
    deadline = time.monotonic() + 30
    while len(list(tmp_path.glob("go.*"))) < len(workers) and time.monotonic() < deadline:
        time.sleep(0.005)
    gate.touch()  # all start reserving at once
    successes = [int(w.communicate(timeout=60)[0]) for w in workers]
    assert all(w.returncode == 0 for w in workers)
    assert sum(successes) == 15
    assert store.key_by_id(key.id).balance_units == 0
    assert sum(1 for e in store.ledger(key.id) if e.kind == "reserve") == 15
    assert_sound(store)
    store.close()


def test_concurrent_reservations_and_settlements_across_threads(store):
    key = issue_key(store, "alice", credits_units=30 * PRICE).record
    start = threading.Barrier(40)
    outcomes: list[str] = []

    def request(i: int) -> None:
        start.wait()
        try:
            reservation = store.reserve(key.id, f"t-{i}", "m1", 2, PRICE)
        except InsufficientCredits:
            outcomes.append("402")
            return
        store.settle(reservation.id, 2)
        store.settle(reservation.id, 2)  # twice: still one charge
        outcomes.append("ok")

    threads = [threading.Thread(target=request, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("ok") == 15 and outcomes.count("402") == 25
    assert store.key_by_id(key.id).balance_units == 0
    assert store.usage(key.id).images == 30
    assert_sound(store)


# -- the async facade --------------------------------------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def accounts(store):
    clock = FakeClock()
    facade = Accounts(store, default_rpm=60, default_ipm=120, rate_limiter=LocalRateLimiter(clock=clock), clock=clock)
    facade.fake_clock = clock
    yield facade
    facade._executor.shutdown(wait=True)


def test_facade_concurrent_requests_exactly_fifteen_succeed(accounts):
    store = accounts.store
    secret = issue_key(store, "alice", credits_units=30 * PRICE).secret
    header = f"Bearer {secret}"

    async def request(i: int) -> str:
        key = await accounts.authenticate(header)
        accounts.check_model(key, "m1")
        try:
            reservation = await accounts.reserve(key, f"req-{i}", "m1", 2, PRICE)
        except InsufficientFunds:
            return "402"
        delivered = 0
        try:
            await asyncio.sleep(0.001)
            delivered = 2
        finally:
            await accounts.settle(reservation, delivered)
        return "ok"

    async def main():
        return await asyncio.gather(*(request(i) for i in range(40)))

    outcomes = asyncio.run(main())
    assert outcomes.count("ok") == 15
    key = store.key_by_name("alice")
    assert key.balance_units == 0
    usage = store.usage(key.id)
    assert (usage.images, usage.credits_units) == (30, 30 * PRICE)
    assert_sound(store)


def test_authenticate(accounts):
    store = accounts.store
    secret = issue_key(store, "alice", credits_units=PRICE, allowed_models=["m1"]).secret

    async def main():
        for header in (None, "", "Bearer ", "Basic abc"):
            with pytest.raises(MissingAPIKey):
                await accounts.authenticate(header)
        for header in ("Bearer nope", "Bearer " + generate_key(), "Bearer " + secret + "x"):
            with pytest.raises(InvalidAPIKey) as info:
                await accounts.authenticate(header)
            assert "qbt_" not in info.value.message
        key = await accounts.authenticate("Bearer " + secret)
        assert key.name == "alice"
        accounts.check_model(key, "m1")
        with pytest.raises(ModelNotPermitted) as info:
            accounts.check_model(key, "m2")
        assert info.value.param == "model"

        # revocation: the 1 s cache may still let authenticate pass, reserve never does
        store.revoke_key("alice")
        key = await accounts.authenticate("Bearer " + secret)
        with pytest.raises(InvalidAPIKey):
            await accounts.reserve(key, "r1", "m1", 1, PRICE)
        accounts.fake_clock.now += 1.01
        with pytest.raises(InvalidAPIKey):
            await accounts.authenticate("Bearer " + secret)

    asyncio.run(main())


def test_unknown_keys_are_rejected_from_the_cache(accounts):
    unknown = "Bearer " + generate_key()
    lookups = []
    key_by_hash = accounts.store.key_by_hash
    accounts.store.key_by_hash = lambda digest: lookups.append(digest) or key_by_hash(digest)

    async def main():
        for _ in range(3):
            with pytest.raises(InvalidAPIKey):
                await accounts.authenticate(unknown)
        assert len(lookups) == 1
        accounts.fake_clock.now += 1.01
        with pytest.raises(InvalidAPIKey):
            await accounts.authenticate(unknown)
        assert len(lookups) == 2

    asyncio.run(main())


def test_a_top_up_is_seen_by_the_next_reservation(accounts):
    store = accounts.store
    key = issue_key(store, "alice", credits_units=3 * PRICE).record

    async def main():
        with pytest.raises(InsufficientFunds, match="balance is 3"):
            await accounts.reserve(key, "r1", "m1", 4, PRICE)
        store.add_credits("alice", 5 * PRICE)  # by another process: nothing remembered the 402
        await accounts.settle(await accounts.reserve(key, "r2", "m1", 4, PRICE), 4)

    asyncio.run(main())
    assert store.key_by_id(key.id).balance_units == 4 * PRICE
    assert_sound(store)


def test_stale_reservations_are_released_by_the_sweeper(accounts):
    store = accounts.store
    key = issue_key(store, "alice", credits_units=2 * PRICE).record

    async def main():
        held = await accounts.reserve(key, "died", "m1", 2, PRICE)
        with pytest.raises(InsufficientFunds):
            await accounts.reserve(key, "r2", "m1", 1, PRICE)
        assert await accounts.release_stale(3600) == []  # young: a request may still be running
        sweeper = accounts.start_stale_sweeper(0, 0.01)
        assert accounts.start_stale_sweeper(0, 0.01) is sweeper  # once
        for _ in range(200):
            await asyncio.sleep(0.005)
            if store.usage(key.id).reserved_units == 0:
                break
        assert store.usage(key.id).reserved_units == 0
        settlement = await accounts.settle(held, 2)  # the request turns up after all: nothing changes
        assert settlement.already_settled and settlement.charged_units == 0
        sweeper.cancel()

    asyncio.run(main())
    assert store.key_by_id(key.id).balance_units == 2 * PRICE
    assert_sound(store)


def test_rate_limit_through_the_facade(accounts):
    key = issue_key(accounts.store, "alice", credits_units=PRICE, rpm=2, ipm=3).record

    async def main():
        first = await accounts.check_rate_limit(key, images=2)
        assert first.headers()["x-ratelimit-remaining-requests"] == "1"
        assert first.headers()["x-ratelimit-remaining-images"] == "1"
        with pytest.raises(RateLimitExceeded) as info:
            await accounts.check_rate_limit(key, images=2)
        assert info.value.retry_after_s == pytest.approx(20.0)
        assert info.value.headers["x-ratelimit-limit-images"] == "3"
        await accounts.check_rate_limit(key, images=1)  # the rejection consumed nothing
        with pytest.raises(RateLimitExceeded):
            await accounts.admit(key, 1)
        accounts.fake_clock.now += 30
        assert (await accounts.admit(key, 1))["x-ratelimit-limit-requests"] == "2"

    asyncio.run(main())


def test_settle_survives_cancellation_and_cancelled_reserve_is_refunded(accounts):
    store = accounts.store
    key = issue_key(store, "alice", credits_units=4 * PRICE).record

    async def main():
        # a request whose client disconnects mid-generation: cancelled, settle in finally
        reservation = await accounts.reserve(key, "r1", "m1", 2, PRICE)

        async def handler():
            try:
                await asyncio.sleep(10)
            finally:
                await accounts.settle(reservation, 0)

        task = asyncio.create_task(handler())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

        # cancelled while the reservation is being written: refunded once it lands
        task = asyncio.create_task(accounts.reserve(key, "r2", "m1", 2, PRICE))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):
            await asyncio.sleep(0.005)
            if store.usage(key.id).reserved_units == 0:
                break

    asyncio.run(main())
    accounts._executor.shutdown(wait=True)
    assert store.key_by_id(key.id).balance_units == 4 * PRICE
    assert store.usage(key.id).reserved_units == 0
    assert [e.kind for e in store.ledger(key.id) if e.request_id == "r2"] == ["reserve", "charge", "refund"]
    assert_sound(store)


def test_build_accounts_uses_the_anchored_url(tmp_path, monkeypatch):
    from serve_app.accounts import build_accounts
    from serve_app.config import AccountsConfig

    monkeypatch.setenv("IMAGEGEN_DATABASE_URL", f"sqlite:///{tmp_path / 'not-this.db'}")
    app_config = type("Cfg", (), {"accounts": AccountsConfig(database_url=f"sqlite:///{tmp_path / 'app.db'}")})()
    facade = build_accounts(app_config, rate_limiter=LocalRateLimiter())
    try:
        assert facade.store.engine.url.database == str(tmp_path / "app.db")
        assert facade.limits_for(issue_key(facade.store, "k").record) == (60, 120)
    finally:
        facade.close()


def test_facade_usage_and_from_config(tmp_path, monkeypatch):
    from serve_app.config import AccountsConfig

    monkeypatch.setenv("IMAGEGEN_DATABASE_URL", f"sqlite:///{tmp_path / 'env.db'}")
    facade = Accounts.from_config(AccountsConfig(default_requests_per_minute=7))
    try:
        assert facade.store.engine.url.database == str(tmp_path / "env.db")
        key = issue_key(facade.store, "alice", credits_units=PRICE).record
        assert facade.limits_for(key) == (7, 120)
        usage = asyncio.run(facade.usage(key))
        assert usage.balance_units == PRICE and usage.by_model == ()
    finally:
        facade.close()


def test_the_key_cache_is_bounded_dropping_expired_entries_first(accounts):
    accounts._cache_max = 2
    accounts._remember("old", None, now=1000.0 - 5)  # expires at 996
    accounts._remember("live", None, now=1000.0)
    accounts._remember("new", None, now=1000.0)
    assert set(accounts._cache) == {"live", "new"}
    accounts._remember("newer", None, now=1000.0)  # nothing expired: start over
    assert set(accounts._cache) == {"newer"}


@pytest.mark.parametrize("name", ["alice\n", "alice\nbob", "", "-alice", "a" * 65])
def test_key_names_are_one_printable_token(name):
    from serve_app.accounts.errors import AccountsError
    from serve_app.accounts.keys import validate_key_name

    with pytest.raises(AccountsError):
        validate_key_name(name)
