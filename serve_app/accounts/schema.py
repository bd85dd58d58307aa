"""The accounts tables as SQLAlchemy Core objects: what the queries of ``store`` are
written against. They describe the schema the Alembic revisions in ``migrations/`` build;
a change here without a new revision there is a bug.

Ledger conventions (balance == SUM(ledger.amount_units) for every key, always):
  credit   +units                 operator top-up (also a key's initial credits)
  reserve  -(images x price)      credits held before any work starts
  charge   0, images = delivered  records what was delivered; the money already moved at reserve
  refund   +(undelivered x price) the part of the hold that was not delivered

Amounts are BIGINT: a credit is a million units, so a 32-bit column would hold 2,147 credits.
Ids are BIGINT on PostgreSQL and INTEGER on SQLite (only INTEGER PRIMARY KEY is SQLite's rowid).
"""

from __future__ import annotations

import sqlalchemy as sa

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

_OPEN = sa.text("settled_at IS NULL")
_BOOKED = sa.text("reservation_id IS NOT NULL")

metadata = sa.MetaData()

keys = sa.Table(
    "keys",
    metadata,
    sa.Column("id", ID, primary_key=True),
    sa.Column("name", sa.Text, nullable=False, unique=True),
    sa.Column("key_hash", sa.Text, nullable=False, unique=True),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float),
    sa.Column("balance_units", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("allowed_models", sa.Text),  # JSON array; NULL: every model
    sa.Column("rpm", sa.Integer),  # NULL: the configured default
    sa.Column("ipm", sa.Integer),
    # An operator allowed this key to turn the models' safety checker off per request.
    sa.Column("may_disable_safety_checker", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.CheckConstraint("balance_units >= 0", name="keys_balance_not_negative"),
    sa.CheckConstraint("rpm IS NULL OR rpm > 0", name="keys_rpm_positive"),
    sa.CheckConstraint("ipm IS NULL OR ipm > 0", name="keys_ipm_positive"),
    sqlite_autoincrement=True,
)

reservations = sa.Table(
    "reservations",
    metadata,
    sa.Column("id", ID, primary_key=True),
    sa.Column("key_id", ID, sa.ForeignKey("keys.id"), nullable=False),
    sa.Column("request_id", sa.Text, nullable=False),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("images", sa.Integer, nullable=False),
    sa.Column("price_units", sa.BigInteger, nullable=False),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("settled_at", sa.Float),
    sa.Column("delivered", sa.Integer),
    sa.Column("owner", sa.Text),  # the ingress replica holding it: its death refunds it
    sa.CheckConstraint("images > 0", name="reservations_images_positive"),
    sa.CheckConstraint("price_units >= 0", name="reservations_price_not_negative"),
    sa.CheckConstraint(
        "delivered IS NULL OR delivered BETWEEN 0 AND images", name="reservations_delivered_within_hold"
    ),
    sa.Index("reservations_open", "created", sqlite_where=_OPEN, postgresql_where=_OPEN),
    sa.Index("reservations_open_owner", "owner", sqlite_where=_OPEN, postgresql_where=_OPEN),
    sa.Index("reservations_key_model", "key_id", "model"),
    sqlite_autoincrement=True,
)

ledger = sa.Table(
    "ledger",
    metadata,
    sa.Column("id", ID, primary_key=True),
    sa.Column("ts", sa.Float, nullable=False),
    sa.Column("request_id", sa.Text),
    sa.Column("key_id", ID, sa.ForeignKey("keys.id"), nullable=False),
    sa.Column("model", sa.Text),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("images", sa.Integer, nullable=False, server_default="0"),
    sa.Column("amount_units", sa.BigInteger, nullable=False),  # the signed change to the balance
    sa.Column("reservation_id", ID, sa.ForeignKey("reservations.id")),
    sa.CheckConstraint("kind IN ('reserve', 'charge', 'refund', 'credit')", name="ledger_kind_known"),
    sa.CheckConstraint("images >= 0", name="ledger_images_not_negative"),
    sa.Index("ledger_key", "key_id"),
    sa.Index("ledger_request", "request_id"),
    # at most one reserve, one charge and one refund row per reservation
    sa.Index("ledger_once", "reservation_id", "kind", unique=True, sqlite_where=_BOOKED, postgresql_where=_BOOKED),
    sqlite_autoincrement=True,
)

idempotency = sa.Table(
    "idempotency",
    metadata,
    sa.Column("key_id", ID, sa.ForeignKey("keys.id"), primary_key=True),
    sa.Column("idem_key", sa.Text, primary_key=True),
    sa.Column("fingerprint", sa.Text, nullable=False),  # what the request asked (a digest)
    sa.Column("owner", sa.Text),  # the ingress replica running the first attempt
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("outcome", sa.LargeBinary),  # NULL while the first attempt runs
    # The reservation of the attempt that holds the claim: its settlement stores the outcome
    # (a charge) or deletes the claim (a refund), in the same transaction.
    sa.Column("reservation_id", ID),
    sa.Index("idempotency_created", "created"),
    sa.Index("idempotency_reservation", "reservation_id"),
)

# -- the Batch API (serve_app/batches) ------------------------------------------------------
# A file's bytes live in the storage backend (``stored``); its row is what the API lists.
files = sa.Table(
    "files",
    metadata,
    sa.Column("seq", ID, primary_key=True),  # list order and the `after` cursor
    sa.Column("id", sa.Text, nullable=False, unique=True),  # file-<hex>
    sa.Column("key_id", ID, sa.ForeignKey("keys.id"), nullable=False),
    sa.Column("filename", sa.Text, nullable=False),
    sa.Column("purpose", sa.Text, nullable=False),
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.Column("lines", sa.Integer),  # requests of a batch input file
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float),
    sa.Column("stored", sa.Text, nullable=False),  # the object's name in the file store
    sa.Index("files_key", "key_id", "seq"),
    sa.Index("files_expires", "expires_at"),
    sqlite_autoincrement=True,
)

