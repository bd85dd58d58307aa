"""Keys, reservations and the ledger.

The first migration of the hand-written SQLite schema (``PRAGMA user_version`` 1):
a database made by that code is stamped here, not rebuilt.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "keys",
        sa.Column("id", ID, primary_key=True),
        sa.Column("name", sa.Text, nullable=False, unique=True),
        sa.Column("key_hash", sa.Text, nullable=False, unique=True),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("revoked_at", sa.Float),
        sa.Column("balance_units", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("allowed_models", sa.Text),
        sa.Column("rpm", sa.Integer),
        sa.Column("ipm", sa.Integer),
        sa.CheckConstraint("balance_units >= 0", name="keys_balance_not_negative"),
        sa.CheckConstraint("rpm IS NULL OR rpm > 0", name="keys_rpm_positive"),
        sa.CheckConstraint("ipm IS NULL OR ipm > 0", name="keys_ipm_positive"),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "reservations",
        sa.Column("id", ID, primary_key=True),
        sa.Column("key_id", ID, sa.ForeignKey("keys.id"), nullable=False),
        sa.Column("request_id", sa.Text, nullable=False),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("images", sa.Integer, nullable=False),
        sa.Column("price_units", sa.BigInteger, nullable=False),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("settled_at", sa.Float),
        sa.Column("delivered", sa.Integer),
        sa.CheckConstraint("images > 0", name="reservations_images_positive"),
        sa.CheckConstraint("price_units >= 0", name="reservations_price_not_negative"),
        sa.CheckConstraint(
            "delivered IS NULL OR delivered BETWEEN 0 AND images", name="reservations_delivered_within_hold"
        ),
        sqlite_autoincrement=True,
    )
    open_only = sa.text("settled_at IS NULL")
    op.create_index(
        "reservations_open", "reservations", ["created"], sqlite_where=open_only, postgresql_where=open_only
    )
    op.create_index("reservations_key_model", "reservations", ["key_id", "model"])
    op.create_table(
        "ledger",
        sa.Column("id", ID, primary_key=True),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("request_id", sa.Text),
        sa.Column("key_id", ID, sa.ForeignKey("keys.id"), nullable=False),
        sa.Column("model", sa.Text),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("images", sa.Integer, nullable=False, server_default="0"),
        sa.Column("amount_units", sa.BigInteger, nullable=False),
        sa.Column("reservation_id", ID, sa.ForeignKey("reservations.id")),
        sa.CheckConstraint("kind IN ('reserve', 'charge', 'refund', 'credit')", name="ledger_kind_known"),
        sa.CheckConstraint("images >= 0", name="ledger_images_not_negative"),
        sqlite_autoincrement=True,
    )
    op.create_index("ledger_key", "ledger", ["key_id"])
    op.create_index("ledger_request", "ledger", ["request_id"])
    # at most one reserve, one charge and one refund row per reservation
    with_reservation = sa.text("reservation_id IS NOT NULL")
    op.create_index(
        "ledger_once",
        "ledger",
        ["reservation_id", "kind"],
        unique=True,
        sqlite_where=with_reservation,
        postgresql_where=with_reservation,
    )
