"""An index of each user's open tasks, for the per-user quota on queued tasks.

Revision ID: 0002_owner_open_index
Revises: 0001_baseline

Partial (``t_done IS NULL``), like ``ix_tasks_endpoint_open``: counting a user's open tasks
reads only those, not every task the user ever ran. Adding an index is safe for a rolling
upgrade (the previous release simply does not use it).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_owner_open_index"
down_revision = "0001_baseline"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_tasks_owner_open", "tasks", ["owner_id"],
                    sqlite_where=sa.text("t_done IS NULL"), postgresql_where=sa.text("t_done IS NULL"))


def downgrade() -> None:
    op.drop_index("ix_tasks_owner_open", table_name="tasks")
