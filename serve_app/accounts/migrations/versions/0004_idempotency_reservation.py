"""An Idempotency-Key claim belongs to the reservation of the attempt that holds it.

The claim is made in the reservation's transaction and ends in its settlement's: a charged
settlement stores the outcome, a refund deletes the claim. Claims of the old shape (an
attempt running across the upgrade) have no reservation and are dropped: their requests
will settle without an outcome, and a retry runs anew.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("DELETE FROM idempotency WHERE outcome IS NULL")
    # Nullable, no foreign key: a plain ADD COLUMN on SQLite too (no batch table copy).
    op.add_column("idempotency", sa.Column("reservation_id", sa.BigInteger().with_variant(sa.Integer, "sqlite")))
    op.create_index("idempotency_reservation", "idempotency", ["reservation_id"])