# A batch, and the one row per input line that owns its state: the runner claims a line
# with a conditional UPDATE (owner + lease), so the database, not a process, holds the work.
batches = sa.Table(
    "batches",
    metadata,
    sa.Column("seq", ID, primary_key=True),
    sa.Column("id", sa.Text, nullable=False, unique=True),  # batch_<hex>
    sa.Column("key_id", ID, sa.ForeignKey("keys.id"), nullable=False),
    sa.Column("endpoint", sa.Text, nullable=False),
    sa.Column("input_file_id", sa.Text, nullable=False),
    sa.Column("completion_window", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("model", sa.Text),
    sa.Column("metadata", sa.Text),  # JSON object
    sa.Column("errors", sa.Text),  # JSON list of {code, message, param, line}
    sa.Column("output_file_id", sa.Text),
    sa.Column("error_file_id", sa.Text),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("in_progress_at", sa.Float),
    sa.Column("finalizing_at", sa.Float),
    sa.Column("completed_at", sa.Float),
    sa.Column("failed_at", sa.Float),
    sa.Column("expired_at", sa.Float),
    sa.Column("cancelling_at", sa.Float),
    sa.Column("cancelled_at", sa.Float),
    sa.Column("owner", sa.Text),  # the runner assembling its output files, until lease_until
    sa.Column("lease_until", sa.Float),
    sa.CheckConstraint(
        "status IN ('validating', 'failed', 'in_progress', 'finalizing', 'completed', 'expired', 'cancelling', "
        "'cancelled')",
        name="batches_status_known",
    ),
    sa.Index("batches_key", "key_id", "seq"),
    sa.Index("batches_status", "status"),
    sqlite_autoincrement=True,
)

batch_lines = sa.Table(
    "batch_lines",
    metadata,
    sa.Column("id", ID, primary_key=True),
    sa.Column("batch_seq", ID, sa.ForeignKey("batches.seq"), nullable=False),
    sa.Column("line_no", sa.Integer, nullable=False),  # 1-based, as in the input file
    sa.Column("custom_id", sa.Text, nullable=False),
    sa.Column("body", sa.Text, nullable=False),  # the request's JSON body
    sa.Column("request_id", sa.Text, nullable=False),  # every attempt of the line uses it
    # queued -> running -> succeeded | failed; queued -> cancelled | expired
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("owner", sa.Text),  # the runner that claimed it, until lease_until
    sa.Column("lease_until", sa.Float),
    sa.Column("not_before", sa.Float, nullable=False, server_default="0"),  # a retry's wait
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("status_code", sa.Integer),
    sa.Column("images", sa.Integer, nullable=False, server_default="0"),  # delivered (and charged)
    sa.Column("result", sa.Text),  # the output line's object name in the file store
    sa.Column("finished_at", sa.Float),
    sa.CheckConstraint(
        "state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled', 'expired')", name="batch_lines_state_known"
    ),
    sa.UniqueConstraint("batch_seq", "line_no", name="batch_lines_batch_line"),
    sa.Index("batch_lines_state", "state", "batch_seq"),
    sqlite_autoincrement=True,
)

__all__ = ["ID", "batch_lines", "batches", "files", "idempotency", "keys", "ledger", "metadata", "reservations"]
