"""The ingress replica that holds each reservation (its death refunds them), and the
outcomes of requests sent with an Idempotency-Key.

The second migration of the hand-written SQLite schema (``PRAGMA user_version`` 2).

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    # A plain ADD COLUMN (no batch copy of the table on SQLite).
    op.add_column("reservations", sa.Column("owner", sa.Text))
    open_only = sa.text("settled_at IS NULL")
    op.create_index(
        "reservations_open_owner", "reservations", ["owner"], sqlite_where=open_only, postgresql_where=open_only
    )
    op.create_table(
        "idempotency",
        sa.Column("key_id", ID, sa.ForeignKey("keys.id"), primary_key=True),
        sa.Column("idem_key", sa.Text, primary_key=True),
        sa.Column("fingerprint", sa.Text, nullable=False),
        sa.Column("owner", sa.Text),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("outcome", sa.LargeBinary),
    )
    op.create_index("idempotency_created", "idempotency", ["created"])
