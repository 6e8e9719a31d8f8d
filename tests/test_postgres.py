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


@pytest.mark.timeout(60)
def test_tasks_are_not_stored_for_an_endpoint_whose_delete_commits_first() -> None:
    """Another replica deletes the endpoint while this one stores tasks for it (checked against
    a copy of its row up to a second old, service/endpoint_rows.py): the insert waits for the
    delete's row lock, then refuses them; nothing is stored that no one would ever end. The
    tasks of an endpoint still there go in, in the same batch."""
    import threading

    import psycopg

    from tether.protocol import Task
    from tether.service.store import Store

    with pg_database("tether_rows") as name:
        store = Store(f"{PG}/{name}")
        try:
            owner, _ = store.create_user("someone")
            doomed, _ = store.register_endpoint(owner, "doomed")
            kept, _ = store.register_endpoint(owner, "kept")
            batch = [Task(id=f"t{i}", function="0" * 32, endpoint=doomed if i % 2 else kept, payload=b"")
                     for i in range(4)]
            earlier = Task(id="t9", function="0" * 32, endpoint=doomed, payload=b"")
            store.insert_tasks(owner, [earlier])  # stored before the delete: resubmitted, it is answered as such
            with psycopg.connect(f"host=127.0.0.1 user=postgres dbname={name}") as deleting:
                # the delete's first statement, not committed yet: it holds the endpoint's row
                deleting.execute("UPDATE endpoints SET deleted_at = 1 WHERE id = %s", (doomed,))
                answer: list = []
                inserting = threading.Thread(target=lambda: answer.append(store.insert_tasks(owner, [*batch, earlier])))
                inserting.start()
                inserting.join(timeout=1.0)
                assert inserting.is_alive(), "the insert did not wait for the endpoint's row"
                deleting.commit()
                inserting.join(timeout=30)
            inserted, resubmitted, _, gone = answer[0]
            assert resubmitted == ["t9"]
            assert [t.id for t in inserted] == ["t0", "t2"] and gone == ["t1", "t3"]
            assert {r.id for r in store.get_tasks(owner, [t.id for t in batch])} == {"t0", "t2"}
            assert store.insert_tasks(owner, batch[:1]) == ([], ["t0"], [], [])  # an endpoint still there: as before
        finally:
            store.close()
