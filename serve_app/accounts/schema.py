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

__all__ = ["ID", "idempotency", "keys", "ledger", "metadata", "reservations"]
