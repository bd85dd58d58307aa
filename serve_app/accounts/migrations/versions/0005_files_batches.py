"""The Batch API: uploaded and output files, batches, and one row per batch line.

A file's bytes live in the storage backend; its row here is what ``/v1/files`` lists. A
batch line's row owns its state (queued, running under a runner's lease, done): a killed
runner loses nothing, and the line's Idempotency-Key claim keeps it from being charged twice.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "files",
        sa.Column("seq", ID, primary_key=True),
        sa.Column("id", sa.Text, nullable=False, unique=True),
        sa.Column("key_id", ID, sa.ForeignKey("keys.id"), nullable=False),
        sa.Column("filename", sa.Text, nullable=False),
        sa.Column("purpose", sa.Text, nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("lines", sa.Integer),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float),
        sa.Column("stored", sa.Text, nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index("files_key", "files", ["key_id", "seq"])
    op.create_index("files_expires", "files", ["expires_at"])
    op.create_table(
        "batches",
        sa.Column("seq", ID, primary_key=True),
        sa.Column("id", sa.Text, nullable=False, unique=True),
        sa.Column("key_id", ID, sa.ForeignKey("keys.id"), nullable=False),
        sa.Column("endpoint", sa.Text, nullable=False),
        sa.Column("input_file_id", sa.Text, nullable=False),
        sa.Column("completion_window", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("model", sa.Text),
        sa.Column("metadata", sa.Text),
        sa.Column("errors", sa.Text),
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
        sa.Column("owner", sa.Text),
        sa.Column("lease_until", sa.Float),
        sa.CheckConstraint(
            "status IN ('validating', 'failed', 'in_progress', 'finalizing', 'completed', 'expired', 'cancelling', "
            "'cancelled')",
            name="batches_status_known",
        ),
        sqlite_autoincrement=True,
    )
    op.create_index("batches_key", "batches", ["key_id", "seq"])
    op.create_index("batches_status", "batches", ["status"])
    op.create_table(
        "batch_lines",
        sa.Column("id", ID, primary_key=True),
        sa.Column("batch_seq", ID, sa.ForeignKey("batches.seq"), nullable=False),
        sa.Column("line_no", sa.Integer, nullable=False),
        sa.Column("custom_id", sa.Text, nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("request_id", sa.Text, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("owner", sa.Text),
        sa.Column("lease_until", sa.Float),
        sa.Column("not_before", sa.Float, nullable=False, server_default="0"),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("status_code", sa.Integer),
        sa.Column("images", sa.Integer, nullable=False, server_default="0"),
        sa.Column("result", sa.Text),
        sa.Column("finished_at", sa.Float),
        sa.CheckConstraint(
            "state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled', 'expired')",
            name="batch_lines_state_known",
        ),
        sa.UniqueConstraint("batch_seq", "line_no", name="batch_lines_batch_line"),
        sqlite_autoincrement=True,
    )
    op.create_index("batch_lines_state", "batch_lines", ["state", "batch_seq"])
