"""Per-user quota on open tasks: one user cannot fill the service with queued work. What goes
over the limit is refused in words (QuotaExceeded on the WebSocket, HTTP 429 over REST), what
fits is kept and runs."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cloudpickle
import httpx
import pytest

from tether import Executor, QuotaExceeded
from tether.local import local_stack
from tether.serialize import function_id, serialize

import helpers
from conftest import database_env, needs_pg, pg_database, wait_for

LIMIT = 5


def test_tasks_over_a_users_quota_are_refused_in_words_and_the_rest_run(tmp_path: Path) -> None:
    with database_env() as db, local_stack(tmp_path / "home", workers=2, env=db,
                                           service_args=("--max-open-tasks-per-user", str(LIMIT))) as stack:
        stack.stop_endpoint()  # tasks stay open (waiting for the endpoint) and count against the quota
        with Executor(endpoint_id=stack.endpoint_id, service=stack.service_url, token=stack.token) as ex:
            futures = [ex.submit(helpers.square, i) for i in range(LIMIT + 3)]
            for f in futures[LIMIT:]:
                with pytest.raises(QuotaExceeded, match=f"allows {LIMIT} per user: wait for some to finish"):
                    f.result(timeout=30)

            # over REST the same limit is an HTTP 429 the caller can back off on
            body = cloudpickle.dumps(helpers.square)
            http = httpx.Client(base_url=stack.service_url, headers={"Authorization": f"Bearer {stack.token}"})
            http.post("/v1/functions", json={"function": base64.b64encode(body).decode()}).raise_for_status()
            task = {"task_id": str(uuid.uuid4()), "endpoint_id": stack.endpoint_id, "function_id": function_id(body),
                    "payload": base64.b64encode(b"x").decode()}
            r = http.post("/v1/tasks", json={"tasks": [task]})
            assert r.status_code == 429 and "per user" in r.json()["detail"], r.text

            stack.start_endpoint()  # what was accepted runs; once done, there is room again
            assert [f.result(timeout=60) for f in futures[:LIMIT]] == [i * i for i in range(LIMIT)]
            assert ex.submit(helpers.square, 12).result(timeout=60) == 144


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=needs_pg)])
@pytest.mark.timeout(180)
def test_concurrent_submissions_and_uploads_never_overshoot_a_quota(tmp_path: Path, backend: str) -> None:
    """30 one-task submissions at once against a quota of 5 open tasks: exactly 5 are taken.
    10 blob declarations of 300 kB at once against a quota of 1 MB: exactly 3; the same for
    function bodies. (The check and the
    insert were separate steps, and on PostgreSQL 6 to 29 of the 30 got in.)"""
    with contextlib.ExitStack() as cleanup:
        env = {}
        if backend == "postgres":
            name = cleanup.enter_context(pg_database("tether_quota"))
            env = {"TETHER_DB_URL": f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"}
        stack = cleanup.enter_context(local_stack(
            tmp_path / "home", workers=1, env=env,
            service_args=("--max-open-tasks-per-user", str(LIMIT), "--blob-quota-bytes", "1000000",
                          "--function-quota-bytes", "1000000")))
        stack.stop_endpoint()  # what is accepted stays open
        body = cloudpickle.dumps(helpers.square)
        headers = {"Authorization": f"Bearer {stack.token}"}
        with httpx.Client(base_url=stack.service_url, headers=headers, trust_env=False, timeout=60) as http:
            http.post("/v1/functions", json={"function": base64.b64encode(body).decode()}).raise_for_status()

        clients = [cleanup.enter_context(httpx.Client(base_url=stack.service_url, headers=headers, trust_env=False,
                                                      timeout=60)) for _ in range(30)]
        for c in clients:  # connected before the race starts, so the requests arrive together
            c.get("/healthz").raise_for_status()

        def at_once(request: Callable[[int], httpx.Response], n: int) -> list[int]:
            start = threading.Barrier(n)

            def one(i: int) -> int:
                start.wait()
                return request(i).status_code

            with ThreadPoolExecutor(n) as pool:
                return list(pool.map(one, range(n)))

        def submit(i: int) -> httpx.Response:
            task = {"task_id": str(uuid.uuid4()), "endpoint_id": stack.endpoint_id,
                    "function_id": function_id(body), "payload": base64.b64encode(b"x").decode()}
            return clients[i].post("/v1/tasks", json={"tasks": [task]})

        def declare(i: int) -> httpx.Response:
            blob = {"size": 300_000, "digest": hashlib.sha256(str(i).encode()).hexdigest()}
            return clients[i].post("/v1/blobs", json=blob)

        codes = at_once(submit, 30)
        assert sorted(set(codes)) == [200, 429] and codes.count(200) == LIMIT, codes
        def register(i: int) -> httpx.Response:
            return clients[i].post("/v1/functions", json={"function": base64.b64encode(os.urandom(300_000)).decode()})

        codes = at_once(declare, 10)
        assert codes.count(429) == 7 and len([c for c in codes if c < 300]) == 3, codes
        codes = at_once(register, 10)
        assert codes.count(429) == 7 and codes.count(200) == 3, codes


@pytest.mark.timeout(120)
def test_function_bodies_count_against_a_quota_and_unused_ones_are_purged(tmp_path: Path) -> None:
    """Issue 17, item 9: 8 x 2 MiB of random bytes registered as "functions" were all kept under a
    1 MB quota, forever. Bodies now count against ``function_quota_bytes`` (HTTP 429 over REST,
    QuotaExceeded for a task), another user is unaffected, and a body no stored task names is
    deleted past ``function_retention_s``, which frees the room."""
    quota, body_size = 5 * 1024 * 1024, 2 * 1024 * 1024
    with local_stack(tmp_path / "home", workers=1,
                     service_args=("--function-quota-bytes", str(quota), "--function-retention", "3",
                                   "--purge-interval", "1")) as stack:
        http = httpx.Client(base_url=stack.service_url, headers={"Authorization": f"Bearer {stack.token}"},
                            trust_env=False, timeout=60)

        def register(body: bytes, client: httpx.Client = http) -> httpx.Response:
            return client.post("/v1/functions", json={"function": base64.b64encode(body).decode()})

        junk = [os.urandom(body_size) for _ in range(3)]
        assert [register(b).status_code for b in junk] == [200, 200, 429]
        refused = register(junk[2])
        assert "past its limit of 5242880 bytes per user" in refused.json()["detail"], refused.text
        assert register(junk[0]).status_code == 200  # a body kept already is never refused
        # a task whose function carries more than the room left: refused in words, nothing stored
        with Executor(endpoint_id=stack.endpoint_id, service=stack.service_url, token=stack.token) as ex:
            with pytest.raises(QuotaExceeded, match="function bodies you keep"):
                ex.submit(helpers.closure_over(os.urandom(body_size)), 0).result(timeout=60)
            assert ex.submit(helpers.square, 7).result(timeout=60) == 49  # a small function fits
        # a body a stored task names is kept past the retention
        named = cloudpickle.dumps(helpers.square)
        assert register(named).status_code == 200
        task = {"task_id": str(uuid.uuid4()), "endpoint_id": stack.endpoint_id, "function_id": function_id(named),
                "payload": base64.b64encode(serialize(3)).decode()}
        assert http.post("/v1/tasks", json={"tasks": [task]}).json()["accepted"] == [task["task_id"]]
        # another user has a quota of their own
        bob = json.loads(subprocess.run([sys.executable, "-m", "tether.cli", "service", "user-add", "bob", "--json"],
                                        env=stack.env, capture_output=True, text=True, check=True).stdout)["token"]
        with httpx.Client(base_url=stack.service_url, headers={"Authorization": f"Bearer {bob}"},
                          trust_env=False, timeout=60) as bobs:
            assert register(junk[2], bobs).status_code == 200
        # past the retention, bodies no task names go, and their room with them
        gone = [function_id(b) for b in junk[:2]]
        wait_for(lambda: all(http.get(f"/v1/functions/{fid}").status_code == 404 for fid in gone),
                 what="the unused function bodies to be purged")
        assert http.get(f"/v1/functions/{function_id(named)}").status_code == 200
        assert register(junk[2]).status_code == 200
        http.close()
