"""``AccountStore`` on one SQLite file, shared by every ingress replica and the CLI.

- WAL mode: readers never block the writer and vice versa.
- Every write is one ``BEGIN IMMEDIATE`` transaction (the write lock is taken up front, so
  a transaction never fails half-way on lock upgrade); ``busy_timeout`` makes the other
  processes wait for it instead of failing.
- A reservation is a conditional ``UPDATE ... WHERE balance_units >= amount``: it either
  holds the whole amount or changes nothing. ``CHECK (balance_units >= 0)`` backs it up.
- One connection per thread (sqlite3 connections must not be shared across threads
  mid-transaction); the async facade runs this code on a small thread pool.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from serve_app.accounts.keys import hashes_match
from serve_app.accounts.records import (
    ApiKey,
    LedgerEntry,
    ModelUsage,
    Reservation,
    Settlement,
    Usage,
)
from serve_app.accounts.schema import migrate
from serve_app.accounts.shortfall import CreditShortfall
from serve_app.accounts.store import (
    AccountsError,
    DuplicateKeyName,
    KeyNotFound,
    KeyRevoked,
)
from serve_app.errors import InvalidAPIKey

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_KEY_COLUMNS = "id, name, created, revoked_at, balance_units, allowed_models, rpm, ipm, may_disable_safety_checker"


def sqlite_path_from_url(url: str) -> Path:
    """``sqlite:///data/x.db`` -> ``data/x.db`` (cwd-relative); ``sqlite:////srv/x.db`` -> ``/srv/x.db``."""
    prefix = "sqlite:///"
    if not url.startswith(prefix):
        raise ValueError(f"a SQLite URL looks like sqlite:///path/to/file.db, got {url!r}")
    path = url[len(prefix) :].split("?", 1)[0]
    if not path or path == ":memory:":
        raise ValueError("the accounts database must be a file shared by all processes, not :memory:")
    return Path(path).expanduser()


def validate_key_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise AccountsError(
            f"invalid key name {name!r}: use 1-64 letters, digits, '.', '_', '-' or '@', "
            "starting with a letter or digit"
        )
    return name


