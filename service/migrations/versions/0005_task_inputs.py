"""Tasks remember which other tasks' results they take as arguments, and above what size their
own result stays on the endpoint.

Revision ID: 0005_task_inputs
Revises: 0004_owner_recent_index

A task submitted with futures among its arguments names them (``Task.inputs``); the endpoint
gathers those results where they are. The column is read when a stored task is sent to its
endpoint, and when an endpoint asks for an input (it may read only the inputs of its own open
tasks). A nullable column: the previous release neither writes nor reads it.
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


def downgrade() -> None:
    op.drop_column("tasks", "keep_over")
    op.drop_column("tasks", "inputs")
