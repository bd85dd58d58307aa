"""``AccountStore``: keys, credits, the ledger and reservations on SQLAlchemy Core.

One implementation for both databases, chosen by the URL:

- ``sqlite:///path`` (the embedded default): one file shared by the processes of one
  machine, in WAL mode. Every write transaction is ``BEGIN IMMEDIATE`` (the write lock is
  taken up front, so a transaction never fails half-way on lock upgrade) and
  ``busy_timeout`` makes other processes wait for it.
- ``postgresql+psycopg://...`` (clusters): READ COMMITTED transactions; every write that
  races another one is a single conditional statement, so the row lock and PostgreSQL's
  re-check of the WHERE clause decide it.

A reservation is one ``UPDATE keys ... WHERE balance_units >= amount``: it holds the
whole amount or changes nothing, on either database (``CHECK (balance_units >= 0)``
backs it up). Settling is ``UPDATE reservations ... WHERE settled_at IS NULL``: of two
settles at once exactly one writes. Every method is blocking and thread-safe; the async
facade runs them off the event loop.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.exc import IntegrityError

from serve_app.accounts.errors import (
    AccountsError,
    DuplicateKeyName,
    IdempotencyKeyInUse,
    IdempotencyKeyReused,
    InsufficientCredits,
    KeyNotFound,
    KeyRevoked,
)
from serve_app.accounts.keys import generate_key, hash_key, hashes_match, validate_key_name
from serve_app.accounts.migrate import upgrade
from serve_app.accounts.records import (
    ApiKey,
    IdempotencyClaim,
    IssuedKey,
    LedgerEntry,
    ModelUsage,
    Replay,
    Reservation,
    Settlement,
    Usage,
)
from serve_app.accounts.schema import idempotency, keys, ledger, reservations

SUPPORTED_URLS = "sqlite:///path/to/file.db or postgresql+psycopg://user:password@host/database"
_KEY_COLUMNS = (
    keys.c.id,
    keys.c.name,
    keys.c.created,
    keys.c.revoked_at,
    keys.c.balance_units,
    keys.c.allowed_models,
    keys.c.rpm,
    keys.c.ipm,
    keys.c.may_disable_safety_checker,
)


# -- engines -----------------------------------------------------------------------------
def sqlite_path_from_url(url: str) -> Path:
    """``sqlite:///data/x.db`` -> ``data/x.db`` (cwd-relative); ``sqlite:////srv/x.db`` -> ``/srv/x.db``."""
    prefix = "sqlite:///"
    if not url.startswith(prefix):
        raise ValueError(f"a SQLite URL looks like sqlite:///path/to/file.db, got {url!r}")
    path = url[len(prefix) :].split("?", 1)[0]
    if not path or path == ":memory:":
        raise ValueError("the accounts database must be a file shared by all processes, not :memory:")
    return Path(path).expanduser()


def create_engine(url: str, *, busy_timeout_s: float = 10.0) -> sa.Engine:
    """An engine for a database URL, with the settings the store relies on."""
    scheme = url.split(":", 1)[0] if ":" in url else url
    if scheme == "sqlite":
        return _sqlite_engine(sqlite_path_from_url(url), busy_timeout_s)
    if scheme in ("postgresql", "postgresql+psycopg"):
        # psycopg 3 is the driver this package depends on, also for a plain postgresql:// URL.
        url = "postgresql+psycopg:" + url.split(":", 1)[1]
        return sa.create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=8)
    raise ValueError(f"unsupported accounts database URL scheme {scheme!r}: use {SUPPORTED_URLS}")


def _sqlite_engine(path: Path, busy_timeout_s: float) -> sa.Engine:
    path = path.absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(
        f"sqlite:///{path}",
        connect_args={"timeout": busy_timeout_s, "check_same_thread": False},
        pool_size=8,
        max_overflow=32,
    )

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        # Transactions are ours (see _begin): the driver must not open them on its own.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute("PRAGMA synchronous = NORMAL")
        # Persistent in the file; asking again when it already is WAL is a cheap no-op.
        mode = cursor.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        cursor.close()
        if str(mode).lower() != "wal":
            raise AccountsError(f"could not put {path} in WAL mode (got {mode!r})")

    @event.listens_for(engine, "begin")
    def _begin(connection: sa.Connection) -> None:
        # Writers ask for IMMEDIATE (execution option sqlite_begin); readers get a deferred
        # transaction, one snapshot from their first read.
        mode = connection.get_execution_options().get("sqlite_begin", "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")

    return engine


