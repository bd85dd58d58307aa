"""The SQLite schema, as an ordered list of migrations keyed by ``PRAGMA user_version``.

Never edit a released migration: append a new one. ``migrate`` runs inside one
``BEGIN IMMEDIATE`` transaction, so several processes opening a fresh file at once apply
each migration exactly once.

Ledger conventions (balance == SUM(ledger.amount_units) for every key, always):
  credit   +units                 operator top-up (also a key's initial credits)
  reserve  -(images x price)      credits held before any work starts
  charge   0, images = delivered  records what was delivered; the money already moved at reserve
  refund   +(undelivered x price) the part of the hold that was not delivered
"""

from __future__ import annotations

import sqlite3

MIGRATIONS: list[str] = [
    # 1: keys, reservations, ledger
    """
    CREATE TABLE keys (
        id             INTEGER PRIMARY KEY AUTOINCREMENT,
        name           TEXT    NOT NULL UNIQUE,
        key_hash       TEXT    NOT NULL UNIQUE,
        created        REAL    NOT NULL,
        revoked_at     REAL,
        balance_units  INTEGER NOT NULL DEFAULT 0 CHECK (balance_units >= 0),
        allowed_models TEXT,                    -- JSON array; NULL: every model
        rpm            INTEGER CHECK (rpm IS NULL OR rpm > 0),  -- NULL: config default
        ipm            INTEGER CHECK (ipm IS NULL OR ipm > 0)
    );
    CREATE TABLE reservations (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        key_id       INTEGER NOT NULL REFERENCES keys(id),
        request_id   TEXT    NOT NULL,
        model        TEXT    NOT NULL,
        images       INTEGER NOT NULL CHECK (images > 0),
        price_units  INTEGER NOT NULL CHECK (price_units >= 0),
        created      REAL    NOT NULL,
        settled_at   REAL,
        delivered    INTEGER CHECK (delivered IS NULL OR delivered BETWEEN 0 AND images)
    );
    CREATE INDEX reservations_open ON reservations(created) WHERE settled_at IS NULL;
    CREATE INDEX reservations_key_model ON reservations(key_id, model);
    CREATE TABLE ledger (
        id             INTEGER PRIMARY KEY AUTOINCREMENT,
        ts             REAL    NOT NULL,
        request_id     TEXT,
        key_id         INTEGER NOT NULL REFERENCES keys(id),
        model          TEXT,
        kind           TEXT    NOT NULL CHECK (kind IN ('reserve', 'charge', 'refund', 'credit')),
        images         INTEGER NOT NULL DEFAULT 0 CHECK (images >= 0),
        amount_units   INTEGER NOT NULL,
        reservation_id INTEGER REFERENCES reservations(id)
    );
    CREATE INDEX ledger_key ON ledger(key_id);
    CREATE INDEX ledger_request ON ledger(request_id);
    -- at most one reserve, one charge and one refund row per reservation
    CREATE UNIQUE INDEX ledger_once ON ledger(reservation_id, kind) WHERE reservation_id IS NOT NULL;
    """,
    # 2: the ingress replica that holds each reservation (its death refunds them), and the
    #    outcomes of requests sent with an Idempotency-Key
    """
    ALTER TABLE reservations ADD COLUMN owner TEXT;
    CREATE INDEX reservations_open_owner ON reservations(owner) WHERE settled_at IS NULL;
    CREATE TABLE idempotency (
        key_id       INTEGER NOT NULL REFERENCES keys(id),
        idem_key     TEXT    NOT NULL,
        fingerprint  TEXT    NOT NULL,           -- what the request asked (a digest)
        owner        TEXT,                       -- the ingress replica running the first attempt
        created      REAL    NOT NULL,
        outcome      BLOB,                       -- NULL while the first attempt runs
        PRIMARY KEY (key_id, idem_key)
    );
    CREATE INDEX idempotency_created ON idempotency(created);
    """,
    # 3: whether a key may send disable_safety_checker: true (an operator's decision per key)
    """
    ALTER TABLE keys ADD COLUMN may_disable_safety_checker INTEGER NOT NULL DEFAULT 0
        CHECK (may_disable_safety_checker IN (0, 1));
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)


class SchemaTooNew(RuntimeError):
    pass


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the database to ``SCHEMA_VERSION``; returns the version found before.

    ``conn`` must be in autocommit mode (isolation_level=None).
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        found = conn.execute("PRAGMA user_version").fetchone()[0]
        if found > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"accounts database schema version {found} is newer than this code "
                f"(version {SCHEMA_VERSION}); upgrade the service"
            )
        for version in range(found, SCHEMA_VERSION):
            for statement in _statements(MIGRATIONS[version]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version + 1}")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return found


def _statements(script: str) -> list[str]:
    """Split a migration into statements (executescript would COMMIT our transaction)."""
    statements, buffer = [], ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    if buffer.strip():
        raise ValueError("migration ends with an incomplete statement")
    return statements


__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "SchemaTooNew", "migrate"]
