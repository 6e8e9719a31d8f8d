"""Alembic's entry point for the service's store.

Migrations run only through :mod:`tether.service.schema`, which hands over a connection that
already holds the migration lock and its transaction: there is no ``alembic.ini`` and no URL
here, so the code that decides when to migrate is the only code that can.
"""

from __future__ import annotations

from alembic import context

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with 'tether service db upgrade' (tether.service.schema), not alembic's CLI")

context.configure(connection=connection, target_metadata=context.config.attributes.get("target_metadata"))
with context.begin_transaction():
    context.run_migrations()
