"""Nothing lost: SIGKILL the endpoint or the service in the middle of a batch, restart it, and
every future resolves exactly once with the right value."""

from __future__ import annotations

import json
import threading
from collections import Counter

from tether import Executor
from tether.local import LocalStack

import helpers
from conftest import run_sql, wait_for

N = 60


def _submit_batch(stack: LocalStack) -> tuple[Executor, list]:
    ex = Executor(endpoint_id=stack.endpoint_id, service=stack.service_url, token=stack.token)
    futures = [ex.submit(helpers.sleep_then, 0.05, i) for i in range(N)]
    return ex, futures


def _resolutions(futures: list) -> Counter:
    """Count how often each future's done-callback fires (exactly once each, or a bug)."""
    counts: Counter = Counter()
    lock = threading.Lock()

    def seen(f) -> None:
        with lock:
            counts[f.task_id] += 1

    for f in futures:
        f.add_done_callback(seen)
    return counts


def _each_resolved_once(counts: Counter, futures: list) -> None:
    """Done-callbacks run on the client's callback thread, a moment after result() returns:
    wait for every one to have fired, then check none fired twice."""
    wait_for(lambda: all(counts[f.task_id] for f in futures), timeout=10, what="every done-callback")
    assert all(counts[f.task_id] == 1 for f in futures), counts


def _stored_results(stack: LocalStack) -> Counter:
    return Counter(state for (state,) in run_sql(stack, "SELECT state FROM tasks"))


def test_endpoint_killed_mid_batch_loses_nothing(fresh_stack: LocalStack) -> None:
    ex, futures = _submit_batch(fresh_stack)
    counts = _resolutions(futures)
    wait_for(lambda: sum(f.done() for f in futures) >= 5, what="some results before the kill")
    fresh_stack.kill_endpoint()  # SIGKILL: no goodbye, results in flight, tasks half-run
    done_at_kill = sum(f.done() for f in futures)
    assert done_at_kill < N, "the batch finished before the kill; the test proves nothing"
    fresh_stack.start_endpoint()
    assert [f.result(timeout=90) for f in futures] == list(range(N))
    _each_resolved_once(counts, futures)
    # results reach clients before their commit (the endpoint keeps them until it): wait for it
    wait_for(lambda: _stored_results(fresh_stack)["success"] == N, what="every result to be stored once")
    ex.shutdown()


def test_service_killed_mid_batch_loses_nothing(fresh_stack: LocalStack) -> None:
    ex, futures = _submit_batch(fresh_stack)
    counts = _resolutions(futures)
    wait_for(lambda: sum(f.done() for f in futures) >= 5, what="some results before the kill")
    fresh_stack.kill_service()
    assert sum(f.done() for f in futures) < N, "the batch finished before the kill; the test proves nothing"
    fresh_stack.start_service()  # same port, same database: client and endpoint reconnect by themselves
    assert [f.result(timeout=90) for f in futures] == list(range(N))
    _each_resolved_once(counts, futures)
    # results reach clients before their commit (the endpoint keeps them until it): wait for it
    wait_for(lambda: _stored_results(fresh_stack)["success"] == N, what="every result to be stored once")
    ex.shutdown()


def test_results_spooled_while_service_is_down_are_delivered(fresh_stack: LocalStack) -> None:
    ex = Executor(endpoint_id=fresh_stack.endpoint_id, service=fresh_stack.service_url, token=fresh_stack.token)
    futures = [ex.submit(helpers.sleep_then, 1.5, i) for i in range(4)]
    wait_for(lambda: all(f.running() for f in futures[:2]), what="tasks to start")
    fresh_stack.kill_service()
    spool = fresh_stack.endpoint_dir() / "spool"
    wait_for(lambda: sum(p.stat().st_size for p in spool.glob("*.spool")) > 0,
             what="results to land in the endpoint's spool")
    fresh_stack.start_service()
    assert [f.result(timeout=90) for f in futures] == [0, 1, 2, 3]
    status = fresh_stack.endpoint_dir() / "status.json"
    wait_for(lambda: json.loads(status.read_text()).get("spooled") == 0, timeout=30,
             what="the spool to empty once the service has the results")
    ex.shutdown()


def test_tasks_wait_for_an_offline_endpoint(fresh_stack: LocalStack) -> None:
    fresh_stack.stop_endpoint()
    ex = Executor(endpoint_id=fresh_stack.endpoint_id, service=fresh_stack.service_url, token=fresh_stack.token)
    futures = [ex.submit(helpers.square, i) for i in range(10)]
    wait_for(lambda: all(f.state == "waiting-for-endpoint" for f in futures), what="tasks to be stored")
    assert not any(f.done() for f in futures)
    fresh_stack.start_endpoint()
    assert [f.result(timeout=60) for f in futures] == [i * i for i in range(10)]
    ex.shutdown()


def test_a_service_that_forgot_a_function_gets_it_again(fresh_stack: LocalStack) -> None:
    with Executor(endpoint_id=fresh_stack.endpoint_id, service=fresh_stack.service_url,
                  token=fresh_stack.token) as ex:
        assert ex.submit(helpers.square, 3).result(timeout=30) == 9  # the client now knows it is registered
        fresh_stack.kill_service()
        run_sql(fresh_stack, "DELETE FROM functions")
        fresh_stack.start_service()
        assert ex.submit(helpers.square, 4).result(timeout=60) == 16
