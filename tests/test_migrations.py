"""Schema migrations as an operator meets them: ``tether service db current`` / ``db upgrade``,
a service that starts on databases made by earlier versions, refuses newer ones, and (on
PostgreSQL) refuses an outdated schema with the command that fixes it.

SQLite tests always run; PostgreSQL tests need PostgreSQL on 127.0.0.1:5432 with trust auth
for user postgres (as on these machines and in CI) and skip with a message otherwise, unless CI
is set.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tether import Client

from conftest import home_env, needs_pg, pg_database, tether_cli

PG = "postgresql+psycopg://postgres@127.0.0.1:5432"
HEAD = "0007_blob_digest"


def legacy_schema(blob: str, older: bool = False) -> list[str]:
    """The DDL tether made before migrations existed (today's tables, no alembic_version);
    ``older``: as an earlier version made it, before multi-user endpoints and the open-task index."""
    multi_user = ("multi_user BOOLEAN, policy TEXT, parent_id VARCHAR(64), user_config TEXT, "
                  "local_user VARCHAR(255), ")
    ddl = [
        "CREATE TABLE users (id VARCHAR(64) NOT NULL, name VARCHAR(255) NOT NULL, token_hash VARCHAR(64) NOT NULL, "
        "created_at FLOAT NOT NULL, PRIMARY KEY (id), UNIQUE (name))",
        "CREATE INDEX ix_users_token_hash ON users (token_hash)",
        "CREATE TABLE endpoints (id VARCHAR(64) NOT NULL, owner_id VARCHAR(64) NOT NULL, name VARCHAR(255) NOT NULL, "
        "secret_hash VARCHAR(64) NOT NULL, created_at FLOAT NOT NULL, last_seen FLOAT, status TEXT, deleted_at FLOAT, "
        f"{'' if older else multi_user}PRIMARY KEY (id))",
        "CREATE INDEX ix_endpoints_owner_id ON endpoints (owner_id)",
        f"CREATE TABLE functions (owner_id VARCHAR(64) NOT NULL, id VARCHAR(64) NOT NULL, body {blob} NOT NULL, "
        "created_at FLOAT NOT NULL, PRIMARY KEY (owner_id, id))",
        "CREATE TABLE tasks (id VARCHAR(64) NOT NULL, owner_id VARCHAR(64) NOT NULL, endpoint_id VARCHAR(64) NOT NULL, "
        f"function_id VARCHAR(64) NOT NULL, group_id VARCHAR(64), state VARCHAR(32) NOT NULL, payload {blob}, "
        f"spec TEXT, uec TEXT, result {blob}, error TEXT, t_received FLOAT, t_waiting FLOAT, t_dispatched FLOAT, "
        "t_running FLOAT, t_done FLOAT, collected_at FLOAT, retried BOOLEAN, PRIMARY KEY (id))",
        "CREATE INDEX ix_tasks_endpoint_state ON tasks (endpoint_id, state)",
        "CREATE INDEX ix_tasks_owner_group ON tasks (owner_id, group_id)",
    ]
    if not older:
        ddl += ["CREATE INDEX ix_endpoints_parent_id ON endpoints (parent_id)",
                "CREATE INDEX ix_tasks_endpoint_open ON tasks (endpoint_id, t_received, id) WHERE t_done IS NULL"]
    return ddl


def _user_row(name: str, token: str) -> tuple[str, str, str, float]:
    return (str(uuid.uuid4()), name, hashlib.sha256(token.encode()).hexdigest(), time.time())


def _drift(url: str) -> list:
    """What differs between the migrated database and the tables the store's code uses."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from tether.service.database import make_engine
    from tether.service.tables import metadata

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return compare_metadata(MigrationContext.configure(conn), metadata)
    finally:
        engine.dispose()


# --- SQLite: the embedded default ----------------------------------------------------------
def test_db_current_and_upgrade_on_a_fresh_sqlite_database(tmp_path: Path) -> None:
    env = home_env(tmp_path / "home")
    status = json.loads(tether_cli(env, "service", "db", "current", "--json").stdout)
    assert status == {"current": None, "head": HEAD, "state": "empty"}
    out = tether_cli(env, "service", "db", "upgrade").stdout
    assert f"upgraded from revision (none) to {HEAD}" in out
    assert f"already at revision {HEAD}" in tether_cli(env, "service", "db", "upgrade").stdout
    line = tether_cli(env, "service", "db", "current").stdout
    assert f"revision {HEAD}; this tether's newest is {HEAD}: up to date" in line
    assert "tether.db" in line
    assert _drift(f"sqlite:///{tmp_path / 'home' / 'service' / 'tether.db'}") == []


def test_the_migrated_schema_is_the_schema_the_store_uses(tmp_path: Path) -> None:
    """A later change to store.py's tables without a migration fails here: add a revision."""
    from tether.service.store import Store

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    Store(url).close()
    assert _drift(url) == [], "store.py's tables differ from what the migrations make: add a revision"


def test_a_sqlite_database_made_before_migrations_is_adopted_with_its_rows(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "service").mkdir(parents=True)
    db = home / "service" / "tether.db"
    conn = sqlite3.connect(db)
    for statement in legacy_schema("BLOB", older=True):
        conn.execute(statement)
    conn.execute("INSERT INTO users VALUES (?, ?, ?, ?)", _user_row("carol", "carols-old-token"))
    conn.commit()
    conn.close()
    env = home_env(home)
    assert json.loads(tether_cli(env, "service", "db", "current", "--json").stdout)["state"] == "unversioned"
    assert "made before migrations existed" in tether_cli(env, "service", "db", "current").stdout

    # the embedded default upgrades itself as it starts; carol's token still works
    tether_cli(env, "service", "start", "--detach", "--port", "0")
    try:
        url = json.loads((home / "service.json").read_text())["url"]
        assert Client(url, "carols-old-token").whoami()["name"] == "carol"
    finally:
        tether_cli(env, "service", "stop")
    assert json.loads(tether_cli(env, "service", "db", "current", "--json").stdout)["state"] == "current"
    assert _drift(f"sqlite:///{db}") == []  # the columns and indexes older versions lacked were added
    columns = {row[1] for row in sqlite3.connect(db).execute("PRAGMA table_info(endpoints)")}
    assert {"multi_user", "policy", "parent_id", "user_config", "local_user"} <= columns


def test_a_database_newer_than_this_tether_is_refused_naming_both_revisions(tmp_path: Path) -> None:
    env = home_env(tmp_path / "home")
    tether_cli(env, "service", "db", "upgrade")
    conn = sqlite3.connect(tmp_path / "home" / "service" / "tether.db")
    conn.execute("UPDATE alembic_version SET version_num = '0099_from_the_future'")
    conn.commit()
    conn.close()
    status = json.loads(tether_cli(env, "service", "db", "current", "--json").stdout)
    assert status["state"] == "newer" and status["current"] == "0099_from_the_future"
    for args in (("service", "start", "--port", "0"), ("service", "user-add", "dave"), ("service", "db", "upgrade")):
        out = tether_cli(env, *args, check=False)
        text = " ".join((out.stdout + out.stderr).split())  # rich wraps long lines
        assert out.returncode != 0, args
        assert "0099_from_the_future" in text and HEAD in text and "newer than this tether" in text, text


# --- PostgreSQL ---------------------------------------------------------------------------


@pytest.fixture
def pg_db() -> Iterator[str]:
    """A new, empty PostgreSQL database (dropped afterwards); yields its name."""
    with pg_database("tether_ops") as name:
        yield name


def _make_legacy_pg(name: str, older: bool = False) -> None:
    import psycopg

    with psycopg.connect(f"host=127.0.0.1 user=postgres dbname={name}") as conn:
        for statement in legacy_schema("BYTEA", older):
            conn.execute(statement)
        conn.execute("INSERT INTO users VALUES (%s, %s, %s, %s)", _user_row("erin", "erins-token"))


@needs_pg
def test_a_fresh_postgres_database_is_upgraded_and_reports_its_revision(pg_db: str, tmp_path: Path) -> None:
    env = home_env(tmp_path / "home")
    url = f"{PG}/{pg_db}"
    assert json.loads(tether_cli(env, "service", "db", "current", "--db-url", url, "--json").stdout)["state"] == "empty"
    upgraded = tether_cli(env, "service", "db", "upgrade", "--db-url", url).stdout
    assert f"upgraded from revision (none) to {HEAD}" in upgraded
    out = tether_cli(env, "service", "db", "current", "--db-url", url).stdout
    assert out.startswith(f"{url}: revision {HEAD}") and "up to date" in out
    assert _drift(url) == []


@needs_pg
def test_an_outdated_postgres_schema_is_refused_until_db_upgrade(pg_db: str, tmp_path: Path) -> None:
    _make_legacy_pg(pg_db)
    config = tmp_path / "service.yaml"
    config.write_text(f"home: home\nport: 0\ndb_url: {PG}/{pg_db}\n")
    env = home_env(tmp_path / "elsewhere")
    out = tether_cli(env, "service", "start", "--config", str(config), "--detach", check=False)
    text = " ".join((out.stdout + out.stderr).split())
    assert out.returncode != 0
    assert f"this tether needs {HEAD}" in text and f"tether service db upgrade --config {config}" in text, text
    refused = tether_cli(env, "service", "user-add", "frank", "--config", str(config), check=False)
    assert refused.returncode != 0 and "tether service db upgrade --config" in refused.stderr

    assert f"to {HEAD}" in tether_cli(env, "service", "db", "upgrade", "--config", str(config)).stdout
    tether_cli(env, "service", "start", "--config", str(config), "--detach")
    try:
        url = json.loads((tmp_path / "home" / "service.json").read_text())["url"]
        assert Client(url, "erins-token").whoami()["name"] == "erin"  # rows made before migrations kept
        assert "up" in tether_cli(env, "service", "status", "--config", str(config)).stdout
    finally:
        tether_cli(env, "service", "stop", "--config", str(config))


@needs_pg
def test_auto_migrate_lets_a_starting_service_upgrade_postgres(pg_db: str, tmp_path: Path) -> None:
    _make_legacy_pg(pg_db)
    config = tmp_path / "service.yaml"
    config.write_text(f"home: home\nport: 0\ndb_url: {PG}/{pg_db}\nauto_migrate: true\n")
    env = home_env(tmp_path / "elsewhere")
    tether_cli(env, "service", "start", "--config", str(config), "--detach")
    tether_cli(env, "service", "stop", "--config", str(config))
    status = json.loads(tether_cli(env, "service", "db", "current", "--config", str(config), "--json").stdout)
    assert status["state"] == "current"


@needs_pg
def test_replicas_upgrading_at_once_migrate_once(pg_db: str, tmp_path: Path) -> None:
    """The advisory lock: without it both would ALTER the same tables and one would fail."""
    _make_legacy_pg(pg_db, older=True)
    env = home_env(tmp_path / "home")
    cmd = [sys.executable, "-m", "tether.cli", "service", "db", "upgrade", "--db-url", f"{PG}/{pg_db}"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    said = sorted("upgraded" if "upgraded from" in out else "already" for out, _ in outs)
    assert said == ["already", "already", "upgraded"], outs
    assert _drift(f"{PG}/{pg_db}") == []


def test_a_non_editable_install_ships_every_migration_file() -> None:
    """Alembic reads the migrations directory from the installed package: every folder of it must
    be a listed package and every other file package data, or a wheel install cannot migrate."""
    import tomllib

    root = Path(__file__).resolve().parent.parent
    tool = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    migrations = root / "service" / "migrations"
    for folder in [migrations, *[p for p in migrations.rglob("*") if p.is_dir() and p.name != "__pycache__"]]:
        package = "tether.service." + ".".join(folder.relative_to(root / "service").parts)
        assert package in tool["packages"], f"{package} is missing from [tool.setuptools] packages"
        data = tool.get("package-data", {}).get(package, [])
        for file in folder.iterdir():
            if file.is_file() and file.suffix not in (".py", ".pyc"):
                assert file.name in data, f"{file} is missing from [tool.setuptools.package-data] {package}"