def open_store(url: str) -> AccountStore:
    """The store of a database URL, its schema upgraded to this code's (``migrate``)."""
    engine = create_engine(url)
    try:
        upgrade(engine)
    except BaseException:
        engine.dispose()
        raise
    return AccountStore(engine)


def issue_key(store: AccountStore, name: str, **kwargs: Any) -> IssuedKey:
    """Create a key with a fresh secret; the secret is returned here and nowhere else."""
    secret = generate_key()
    record = store.create_key(name, hash_key(secret), **kwargs)
    return IssuedKey(record=record, secret=secret)


# -- the store ---------------------------------------------------------------------------
class AccountStore:
    def __init__(self, engine: sa.Engine) -> None:
        """Over an engine from ``create_engine`` whose schema is current (``open_store``)."""
        self.engine = engine
        self.dialect = engine.dialect.name
        self._writer = engine.execution_options(sqlite_begin="IMMEDIATE")
        # SQLite: threads of this process queue on a Python lock (woken at once) rather than
        # on SQLite's busy handler, which polls with sleeps of up to tens of milliseconds.
        # PostgreSQL locks rows, not the database: nothing to queue on here.
        self._write_lock = threading.Lock() if self.dialect == "sqlite" else contextlib.nullcontext()

    @property
    def url(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    def __repr__(self) -> str:
        return f"AccountStore({self.url!r})"

    @contextlib.contextmanager
    def _write(self) -> Iterator[sa.Connection]:
        with self._write_lock, self._writer.begin() as conn:
            yield conn

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[sa.Connection]:
        """A read-only transaction whose reads all see one moment."""
        with self.engine.connect() as conn:
            if self.dialect == "postgresql":
                conn = conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                yield conn

    def _insert_if_absent(self, table: sa.Table) -> Any:
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        return insert(table).on_conflict_do_nothing()

    def close(self) -> None:
        self.engine.dispose()

    # -- keys ------------------------------------------------------------------------
    @staticmethod
    def _key(row: Any) -> ApiKey:
        return ApiKey(
            id=row.id,
            name=row.name,
            created=row.created,
            revoked_at=row.revoked_at,
            balance_units=int(row.balance_units),
            allowed_models=None if row.allowed_models is None else frozenset(json.loads(row.allowed_models)),
            rpm=row.rpm,
            ipm=row.ipm,
            may_disable_safety_checker=bool(row.may_disable_safety_checker),
        )

    def _one_key(self, where: Any, missing: str) -> ApiKey:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(*_KEY_COLUMNS).where(where)).first()
        if row is None:
            raise KeyNotFound(missing)
        return self._key(row)

    def create_key(
        self,
        name: str,
        key_hash: str,
        *,
        credits_units: int = 0,
        allowed_models: Iterable[str] | None = None,
        rpm: int | None = None,
        ipm: int | None = None,
        may_disable_safety_checker: bool = False,
    ) -> ApiKey:
        """Raises DuplicateKeyName. Initial credits are a 'credit' ledger row."""
        validate_key_name(name)
        if credits_units < 0:
            raise ValueError("credits must not be negative")
        for limit, label in ((rpm, "rpm"), (ipm, "ipm")):
            if limit is not None and limit <= 0:
                raise ValueError(f"{label} must be a positive integer")
        models = None if allowed_models is None else json.dumps(sorted(set(allowed_models)))
        now = time.time()
        try:
            with self._write() as conn:
                key_id = conn.execute(
                    sa.insert(keys).values(
                        name=name,
                        key_hash=key_hash,
                        created=now,
                        balance_units=credits_units,
                        allowed_models=models,
                        rpm=rpm,
                        ipm=ipm,
                        may_disable_safety_checker=may_disable_safety_checker,
                    )
                ).inserted_primary_key[0]
                if credits_units:
                    self._ledger_row(conn, now, None, key_id, None, "credit", 0, credits_units, None)
        except IntegrityError:
            with self.engine.connect() as conn:
                taken = conn.execute(sa.select(keys.c.id).where(keys.c.name == name)).first() is not None
            if taken:
                raise DuplicateKeyName(f"a key named {name!r} already exists") from None
            raise
        return self.key_by_name(name)

    def key_by_hash(self, key_hash: str) -> ApiKey | None:
        """The key with this hash, revoked or not; None when there is none."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(*_KEY_COLUMNS, keys.c.key_hash).where(keys.c.key_hash == key_hash)).first()
        if row is None or not hashes_match(row.key_hash, key_hash):  # the index found it; compare anyway
            return None
        return self._key(row)

    def key_by_name(self, name: str) -> ApiKey:
        return self._one_key(keys.c.name == name, f"no key named {name!r}")

    def key_by_id(self, key_id: int) -> ApiKey:
        return self._one_key(keys.c.id == key_id, f"no key with id {key_id}")

    def list_keys(self) -> list[ApiKey]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(*_KEY_COLUMNS).order_by(keys.c.name)).all()
        return [self._key(row) for row in rows]

    def set_safety_permission(self, name: str, allowed: bool) -> ApiKey:
        """Whether the key may send ``disable_safety_checker: true``. Raises KeyNotFound."""
        with self._write() as conn:
            conn.execute(sa.update(keys).where(keys.c.name == name).values(may_disable_safety_checker=allowed))
        return self.key_by_name(name)  # KeyNotFound if there is none

    def revoke_key(self, name: str) -> ApiKey:
        """Idempotent: revoking a revoked key returns it unchanged. Raises KeyNotFound."""
        with self._write() as conn:
            conn.execute(
                sa.update(keys).where(keys.c.name == name, keys.c.revoked_at.is_(None)).values(revoked_at=time.time())
            )
        return self.key_by_name(name)

    def add_credits(self, name: str, credits_units: int) -> ApiKey:
        """Raises KeyNotFound, KeyRevoked, ValueError (amount <= 0)."""
        if credits_units <= 0:
            raise ValueError("credits to add must be greater than zero")
        with self._write() as conn:
            key_id = conn.execute(
                sa.update(keys)
                .where(keys.c.name == name, keys.c.revoked_at.is_(None))
                .values(balance_units=keys.c.balance_units + credits_units)
                .returning(keys.c.id)
            ).scalar_one_or_none()
            if key_id is None:
                self.key_by_name(name)  # KeyNotFound if there is none
                raise KeyRevoked(f"key {name!r} is revoked")
            self._ledger_row(conn, time.time(), None, key_id, None, "credit", 0, credits_units, None)
        return self.key_by_name(name)

    # -- billing ---------------------------------------------------------------------
    @staticmethod
    def _ledger_row(conn, ts, request_id, key_id, model, kind, images, amount, reservation_id) -> None:
        conn.execute(
            sa.insert(ledger).values(
                ts=ts,
                request_id=request_id,
                key_id=key_id,
                model=model,
                kind=kind,
                images=images,
                amount_units=amount,
                reservation_id=reservation_id,
            )
        )

    @staticmethod
    def _balance(conn: sa.Connection, key_id: int) -> int:
        return int(conn.execute(sa.select(keys.c.balance_units).where(keys.c.id == key_id)).scalar_one())

    def reserve(
        self,
        key_id: int,
        request_id: str,
        model: str,
        images: int,
        price_units: int,
        owner: str | None = None,
        claim: IdempotencyClaim | None = None,
    ) -> Reservation | Replay:
        """Hold images x price atomically, or raise InsufficientCredits (carrying the balance
        it saw) / KeyRevoked (revoked meanwhile) with nothing written. ``owner`` names the
        ingress replica whose request holds it (``release_orphaned``).

        With ``claim``, the Idempotency-Key is claimed in the same transaction: the first
        attempt gets its reservation, and the claim lives exactly as long as that
        reservation is open (``settle`` stores the outcome with the charge, or deletes the
        claim with the refund). A later attempt gets ``Replay`` of a charged outcome, or
        IdempotencyKeyInUse while the first one holds its reservation, or
        IdempotencyKeyReused if the key was claimed for another request; either way nothing
        is held."""
        if images <= 0:
            raise ValueError("images must be positive")
        if price_units < 0:
            raise ValueError("price must not be negative")
        amount = images * price_units
        status = sa.select(keys.c.balance_units, keys.c.revoked_at).where(keys.c.id == key_id)
        # Lock-free fast path for the common rejection: a balance read now that cannot
        # cover the amount is a valid answer at this instant (402s never queue for the lock).
        # A replay of a charged outcome is never refused for the balance, so not with a claim.
        if claim is None:
            with self.engine.connect() as conn:
                row = conn.execute(status).first()
            if row is None or row.revoked_at is not None or row.balance_units < amount:
                self._refuse(row, images, model, amount)
        now = time.time()
        with self._write() as conn:
            if claim is not None:
                replay = self._claim(conn, key_id, claim, owner, now)
                if replay is not None:
                    return replay
            balance = conn.execute(
                sa.update(keys)
                .where(keys.c.id == key_id, keys.c.revoked_at.is_(None), keys.c.balance_units >= amount)
                .values(balance_units=keys.c.balance_units - amount)
                .returning(keys.c.balance_units)
            ).scalar_one_or_none()
            if balance is None:  # raising rolls the claim back with everything else
                self._refuse(conn.execute(status).first(), images, model, amount)
            reservation_id = conn.execute(
                sa.insert(reservations).values(
                    key_id=key_id,
                    request_id=request_id,
                    model=model,
                    images=images,
                    price_units=price_units,
                    created=now,
                    owner=owner,
                )
            ).inserted_primary_key[0]
            self._ledger_row(conn, now, request_id, key_id, model, "reserve", images, -amount, reservation_id)
            if claim is not None:
                i = idempotency.c
                conn.execute(
                    sa.update(idempotency)
                    .where(i.key_id == key_id, i.idem_key == claim.idem_key)
                    .values(reservation_id=reservation_id)
                )
        return Reservation(reservation_id, key_id, request_id, model, images, price_units, now, int(balance))

    def _claim(
        self, conn: sa.Connection, key_id: int, claim: IdempotencyClaim, owner: str | None, now: float
    ) -> Replay | None:
        """Claim the key inside the reservation's transaction: None when this attempt is the
        first (the caller links its reservation), a Replay when one was charged, else raise."""
        i = idempotency.c
        # RETURNING, not rowcount: psycopg does not report this INSERT's row count.
        inserted = conn.execute(
            self._insert_if_absent(idempotency)
            .values(key_id=key_id, idem_key=claim.idem_key, fingerprint=claim.fingerprint, owner=owner, created=now)
            .returning(i.key_id)
        ).first()
        if inserted is not None:
            return None
        this = (i.key_id == key_id, i.idem_key == claim.idem_key)
        row = conn.execute(sa.select(i.fingerprint, i.outcome, i.created).where(*this)).first()
        if row is not None and row.outcome is not None and row.created < now - claim.window_s:
            # An outcome past its window (its stored images may be gone): the key is free again.
            conn.execute(sa.delete(idempotency).where(*this))
            return self._claim(conn, key_id, claim, owner, now)
        if row is None:
            # Settled and deleted between our INSERT and this read (possible on PostgreSQL,
            # whose reads see other transactions' commits): the retry will find it free.
            raise IdempotencyKeyInUse("the first attempt is finishing")
        if row.fingerprint != claim.fingerprint:
            raise IdempotencyKeyReused("the Idempotency-Key was used for a different request")
        if row.outcome is None:
            raise IdempotencyKeyInUse("the first attempt is still running")
        return Replay(bytes(row.outcome))

    @staticmethod
    def _refuse(row: Any, images: int, model: str, amount: int) -> NoReturn:
        if row is None or row.revoked_at is not None:
            raise KeyRevoked("the key is revoked")
        raise InsufficientCredits(images=images, model=model, amount_units=amount, balance_units=int(row.balance_units))

    def settle(self, reservation_id: int, delivered: int, outcome: bytes | None = None) -> Settlement:
        """Charge delivered x price, refund the rest. Idempotent: a second call changes
        nothing and returns the first outcome with ``already_settled=True``.

        The reservation's Idempotency-Key claim, if it has one, ends in the same
        transaction: a charge stores ``outcome`` for replays, a full refund (or a charge
        with no outcome to replay) deletes the claim so a retry runs anew. A stored outcome
        is therefore always a charged one, and no claim outlives its reservation."""
        now = time.time()
        r = reservations.c
        with self._write() as conn:
            row = conn.execute(
                sa.select(r.key_id, r.request_id, r.model, r.images, r.price_units, r.settled_at, r.delivered).where(
                    r.id == reservation_id
                )
            ).first()
            if row is None:
                raise AccountsError(f"no reservation {reservation_id}")
            price = int(row.price_units)
            delivered = max(0, min(int(delivered), row.images))  # never charge beyond the hold
            won = row.settled_at is None and (
                conn.execute(
                    sa.update(reservations)
                    .where(r.id == reservation_id, r.settled_at.is_(None))
                    .values(settled_at=now, delivered=delivered)
                ).rowcount
                == 1
            )
            if not won:  # settled before, or by a concurrent call that committed first
                done = conn.execute(sa.select(r.delivered).where(r.id == reservation_id)).scalar_one()
                balance = self._balance(conn, row.key_id)
                return Settlement(
                    reservation_id, done, done * price, (row.images - done) * price, balance, already_settled=True
                )
            undelivered = row.images - delivered
            self._ledger_row(conn, now, row.request_id, row.key_id, row.model, "charge", delivered, 0, reservation_id)
            if undelivered:
                refund = undelivered * price
                conn.execute(
                    sa.update(keys).where(keys.c.id == row.key_id).values(balance_units=keys.c.balance_units + refund)
                )
                self._ledger_row(
                    conn, now, row.request_id, row.key_id, row.model, "refund", undelivered, refund, reservation_id
                )
            self._end_claim(conn, reservation_id, outcome if delivered else None)
            balance = self._balance(conn, row.key_id)
        return Settlement(reservation_id, delivered, delivered * price, undelivered * price, balance)

    @staticmethod
    def _end_claim(conn: sa.Connection, reservation_id: int, outcome: bytes | None) -> None:
        claim = idempotency.c.reservation_id == reservation_id
        if outcome is None:
            conn.execute(sa.delete(idempotency).where(claim, idempotency.c.outcome.is_(None)))
        else:
            conn.execute(sa.update(idempotency).where(claim).values(outcome=outcome))

    def _settle_all(self, where: Any) -> list[Settlement]:
        r = reservations.c
        with self.engine.connect() as conn:
            ids = conn.execute(sa.select(r.id).where(r.settled_at.is_(None), where).order_by(r.id)).scalars().all()
        settled = [self.settle(reservation_id, 0) for reservation_id in ids]
        return [s for s in settled if not s.already_settled]

    def release_stale(self, older_than_s: float) -> list[Settlement]:
        """Settle (deliver 0, refund all) reservations left open longer than this: the
        requests of a replica that died mid-flight."""
        return self._settle_all(reservations.c.created < time.time() - older_than_s)

    def open_owners(self) -> set[str]:
        """The owners of reservations still open."""
        r = reservations.c
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(r.owner).distinct().where(r.settled_at.is_(None), r.owner.is_not(None)))
            return set(rows.scalars())

    def release_orphaned(self, dead_owners: Iterable[str]) -> list[Settlement]:
        """Settle (deliver 0, refund all) the open reservations of these owners: ingress
        replicas that are gone, whose requests can no longer deliver."""
        owners = sorted(set(dead_owners))
        return self._settle_all(reservations.c.owner.in_(owners)) if owners else []

    def recent_admissions(self, key_ids: Iterable[int], window_s: float) -> dict[int, list[tuple[float, int]]]:
        """``{key_id: [(seconds ago, images), ...]}`` of the reservations made in the last
        ``window_s``: what the rate limiter admitted and the ingress went on to generate."""
        r = reservations.c
        now = time.time()
        history: dict[int, list[tuple[float, int]]] = {}
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(r.key_id, r.created, r.images).where(r.key_id.in_(list(key_ids)), r.created >= now - window_s)
            )
            for key_id, created, images in rows:
                history.setdefault(key_id, []).append((max(0.0, now - created), images))
        return history

    # -- idempotency -----------------------------------------------------------------
    def forget_idempotency(self, older_than_s: float) -> int:
        """Drop outcomes older than the window; returns how many. A claim still waiting for
        its outcome ends with its reservation, not here."""
        i = idempotency.c
        with self._write() as conn:
            return conn.execute(
                sa.delete(idempotency).where(i.created < time.time() - older_than_s, i.outcome.is_not(None))
            ).rowcount

    # -- reporting -------------------------------------------------------------------
    def usage(self, key_id: int) -> Usage:
        r = reservations.c
        with self._snapshot() as conn:
            key = conn.execute(sa.select(keys.c.name, keys.c.balance_units).where(keys.c.id == key_id)).first()
            if key is None:
                raise KeyNotFound(f"no key with id {key_id}")
            reserved = conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(r.images * r.price_units), 0)).where(
                    r.key_id == key_id, r.settled_at.is_(None)
                )
            ).scalar_one()
            rows = conn.execute(
                sa.select(
                    r.model,
                    sa.func.sum(sa.case((r.delivered > 0, 1), else_=0)),
                    sa.func.sum(r.delivered),
                    sa.func.sum(r.delivered * r.price_units),
                )
                .where(r.key_id == key_id, r.settled_at.is_not(None))
                .group_by(r.model)
                .having(sa.func.sum(r.delivered) > 0)
                .order_by(r.model)
            ).all()
        by_model = tuple(ModelUsage(model, int(n), int(images), int(units)) for model, n, images, units in rows)
        return Usage(key.name, int(key.balance_units), int(reserved), by_model)

    def ledger(self, key_id: int) -> list[LedgerEntry]:
        columns = ("id", "ts", "request_id", "key_id", "model", "kind", "images", "amount_units")
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(*(ledger.c[name] for name in columns)).where(ledger.c.key_id == key_id).order_by(ledger.c.id)
            ).all()
        return [LedgerEntry(*row[:-1], int(row[-1])) for row in rows]

    def inconsistencies(self) -> list[str]:
        """Keys whose balance differs from their ledger sum, or is negative; reservations
        without their ledger rows. Empty: sound."""
        problems: list[str] = []
        with self._snapshot() as conn:
            for name, balance, total in conn.execute(
                sa.text(
                    "SELECT k.name, k.balance_units, COALESCE(SUM(l.amount_units), 0)"
                    " FROM keys k LEFT JOIN ledger l ON l.key_id = k.id GROUP BY k.id ORDER BY k.id"
                )
            ):
                if int(balance) != int(total):
                    problems.append(f"key {name!r}: balance {balance} != ledger sum {total}")
                if balance < 0:
                    problems.append(f"key {name!r}: negative balance {balance}")
            checks = {
                "no matching reserve row": "SELECT r.id FROM reservations r WHERE NOT EXISTS (SELECT 1 FROM ledger l"
                " WHERE l.reservation_id = r.id AND l.kind = 'reserve'"
                " AND l.amount_units = -(r.images * r.price_units) AND l.images = r.images)",
                "settled without a matching charge row": "SELECT r.id FROM reservations r"
                " WHERE r.settled_at IS NOT NULL AND NOT EXISTS (SELECT 1 FROM ledger l"
                " WHERE l.reservation_id = r.id AND l.kind = 'charge' AND l.images = r.delivered)",
                "refund does not match undelivered images": "SELECT r.id FROM reservations r"
                " WHERE r.settled_at IS NOT NULL AND (r.images - r.delivered) * r.price_units !="
                " COALESCE((SELECT SUM(l.amount_units) FROM ledger l WHERE l.reservation_id = r.id"
                " AND l.kind = 'refund'), 0)",
            }
            for problem, query in checks.items():
                problems += [f"reservation {rid}: {problem}" for rid in conn.execute(sa.text(query)).scalars()]
        return problems


__all__ = [
    "SUPPORTED_URLS",
    "AccountStore",
    "create_engine",
    "issue_key",
    "open_store",
    "sqlite_path_from_url",
]
