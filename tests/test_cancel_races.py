"""Cancellation and the races around it, with real processes: a task cancelled while its
endpoint is away never runs; a mass cancel is a few frames; user callbacks cannot stall or
kill the client's connection thread; results racing cancels raise nothing anywhere."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pytest

from tether import Client, Executor
from tether.connection import Connection
from tether.errors import TaskCancelled
from tether.home import write_secret
from tether.protocol import MAX_IDS

import helpers
from conftest import wait_for


def _client(stack) -> Client:  # noqa: ANN001 - a LocalStack
    return Client(service=stack.service_url, token=stack.token)


def _wait_cancelled_at_service(client: Client, task_id: str) -> None:
    wait_for(lambda: client.get_task(task_id)["state"] == "cancelled", what="the service to record the cancel")


def test_a_task_cancelled_while_its_endpoint_is_stopped_never_runs(fresh_stack, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    fresh_stack.stop_endpoint()
    with Executor(endpoint_id=fresh_stack.endpoint_id, service=fresh_stack.service_url,
                  token=fresh_stack.token) as ex, _client(fresh_stack) as client:
        before = [ex.submit(helpers.square, i) for i in range(20)]
        doomed = ex.submit(helpers.touch, str(marker))
        after = [ex.submit(helpers.square, i) for i in range(20)]
        wait_for(lambda: doomed.state == "waiting-for-endpoint", what="the task to be stored")
        assert doomed.cancel()
        _wait_cancelled_at_service(client, doomed.task_id)
        fresh_stack.start_endpoint()
        assert [f.result(timeout=60) for f in before + after] == [i * i for i in range(20)] * 2
        with pytest.raises(TaskCancelled):
            doomed.result(timeout=0)
    assert not marker.exists()


def test_a_task_held_by_an_endpoint_cut_off_when_it_is_cancelled_never_runs(fresh_stack, tmp_path: Path) -> None:
    """The endpoint holds the task (queued behind busy workers) when its link drops; the task is
    cancelled while it is away; when it reconnects, the service withdraws it (reconciliation)."""
    marker = tmp_path / "ran"
    cred_path = fresh_stack.endpoint_dir() / "credential.json"
    cred = json.loads(cred_path.read_text())
    with Executor(endpoint_id=fresh_stack.endpoint_id, service=fresh_stack.service_url,
                  token=fresh_stack.token) as ex, _client(fresh_stack) as client:
        busy = [ex.submit(helpers.sleep_then, 8, "slept") for _ in range(2)]  # both workers
        wait_for(lambda: all(f.running() for f in busy), what="both workers to be busy")
        held = ex.submit(helpers.touch, str(marker))
        wait_for(lambda: held.state == "dispatched", what="the endpoint to hold the task")
        # cut the endpoint off: a new credential voids its connection; it waits for the file
        new_secret = client.register_endpoint(fresh_stack.endpoint_name, cred["endpoint_id"])["secret"]
        wait_for(lambda: not client.get_endpoint(cred["endpoint_id"]).get("online"), what="the endpoint to be cut off")
        assert held.cancel()
        _wait_cancelled_at_service(client, held.task_id)
        write_secret(cred_path, json.dumps({**cred, "secret": new_secret}))  # it reconnects
        assert [f.result(timeout=60) for f in busy] == ["slept", "slept"]
        assert ex.submit(helpers.square, 3).result(timeout=60) == 9  # a worker took work after the busy ones
    assert not marker.exists()


def test_a_callback_that_waits_on_another_future_does_not_stall_results(executor: Executor) -> None:
    first = executor.submit(helpers.sleep_then, 0.2, "first")
    second = executor.submit(helpers.sleep_then, 1.0, "second")
    seen: dict[str, object] = {}
    called = threading.Event()

    def waits_for_second(fut) -> None:  # noqa: ANN001
        seen["thread"] = threading.current_thread().name
        seen["second"] = second.result(timeout=30)  # on the connection thread this would deadlock
        called.set()

    first.add_done_callback(waits_for_second)
    assert first.result(timeout=30) == "first"
    assert called.wait(timeout=30)
    assert seen["second"] == "second"
    assert seen["thread"] != "tether-connection"
    # the connection kept working meanwhile, and still does
    assert executor.submit(helpers.square, 4).result(timeout=30) == 16


def test_a_failing_callback_does_not_hurt_the_connection(executor: Executor, caplog) -> None:
    fut = executor.submit(helpers.square, 2)
    fut.add_done_callback(lambda f: 1 / 0)
    assert fut.result(timeout=30) == 4
    assert executor.submit(helpers.square, 5).result(timeout=30) == 25


@pytest.mark.slow
def test_a_hundred_thousand_cancels_are_a_few_frames(fresh_stack) -> None:
    n = 100_000
    fresh_stack.stop_endpoint()
    ex = Executor(endpoint_id=fresh_stack.endpoint_id, service=fresh_stack.service_url, token=fresh_stack.token)
    futures = [ex.submit(helpers.square, i) for i in range(n)]
    wait_for(lambda: futures[-1].state == "waiting-for-endpoint", timeout=120, what="the tasks to be stored")
    conn = Connection.get(ex._info)
    before = conn.frames_sent["cancel"]
    t0 = time.monotonic()
    ex.shutdown(wait=True, cancel_futures=True)
    assert all(f.cancelled() for f in futures)
    with _client(fresh_stack) as client:
        def all_cancelled() -> bool:
            return {item["state"] for item in client.get_task_group(ex.task_group_id)} == {"cancelled"}

        wait_for(all_cancelled, timeout=60, what="the service to cancel every task")
    frames = conn.frames_sent["cancel"] - before
    print(f"{n:,} cancels in {time.monotonic() - t0:.1f}s as {frames} frame(s)")
    assert frames <= -(-n // MAX_IDS) + 1, frames

    # a user's own loop of fut.cancel() calls is gathered too (a few hundred per frame at least)
    ex = Executor(endpoint_id=fresh_stack.endpoint_id, service=fresh_stack.service_url, token=fresh_stack.token)
    futures = [ex.submit(helpers.square, i) for i in range(20_000)]
    wait_for(lambda: futures[-1].state == "waiting-for-endpoint", timeout=120, what="the tasks to be stored")
    before = conn.frames_sent["cancel"]
    for f in futures:
        f.cancel()
    wait_for(lambda: not conn._cancels, what="the cancels to be sent")
    frames = conn.frames_sent["cancel"] - before
    print(f"20,000 fut.cancel() calls as {frames} frame(s)")
    assert frames <= 20_000 // 200, frames
    ex.shutdown(wait=False)


def test_results_racing_cancels_raise_nothing_in_any_thread(executor: Executor, caplog) -> None:
    """Cancel tasks while their results arrive: each future ends cancelled or with its value;
    no thread dies, nothing is logged as an error, the connection goes on."""
    errors: list[threading.ExceptHookArgs] = []
    previous = threading.excepthook
    threading.excepthook = errors.append
    caplog.set_level(logging.ERROR)
    try:
        for round_ in range(20):
            futures = [executor.submit(helpers.square, i) for i in range(200)]
            futures[-1].add_done_callback(lambda f: None)
            time.sleep(0.002 * (round_ % 10))  # a different share of results is in by now each round
            for f in futures:
                f.cancel()
            for i, f in enumerate(futures):
                assert f.cancelled() or f.result(timeout=30) == i * i
        assert executor.submit(helpers.square, 6).result(timeout=30) == 36
    finally:
        threading.excepthook = previous
    assert not errors, [(e.exc_type, e.exc_value) for e in errors]
    assert not [r for r in caplog.records if r.name.startswith("tether")], caplog.text
    assert Connection.get(executor._info)._thread.is_alive()


def test_cancelling_tasks_no_worker_has_begun_replaces_no_worker(fresh_stack) -> None:
    """A cancel storm over a deep queue kills only the workers that run a cancelled task.

    The two running tasks are cancelled first: their workers are killed and replaced, and the
    fresh workers are handed the queued tasks while they still start up. Cancelling those must
    take them back, not kill the fresh workers in turn (it did: one worker started per cancel).
    """
    stack = fresh_stack
    with Executor(endpoint_id=stack.endpoint_id, service=stack.service_url, token=stack.token) as ex:
        running = [ex.submit(helpers.sleep_then, 60, "slept") for _ in range(2)]  # both workers
        wait_for(lambda: all(f.running() for f in running), what="both workers to be busy")
        queued = [ex.submit(helpers.sleep_then, 60, "slept") for _ in range(200)]
        wait_for(lambda: all(f.state == "dispatched" for f in queued[:16]), what="the workers to hold tasks")
        for f in running + queued:
            f.cancel()
        for f in running + queued:
            with pytest.raises(TaskCancelled):
                f.result(timeout=60)
        assert ex.submit(helpers.square, 4).result(timeout=60) == 16  # the pool still serves
    home_status = stack.endpoint_dir() / "status.json"
    stamp = time.time()
    wait_for(lambda: json.loads(home_status.read_text())["updated"] > stamp, timeout=30,
             what="the daemon's next heartbeat")
    replaced = json.loads(home_status.read_text())["capacity"]["workers_replaced"]
    assert replaced <= 4, f"{replaced} workers were started to cancel 2 running and 200 queued tasks"
