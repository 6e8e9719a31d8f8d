"""The service on PostgreSQL instead of SQLite: the same code path, a different URL. Tasks run,
nothing is lost when the service is killed, and the service recovers when PostgreSQL restarts.

Needs PostgreSQL on 127.0.0.1:5432 with trust auth (as on these machines and in CI); without
it these tests skip with a message, unless CI is set.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tether import Executor
from tether.local import local_stack

import helpers
from conftest import needs_pg, pg_database, wait_for

PG = "postgresql+psycopg://postgres@127.0.0.1:5432"


pytestmark = needs_pg


@pytest.fixture
def pg_stack(tmp_path: Path) -> Iterator:
    with pg_database("tether_test") as name, local_stack(tmp_path / "home", engine="process", workers=2,
                                                         service_args=("--db-url", f"{PG}/{name}")) as stack:
        yield stack, name


def _stored(dbname: str, state: str) -> int:
    import psycopg

    with psycopg.connect(f"host=127.0.0.1 user=postgres dbname={dbname}") as conn:
        return conn.execute("SELECT count(*) FROM tasks WHERE state = %s", (state,)).fetchone()[0]


def test_tasks_run_and_survive_a_killed_service_on_postgres(pg_stack) -> None:
    stack, dbname = pg_stack
    ex = Executor(endpoint_id=stack.endpoint_id, service=stack.service_url, token=stack.token)
    assert ex.submit(helpers.square, 5).result(timeout=60) == 25
    futures = [ex.submit(helpers.sleep_then, 0.05, i) for i in range(40)]
    stack.kill_service()  # SIGKILL mid-batch
    stack.start_service("--db-url", f"{PG}/{dbname}")
    assert [f.result(timeout=120) for f in futures] == list(range(40))
    # a result reaches its client a commit before it is stored (the endpoint keeps it spooled
    # until then): the last one may still be on its way into the table
    wait_for(lambda: _stored(dbname, "success") >= 41, timeout=30, what="every result to be stored")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("pg_ctlcluster") is None,
                    reason="restarting PostgreSQL needs root and pg_ctlcluster")
def test_the_service_recovers_when_postgres_restarts(pg_stack) -> None:
    stack, _ = pg_stack
    ex = Executor(endpoint_id=stack.endpoint_id, service=stack.service_url, token=stack.token)
    assert ex.submit(helpers.square, 2).result(timeout=60) == 4
    version = subprocess.run(["pg_lsclusters", "-h"], capture_output=True, text=True, check=True).stdout.split()[0]
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"], check=True,
                   capture_output=True, timeout=120)
    assert [ex.submit(helpers.square, i).result(timeout=120) for i in range(5)] == [0, 1, 4, 9, 16]
