"""An index of each user's tasks by submission time, for the dashboard.

Revision ID: 0004_owner_recent_index
Revises: 0003_blobs

The dashboard reads a user's most recent tasks (newest first, a bounded number): with this
index that costs what it returns, however many tasks the user ran before. Adding an index is
safe for a rolling upgrade (the previous release simply does not use it).
"""

from __future__ import annotations

from alembic import op

revision = "0004_owner_recent_index"
down_revision = "0003_blobs"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_tasks_owner_recent", "tasks", ["owner_id", "t_received"])


def downgrade() -> None:
    op.drop_index("ix_tasks_owner_recent", table_name="tasks")
