"""Per-user quota on open tasks: one user cannot fill the service with queued work. What goes
over the limit is refused in words (QuotaExceeded on the WebSocket, HTTP 429 over REST), what
fits is kept and runs."""

from __future__ import annotations

import base64
import uuid
from pathlib import Path

import cloudpickle
import httpx
import pytest

from tether import Executor, QuotaExceeded
from tether.local import local_stack
from tether.serialize import function_id

import helpers
from conftest import database_env

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
