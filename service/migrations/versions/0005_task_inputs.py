"""Tasks remember which other tasks' results they take as arguments, and above what size their
own result stays on the endpoint.

Revision ID: 0005_task_inputs
Revises: 0004_owner_recent_index

A task submitted with futures among its arguments names them (``Task.inputs``); the endpoint
gathers those results where they are. The column is read when a stored task is sent to its
endpoint; the ``task_inputs`` table answers an endpoint asking for an input (it may read only
the inputs of its own open tasks) with an index lookup. Nullable columns and a new table: the
previous release neither writes nor reads them.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_task_inputs"
down_revision = "0004_owner_recent_index"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("tasks", sa.Column("inputs", sa.Text(), nullable=True))
    op.add_column("tasks", sa.Column("keep_over", sa.BigInteger(), nullable=True))
    op.create_table("task_inputs",
                    sa.Column("task_id", sa.String(64), primary_key=True),
                    sa.Column("input_id", sa.String(64), primary_key=True))
    op.create_index("ix_task_inputs_input", "task_inputs", ["input_id"])


def downgrade() -> None:
    op.drop_index("ix_task_inputs_input", table_name="task_inputs")
    op.drop_table("task_inputs")
    op.drop_column("tasks", "keep_over")
    op.drop_column("tasks", "inputs")
