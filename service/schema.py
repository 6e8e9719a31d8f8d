"""The store's schema version: Alembic migrations, who runs them and when.

The tables live in :mod:`tether.service.tables`; how a database gets from one version of them to
the next lives in ``migrations/versions/`` (one Alembic revision per change). This module
decides what happens when a service or a ``tether service`` command opens a database:

* **current**: nothing to do;
* **empty** (a new database): the schema is created, on SQLite and PostgreSQL alike — nothing
  can be running against a database that has no tables;
* **outdated** (including a database made before migrations existed, which has the tables but
  no ``alembic_version``): SQLite, the embedded default, upgrades itself; PostgreSQL is shared by
  replicas that may still run the old code, so it is upgraded only by ``tether service db
  upgrade`` (or at start with ``auto_migrate: true``) and otherwise refused with that command;
* **newer** than this code (a newer tether upgraded it): refused, naming both revisions, since
  this code would misread tables it does not know.

Upgrades hold a lock for their whole run — PostgreSQL's transaction-level advisory lock, or an
``flock`` beside a SQLite file — so replicas that start together migrate once: the first
upgrades, the others wait, then find the schema current.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, inspect, select
from sqlalchemy.engine import Connection, Engine, make_url

from tether.errors import ConfigError

log = logging.getLogger("tether.service.schema")

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
#: the key of the PostgreSQL advisory lock held while migrating ("tether" + 1, as a bigint)
MIGRATION_LOCK_KEY = 0x746574686572_0001
#: a table every version of the schema has: present without ``alembic_version``, the database
#: was made before migrations existed
_SENTINEL_TABLE = "tasks"


class SchemaError(ConfigError):
    """The database's schema does not fit this code; the message says what to run."""


@dataclass(frozen=True)
class SchemaStatus:
    """Where a database stands against this code's migrations."""

    #: the database's revision; None for an empty database or one made before migrations
    current: str | None
    #: the newest revision this code knows
    head: str
    #: "current", "empty", "unversioned" (made before migrations), "outdated" or "newer"
    state: str

    def describe(self) -> str:
        """One line for ``tether service db current``."""
        what = {
            "current": "up to date",
            "empty": "no tables yet (a new database)",
            "unversioned": "made before migrations existed; 'db upgrade' adopts it",
            "outdated": "outdated: run 'tether service db upgrade'",
            "newer": "NEWER than this tether: run the newer tether that upgraded it",
        }[self.state]
        return f"revision {self.current or '(none)'}; this tether's newest is {self.head}: {what}"


def _alembic_config(connection: Connection | None = None) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def _script() -> Any:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config())


def head_revision() -> str:
    """The newest revision this code knows (the migrations form one line: a single head)."""
    return _script().get_current_head()


def _known_revisions() -> set[str]:
    return {rev.revision for rev in _script().walk_revisions()}


def _status(conn: Connection) -> SchemaStatus:
    from alembic.runtime.migration import MigrationContext

    head = head_revision()
    current = MigrationContext.configure(conn).get_current_revision()
    if current is None:
        unversioned = inspect(conn).has_table(_SENTINEL_TABLE)
        return SchemaStatus(None, head, "unversioned" if unversioned else "empty")
    if current == head:
        return SchemaStatus(current, head, "current")
    return SchemaStatus(current, head, "outdated" if current in _known_revisions() else "newer")


def schema_status(engine: Engine) -> SchemaStatus:
    """Where ``engine``'s database stands; reads only."""
    with engine.connect() as conn:
        return _status(conn)


def _where(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=True)


def _newer_error(engine: Engine, status: SchemaStatus) -> SchemaError:
    from tether import __version__

    return SchemaError(
        f"the database {_where(engine)} has schema revision {status.current}, which is newer than this tether "
        f"({__version__}) knows: its newest revision is {status.head}. A newer tether upgraded it; run that "
        f"version (or newer) here too, never an older one against it")


@contextlib.contextmanager
def _migration_lock(engine: Engine) -> Iterator[Connection]:
    """One transaction holding the migration lock: other processes migrating the same database
    wait here, then see what the first one did."""
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.execute(select(func.pg_advisory_xact_lock(MIGRATION_LOCK_KEY)))  # released at commit/rollback
            yield conn
        return
    database = make_url(str(engine.url)).database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        with engine.begin() as conn:
            yield conn
        return
    lock_path = Path(database).with_name(Path(database).name + ".migrate.lock")
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # released when the file closes
        with engine.begin() as conn:
            yield conn


def upgrade(engine: Engine, target: str = "head") -> tuple[SchemaStatus, SchemaStatus]:
    """Upgrade the database to ``target`` under the migration lock; (before, after).

    A database made before migrations is adopted by the baseline revision, which creates what
    is missing and keeps every row. A database newer than this code is refused.
    """
    from alembic import command

    with _migration_lock(engine) as conn:
        before = _status(conn)
        if before.state == "newer":
            raise _newer_error(engine, before)
        if before.state != "current":
            if before.state == "unversioned":
                log.warning("adopting %s, made before schema migrations existed", _where(engine))
            command.upgrade(_alembic_config(conn), target)
        after = _status(conn)
    if before.state == "empty":
        log.info("created the schema of %s at revision %s", _where(engine), after.current)
    elif before.current != after.current:
        log.warning("upgraded the schema of %s from %s to %s", _where(engine), before.current or "(none)",
                    after.current)
    return before, after


def ensure_schema(engine: Engine, auto_migrate: bool = False, upgrade_hint: str | None = None) -> SchemaStatus:
    """Make sure the store's tables fit this code before anything uses them (see the module doc).

    ``upgrade_hint`` is the command the operator should run, named in the refusal.
    """
    status = schema_status(engine)
    if status.state == "current":
        return status
    if status.state == "newer":
        raise _newer_error(engine, status)
    if status.state == "empty" or auto_migrate or engine.dialect.name == "sqlite":
        return upgrade(engine)[1]
    hint = upgrade_hint or f"tether service db upgrade --db-url {_where(engine)}"
    have = status.current or "none (its tables were made before migrations existed)"
    raise SchemaError(
        f"the database {_where(engine)} has schema revision {have}; this tether needs {status.head}. Run "
        f"'{hint}' first (see 'Upgrades' in docs/deploy.md), or set 'auto_migrate: true' in the service config "
        f"to let a starting service upgrade it")
