"""The service's tables: what the store keeps, column by column (SQLAlchemy Core).

The schema's one definition: :mod:`tether.service.store` queries these tables, the blob index
(:mod:`tether.service.blobs.index`) owns the two blob tables, and the migrations in
``service/migrations/`` must arrive at exactly this (``tests/test_migrations.py`` compares them).
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Column, Float, Index, LargeBinary, MetaData, String, Table, Text

metadata = MetaData()

users = Table(
    "users",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(255), nullable=False, unique=True),
    Column("token_hash", String(64), nullable=False, index=True),
    Column("created_at", Float, nullable=False),
)

endpoints = Table(
    "endpoints",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("owner_id", String(64), nullable=False, index=True),
    Column("name", String(255), nullable=False),
    Column("secret_hash", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("last_seen", Float),
    Column("status", Text),  # JSON of the last heartbeat
    # a deleted endpoint stays as a tombstone: its id is never issued again, to anyone
    Column("deleted_at", Float),
    # multi-user endpoints: who may send tasks ({"public": bool, "users": [names or ids]})
    Column("multi_user", Boolean),
    Column("policy", Text),
    # a user endpoint: its multi-user parent, the user's config, the local account it runs as
    Column("parent_id", String(64), index=True),
    Column("user_config", Text),
    Column("local_user", String(255)),
)

functions = Table(
    "functions",
    metadata,
    Column("owner_id", String(64), primary_key=True),
    Column("id", String(64), primary_key=True),
    Column("body", LargeBinary, nullable=False),
    Column("created_at", Float, nullable=False),
)

tasks = Table(
    "tasks",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("owner_id", String(64), nullable=False),
    Column("endpoint_id", String(64), nullable=False),
    Column("function_id", String(64), nullable=False),
    Column("group_id", String(64)),
    Column("state", String(32), nullable=False),
    Column("payload", LargeBinary),
    Column("spec", Text),
    Column("uec", Text),
    Column("result", LargeBinary),
    Column("error", Text),
    Column("t_received", Float),
    Column("t_waiting", Float),
    Column("t_dispatched", Float),
    Column("t_running", Float),
    Column("t_done", Float),
    Column("collected_at", Float),
    Column("retried", Boolean, default=False),
    Column("inputs", Text),  # JSON list of the task ids whose results it takes as arguments
    Column("keep_over", BigInteger),  # results larger than this stay on the endpoint (Task.keep)
    # A user's task group in submission order, for Executor.reload (Store.group_task_ids):
    # with t_received in the key SQLite reads the group's rows only (on (owner_id, group_id) it
    # preferred ix_tasks_owner_recent for the order and read every task of the owner). An index
    # on (endpoint_id, state) stood here until 0006: no query needs what ix_tasks_endpoint_open
    # does not give, and it cost every task an entry at submission and a move per state change.
    Index("ix_tasks_owner_group", "owner_id", "group_id", "t_received"),
)
# Which tasks take which results as inputs (Task.inputs): an endpoint asking for an input is
# answered by an index lookup, at the cost of a row per input of the tasks that have any.
task_inputs = Table(
    "task_inputs",
    metadata,
    Column("task_id", String(64), primary_key=True),
    Column("input_id", String(64), primary_key=True),
    Index("ix_task_inputs_input", "input_id"),
)
# An endpoint's open tasks in submission order, for paging through a backlog: partial, so a
# task leaves it when it ends and a page costs what it returns, not what the endpoint ever ran.
Index("ix_tasks_endpoint_open", tasks.c.endpoint_id, tasks.c.t_received, tasks.c.id,
      sqlite_where=tasks.c.t_done.is_(None), postgresql_where=tasks.c.t_done.is_(None))
# A user's tasks newest first, for the dashboard's bounded window (see Store.recent_tasks).
Index("ix_tasks_owner_recent", tasks.c.owner_id, tasks.c.t_received)
# A user's open tasks, counted for the per-user quota (see Store.count_open).
Index("ix_tasks_owner_open", tasks.c.owner_id,
      sqlite_where=tasks.c.t_done.is_(None), postgresql_where=tasks.c.t_done.is_(None))

# --- blobs: large payloads on the service's disk (service/blobs/index.py owns these two) -------
#: One row per blob: who owns it (counted against their quota), what it must hash to, and where
#: its upload stands (reserved -> uploading -> complete). The bytes are a file named by the id.
blobs = Table(
    "blobs",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("owner_id", String(64), nullable=False, index=True),
    Column("uploader", String(80), nullable=False),  # "user:<id>" or "endpoint:<id>": who may send the bytes
    Column("size", BigInteger, nullable=False),
    Column("digest", String(64), nullable=False),
    Column("state", String(16), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("linked", Boolean, nullable=False),  # ever named by a task: deleted with its last task
)
#: Which tasks name which blobs (arguments and function bodies: "input"; a result: "result").
task_blobs = Table(
    "task_blobs",
    metadata,
    Column("task_id", String(64), primary_key=True),
    Column("blob_id", String(64), primary_key=True),
    Column("role", String(16), nullable=False),
    Index("ix_task_blobs_blob", "blob_id"),
)
