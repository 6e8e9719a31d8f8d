"""Baseline: the users, endpoints, functions and tasks tables as tether 0.1 made them.

Revision ID: 0001_baseline
Revises: (none)

The tables are written out here, not imported from ``store.py``: a migration is a fixed step
from one schema to the next, and must do the same thing after the store's tables change again.

The same step adopts a database made before migrations existed (tables, no
``alembic_version``): it creates only the tables that are missing and adds the nullable
columns and the indexes that older versions lacked (what ``_add_missing_columns`` used to do at
every start), keeping every row.
"""

from __future__ import annotations

import logging

import sqlalchemy as sa
from alembic import op

revision = "0001_baseline"
down_revision = None
branch_labels = None
depends_on = None

log = logging.getLogger("tether.service.schema")

meta = sa.MetaData()

sa.Table(
    "users",
    meta,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(255), nullable=False, unique=True),
    sa.Column("token_hash", sa.String(64), nullable=False, index=True),
    sa.Column("created_at", sa.Float, nullable=False),
)

sa.Table(
    "endpoints",
    meta,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("owner_id", sa.String(64), nullable=False, index=True),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("secret_hash", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("last_seen", sa.Float),
    sa.Column("status", sa.Text),
    sa.Column("deleted_at", sa.Float),
    sa.Column("multi_user", sa.Boolean),
    sa.Column("policy", sa.Text),
    sa.Column("parent_id", sa.String(64), index=True),
    sa.Column("user_config", sa.Text),
    sa.Column("local_user", sa.String(255)),
)

sa.Table(
    "functions",
    meta,
    sa.Column("owner_id", sa.String(64), primary_key=True),
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("body", sa.LargeBinary, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

_tasks = sa.Table(
    "tasks",
    meta,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("owner_id", sa.String(64), nullable=False),
    sa.Column("endpoint_id", sa.String(64), nullable=False),
    sa.Column("function_id", sa.String(64), nullable=False),
    sa.Column("group_id", sa.String(64)),
    sa.Column("state", sa.String(32), nullable=False),
    sa.Column("payload", sa.LargeBinary),
    sa.Column("spec", sa.Text),
    sa.Column("uec", sa.Text),
    sa.Column("result", sa.LargeBinary),
    sa.Column("error", sa.Text),
    sa.Column("t_received", sa.Float),
    sa.Column("t_waiting", sa.Float),
    sa.Column("t_dispatched", sa.Float),
    sa.Column("t_running", sa.Float),
    sa.Column("t_done", sa.Float),
    sa.Column("collected_at", sa.Float),
    sa.Column("retried", sa.Boolean),
    sa.Index("ix_tasks_endpoint_state", "endpoint_id", "state"),
    sa.Index("ix_tasks_owner_group", "owner_id", "group_id"),
)
sa.Index("ix_tasks_endpoint_open", _tasks.c.endpoint_id, _tasks.c.t_received, _tasks.c.id,
         sqlite_where=_tasks.c.t_done.is_(None), postgresql_where=_tasks.c.t_done.is_(None))


def upgrade() -> None:
    bind = op.get_bind()
    existing = set(sa.inspect(bind).get_table_names())
    meta.create_all(bind, checkfirst=True)
    inspector = sa.inspect(bind)
    for table in meta.sorted_tables:
        if table.name not in existing:
            continue
        present = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name not in present:  # only nullable columns were ever added after a table's creation
                log.warning("adding column %s.%s to a database made by an older tether", table.name, column.name)
                op.add_column(table.name, sa.Column(column.name, column.type, nullable=True))
        for index in table.indexes:
            index.create(bind, checkfirst=True)


def downgrade() -> None:
    meta.drop_all(op.get_bind())
