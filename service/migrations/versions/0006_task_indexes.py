"""Task indexes: drop ``ix_tasks_endpoint_state`` (nothing needs it), and order a user's task
group by submission time in ``ix_tasks_owner_group``.

Revision ID: 0006_task_indexes
Revises: 0005_task_inputs

Every query of tasks by endpoint also asks for them open (``t_done IS NULL``: paging an
endpoint's backlog, failing a deleted endpoint's tasks, an input or a blob an endpoint may
read, which endpoints have work), and the partial ``ix_tasks_endpoint_open`` answers each with
the endpoint's open tasks only, where ``(endpoint_id, state)`` read every task it ever ran. No
query filters an endpoint's tasks by state. The dropped index cost every task an entry written
at submission and one moved per state change (SQLite, our schema: the insert and the update
transactions ~80 -> ~66 us).

``ix_tasks_owner_group`` gains ``t_received``: ``Store.group_task_ids`` orders by it, and on
``(owner_id, group_id)`` SQLite chose ``ix_tasks_owner_recent`` instead (for the order), reading
every task of the owner to list one group. Same entries per task as before.

Safe for a rolling upgrade: the previous release's queries are the same and name no index;
downgrade builds the old indexes again.
"""

from __future__ import annotations

from alembic import op

revision = "0006_task_indexes"
down_revision = "0005_task_inputs"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_tasks_endpoint_state", table_name="tasks")
    op.drop_index("ix_tasks_owner_group", table_name="tasks")
    op.create_index("ix_tasks_owner_group", "tasks", ["owner_id", "group_id", "t_received"])


def downgrade() -> None:
    op.drop_index("ix_tasks_owner_group", table_name="tasks")
    op.create_index("ix_tasks_owner_group", "tasks", ["owner_id", "group_id"])
    op.create_index("ix_tasks_endpoint_state", "tasks", ["endpoint_id", "state"])
