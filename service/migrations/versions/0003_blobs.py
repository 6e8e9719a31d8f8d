"""Blobs: large arguments, results and function bodies stored on the service's disk.

Revision ID: 0003_blobs
Revises: 0002_owner_open_index

Two new tables (``service/blobs/index.py`` owns them): ``blobs``, one row per blob (owner, who may
upload its bytes, declared size and sha256, upload state), and ``task_blobs``, which tasks name
which blobs (a blob is deleted once no remaining task names it). Adding tables is safe for a
rolling upgrade: replicas still on the previous release never read them.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_blobs"
down_revision = "0002_owner_open_index"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "blobs",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("owner_id", sa.String(64), nullable=False),
        sa.Column("uploader", sa.String(80), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("linked", sa.Boolean, nullable=False),
    )
    op.create_index("ix_blobs_owner_id", "blobs", ["owner_id"])
    op.create_table(
        "task_blobs",
        sa.Column("task_id", sa.String(64), primary_key=True),
        sa.Column("blob_id", sa.String(64), primary_key=True),
        sa.Column("role", sa.String(16), nullable=False),
    )
    op.create_index("ix_task_blobs_blob", "task_blobs", ["blob_id"])


def downgrade() -> None:
    op.drop_index("ix_task_blobs_blob", table_name="task_blobs")
    op.drop_table("task_blobs")
    op.drop_index("ix_blobs_owner_id", table_name="blobs")
    op.drop_table("blobs")