class SQLiteAccountStore:
    def __init__(self, path: str | Path, *, busy_timeout_s: float = 10.0, synchronous: str = "NORMAL") -> None:
        if synchronous.upper() not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
            raise ValueError(f"bad synchronous mode {synchronous!r}")
        self.path = Path(path).expanduser().absolute()
        self._busy_timeout_s = busy_timeout_s
        self._synchronous = synchronous.upper()
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._closed = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = self._conn()
        # Persistent in the file; asking again when it already is WAL is a cheap no-op.
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise AccountsError(f"could not put {self.path} in WAL mode (got {mode!r})")
        migrate(conn)

    @classmethod
    def from_url(cls, url: str, **kwargs) -> SQLiteAccountStore:
        return cls(sqlite_path_from_url(url), **kwargs)

    def __repr__(self) -> str:
        return f"SQLiteAccountStore({str(self.path)!r})"

    # -- connections -----------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise AccountsError("the accounts store is closed")
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self.path,
                timeout=self._busy_timeout_s,  # sets busy_timeout
                isolation_level=None,  # autocommit: transactions are explicit
                check_same_thread=False,  # only so close() may run on another thread
            )
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_s * 1000)}")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        # Threads of this process queue on a Python lock (woken at once) rather than on
        # SQLite's busy handler, which polls with sleeps of up to tens of milliseconds.
        # Other processes still meet the file lock and busy_timeout.
        with self._write_lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for conn in connections:
            try:
                conn.close()
            except sqlite3.Error:
                pass

    # -- keys ------------------------------------------------------------------------
    @staticmethod
    def _key(row: tuple) -> ApiKey:
        key_id, name, created, revoked_at, balance, models, rpm, ipm, may_disable_safety = row
        return ApiKey(
            id=key_id,
            name=name,
            created=created,
            revoked_at=revoked_at,
            balance_units=balance,
            allowed_models=None if models is None else frozenset(json.loads(models)),
            rpm=rpm,
            ipm=ipm,
            may_disable_safety_checker=bool(may_disable_safety),
        )

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
                    "INSERT INTO keys (name, key_hash, created, balance_units, allowed_models, rpm, ipm,"
                    " may_disable_safety_checker) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (name, key_hash, now, credits_units, models, rpm, ipm, int(may_disable_safety_checker)),
                ).lastrowid
                if credits_units:
                    self._ledger_row(conn, now, None, key_id, None, "credit", 0, credits_units, None)
        except sqlite3.IntegrityError as exc:
            if "keys.name" in str(exc):
                raise DuplicateKeyName(f"a key named {name!r} already exists") from None
            raise
        return self.key_by_name(name)

    def key_by_hash(self, key_hash: str) -> ApiKey | None:
        row = (
            self._conn()
            .execute(f"SELECT {_KEY_COLUMNS}, key_hash FROM keys WHERE key_hash = ?", (key_hash,))
            .fetchone()
        )
        if row is None:
            return None
        if not hashes_match(row[-1], key_hash):  # the index found it; compare anyway
            return None
        return self._key(row[:-1])

    def key_by_name(self, name: str) -> ApiKey:
        row = self._conn().execute(f"SELECT {_KEY_COLUMNS} FROM keys WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise KeyNotFound(f"no key named {name!r}")
        return self._key(row)

    def key_by_id(self, key_id: int) -> ApiKey:
        row = self._conn().execute(f"SELECT {_KEY_COLUMNS} FROM keys WHERE id = ?", (key_id,)).fetchone()
        if row is None:
            raise KeyNotFound(f"no key with id {key_id}")
        return self._key(row)

    def list_keys(self) -> list[ApiKey]:
        rows = self._conn().execute(f"SELECT {_KEY_COLUMNS} FROM keys ORDER BY name").fetchall()
        return [self._key(row) for row in rows]

    def revoke_key(self, name: str) -> ApiKey:
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE keys SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL", (time.time(), name)
            )
            if cur.rowcount == 0 and conn.execute("SELECT 1 FROM keys WHERE name = ?", (name,)).fetchone() is None:
                raise KeyNotFound(f"no key named {name!r}")
        return self.key_by_name(name)

    def set_safety_permission(self, name: str, allowed: bool) -> ApiKey:
        with self._write() as conn:
            cur = conn.execute("UPDATE keys SET may_disable_safety_checker = ? WHERE name = ?", (int(allowed), name))
            if cur.rowcount == 0:
                raise KeyNotFound(f"no key named {name!r}")
        return self.key_by_name(name)

    def add_credits(self, name: str, credits_units: int) -> ApiKey:
        if credits_units <= 0:
            raise ValueError("credits to add must be greater than zero")
        with self._write() as conn:
            row = conn.execute("SELECT id, revoked_at FROM keys WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise KeyNotFound(f"no key named {name!r}")
            if row[1] is not None:
                raise KeyRevoked(f"key {name!r} is revoked")
            conn.execute("UPDATE keys SET balance_units = balance_units + ? WHERE id = ?", (credits_units, row[0]))
            self._ledger_row(conn, time.time(), None, row[0], None, "credit", 0, credits_units, None)
        return self.key_by_name(name)

    # -- billing ---------------------------------------------------------------------
    @staticmethod
    def _ledger_row(conn, ts, request_id, key_id, model, kind, images, amount, reservation_id) -> None:
        conn.execute(
            "INSERT INTO ledger (ts, request_id, key_id, model, kind, images, amount_units, reservation_id)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (ts, request_id, key_id, model, kind, images, amount, reservation_id),
        )

    def reserve(
        self, key_id: int, request_id: str, model: str, images: int, price_units: int, owner: str | None = None
    ) -> Reservation:
        if images <= 0:
            raise ValueError("images must be positive")
        if price_units < 0:
            raise ValueError("price must not be negative")
        amount = images * price_units
        # Lock-free fast path for the common rejection: a balance read now that cannot
        # cover the amount is a valid answer at this instant (402s never queue for the lock).
        row = self._conn().execute("SELECT balance_units, revoked_at FROM keys WHERE id = ?", (key_id,)).fetchone()
        if row is None or row[1] is not None or row[0] < amount:
            self._refuse(row, images, model, amount)
        now = time.time()
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE keys SET balance_units = balance_units - ?"
                " WHERE id = ? AND revoked_at IS NULL AND balance_units >= ?",
                (amount, key_id, amount),
            )
            if cur.rowcount != 1:
                row = conn.execute("SELECT balance_units, revoked_at FROM keys WHERE id = ?", (key_id,)).fetchone()
                self._refuse(row, images, model, amount)
            reservation_id = conn.execute(
                "INSERT INTO reservations (key_id, request_id, model, images, price_units, created, owner)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key_id, request_id, model, images, price_units, now, owner),
            ).lastrowid
            self._ledger_row(conn, now, request_id, key_id, model, "reserve", images, -amount, reservation_id)
            balance = conn.execute("SELECT balance_units FROM keys WHERE id = ?", (key_id,)).fetchone()[0]
        return Reservation(reservation_id, key_id, request_id, model, images, price_units, now, balance)

    @staticmethod
    def _refuse(row: tuple | None, images: int, model: str, amount: int) -> NoReturn:
        if row is None or row[1] is not None:
            raise InvalidAPIKey("The API key provided has been revoked.")
        raise CreditShortfall(images=images, model=model, amount_units=amount, balance_units=row[0])

    def settle(self, reservation_id: int, delivered: int) -> Settlement:
        now = time.time()
        with self._write() as conn:
            row = conn.execute(
                "SELECT key_id, request_id, model, images, price_units, settled_at, delivered"
                " FROM reservations WHERE id = ?",
                (reservation_id,),
            ).fetchone()
            if row is None:
                raise AccountsError(f"no reservation {reservation_id}")
            key_id, request_id, model, images, price, settled_at, done = row
            if settled_at is not None:
                balance = conn.execute("SELECT balance_units FROM keys WHERE id = ?", (key_id,)).fetchone()[0]
                return Settlement(
                    reservation_id, done, done * price, (images - done) * price, balance, already_settled=True
                )
            delivered = max(0, min(int(delivered), images))  # never charge beyond the hold
            undelivered = images - delivered
            conn.execute(
                "UPDATE reservations SET settled_at = ?, delivered = ? WHERE id = ?",
                (now, delivered, reservation_id),
            )
            self._ledger_row(conn, now, request_id, key_id, model, "charge", delivered, 0, reservation_id)
            if undelivered:
                refund = undelivered * price
                conn.execute("UPDATE keys SET balance_units = balance_units + ? WHERE id = ?", (refund, key_id))
                self._ledger_row(conn, now, request_id, key_id, model, "refund", undelivered, refund, reservation_id)
            balance = conn.execute("SELECT balance_units FROM keys WHERE id = ?", (key_id,)).fetchone()[0]
        return Settlement(reservation_id, delivered, delivered * price, undelivered * price, balance)

    def release_stale(self, older_than_s: float) -> list[Settlement]:
        cutoff = time.time() - older_than_s
        ids = [
            row[0]
            for row in self._conn().execute(
                "SELECT id FROM reservations WHERE settled_at IS NULL AND created < ? ORDER BY id", (cutoff,)
            )
        ]
        settled = [self.settle(reservation_id, 0) for reservation_id in ids]
        return [s for s in settled if not s.already_settled]

    def open_owners(self) -> set[str]:
        rows = self._conn().execute(
            "SELECT DISTINCT owner FROM reservations WHERE settled_at IS NULL AND owner IS NOT NULL"
        )
        return {row[0] for row in rows}

    def release_orphaned(self, dead_owners: Iterable[str]) -> list[Settlement]:
        settled = []
        for owner in sorted(set(dead_owners)):
            ids = [
                row[0]
                for row in self._conn().execute(
                    "SELECT id FROM reservations WHERE settled_at IS NULL AND owner = ? ORDER BY id", (owner,)
                )
            ]
            settled += [self.settle(reservation_id, 0) for reservation_id in ids]
        return [s for s in settled if not s.already_settled]

    # -- idempotency -----------------------------------------------------------------
    def claim_idempotency(
        self, key_id: int, idem_key: str, fingerprint: str, owner: str | None, stale_after_s: float
    ) -> tuple[str, bytes | None]:
        now = time.time()
        with self._write() as conn:
            row = conn.execute(
                "SELECT fingerprint, created, outcome FROM idempotency WHERE key_id = ? AND idem_key = ?",
                (key_id, idem_key),
            ).fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO idempotency (key_id, idem_key, fingerprint, owner, created) VALUES (?, ?, ?, ?, ?)",
                    (key_id, idem_key, fingerprint, owner, now),
                )
                return "claimed", None
            found, created, outcome = row
            if found != fingerprint:
                return "conflict", None
            if outcome is not None:
                return "done", bytes(outcome)
            if created < now - stale_after_s:  # its attempt died without an outcome: take over
                conn.execute(
                    "UPDATE idempotency SET owner = ?, created = ? WHERE key_id = ? AND idem_key = ?",
                    (owner, now, key_id, idem_key),
                )
                return "claimed", None
            return "running", None

    def complete_idempotency(self, key_id: int, idem_key: str, outcome: bytes) -> None:
        with self._write() as conn:
            conn.execute(
                "UPDATE idempotency SET outcome = ? WHERE key_id = ? AND idem_key = ?", (outcome, key_id, idem_key)
            )

    def release_idempotency(self, key_id: int, idem_key: str) -> None:
        with self._write() as conn:
            conn.execute(
                "DELETE FROM idempotency WHERE key_id = ? AND idem_key = ? AND outcome IS NULL", (key_id, idem_key)
            )

    def forget_idempotency(self, older_than_s: float) -> int:
        with self._write() as conn:
            return conn.execute("DELETE FROM idempotency WHERE created < ?", (time.time() - older_than_s,)).rowcount

    # -- reporting -------------------------------------------------------------------
    def usage(self, key_id: int) -> Usage:
        conn = self._conn()
        conn.execute("BEGIN")  # one snapshot for the three reads
        try:
            key = conn.execute("SELECT name, balance_units FROM keys WHERE id = ?", (key_id,)).fetchone()
            if key is None:
                raise KeyNotFound(f"no key with id {key_id}")
            reserved = conn.execute(
                "SELECT COALESCE(SUM(images * price_units), 0) FROM reservations"
                " WHERE key_id = ? AND settled_at IS NULL",
                (key_id,),
            ).fetchone()[0]
            rows = conn.execute(
                "SELECT model, SUM(delivered > 0), SUM(delivered), SUM(delivered * price_units)"
                " FROM reservations WHERE key_id = ? AND settled_at IS NOT NULL"
                " GROUP BY model HAVING SUM(delivered) > 0 ORDER BY model",
                (key_id,),
            ).fetchall()
        finally:
            conn.execute("COMMIT")
        return Usage(key[0], key[1], reserved, tuple(ModelUsage(*row) for row in rows))

    def ledger(self, key_id: int) -> list[LedgerEntry]:
        rows = (
            self._conn()
            .execute(
                "SELECT id, ts, request_id, key_id, model, kind, images, amount_units FROM ledger"
                " WHERE key_id = ? ORDER BY id",
                (key_id,),
            )
            .fetchall()
        )
        return [LedgerEntry(*row) for row in rows]

    def inconsistencies(self) -> list[str]:
        conn = self._conn()
        problems: list[str] = []
        conn.execute("BEGIN")
        try:
            for name, balance, total in conn.execute(
                "SELECT k.name, k.balance_units, COALESCE(SUM(l.amount_units), 0)"
                " FROM keys k LEFT JOIN ledger l ON l.key_id = k.id GROUP BY k.id ORDER BY k.id"
            ):
                if balance != total:
                    problems.append(f"key {name!r}: balance {balance} != ledger sum {total}")
                if balance < 0:
                    problems.append(f"key {name!r}: negative balance {balance}")
            for (rid,) in conn.execute(
                "SELECT r.id FROM reservations r WHERE NOT EXISTS (SELECT 1 FROM ledger l"
                " WHERE l.reservation_id = r.id AND l.kind = 'reserve'"
                " AND l.amount_units = -(r.images * r.price_units) AND l.images = r.images)"
            ):
                problems.append(f"reservation {rid}: no matching reserve row")
            for (rid,) in conn.execute(
                "SELECT r.id FROM reservations r WHERE r.settled_at IS NOT NULL AND NOT EXISTS"
                " (SELECT 1 FROM ledger l WHERE l.reservation_id = r.id AND l.kind = 'charge'"
                " AND l.images = r.delivered)"
            ):
                problems.append(f"reservation {rid}: settled without a matching charge row")
            for (rid,) in conn.execute(
                "SELECT r.id FROM reservations r WHERE r.settled_at IS NOT NULL AND"
                " (r.images - r.delivered) * r.price_units != COALESCE((SELECT SUM(l.amount_units)"
                " FROM ledger l WHERE l.reservation_id = r.id AND l.kind = 'refund'), 0)"
            ):
                problems.append(f"reservation {rid}: refund does not match undelivered images")
        finally:
            conn.execute("COMMIT")
        return problems


__all__ = ["NAME_PATTERN", "SQLiteAccountStore", "sqlite_path_from_url", "validate_key_name"]
