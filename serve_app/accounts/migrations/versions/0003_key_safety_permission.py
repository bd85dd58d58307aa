"""Whether a key may send ``disable_safety_checker: true`` (an operator's decision per key).

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A plain ADD COLUMN with a constant default: existing keys may not (no batch copy on SQLite).
    op.add_column(
        "keys",
        sa.Column("may_disable_safety_checker", sa.Boolean, nullable=False, server_default=sa.false()),
    )
