"""Results that stay where they were computed (issue 20): a large result is kept by its endpoint,
a task on the same endpoint that takes it as an argument reads it there, and only what the
user asks for crosses to the user's machine.

What the tests look at is what a user (or an operator) can see: values, errors and their
words, the files in the endpoint's ``results/`` and the service's ``blobs/`` directories.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import cloudpickle
import pytest

from tether import Executor, ResultLost, TaskFailed

from conftest import database_env, wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the endpoint cannot import this module

MIB = 1024 * 1024
BIG = 12 * MIB  # over the 8 MiB blob threshold: kept on the endpoint


def make_bytes(n: int, seed: int = 1) -> bytes:
    import random

    return random.Random(seed).randbytes(n)


def digest(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def fail(_x: object = None) -> None:
    raise ValueError("the producer broke")


def kept_files(home: Path) -> list[Path]:
    d = home / "endpoints" / "local" / "results"
    return sorted(d.iterdir()) if d.exists() else []


def service_blobs(home: Path) -> list[Path]:
    d = home / "service" / "blobs"
    return sorted(p for p in d.iterdir() if p.is_file()) if d.exists() else []


@pytest.fixture
def ex(fresh_stack):
    with Executor(endpoint_id=fresh_stack.endpoint_id, service=fresh_stack.service_url,
                  token=fresh_stack.token) as ex:
        yield ex


def test_a_large_result_stays_on_the_endpoint_until_the_user_asks_for_it(fresh_stack, ex):
    fut = ex.submit(make_bytes, BIG)
    assert fut.exception(timeout=60) is None
    kept = fut.remote_value()
    assert kept is not None and kept.size > BIG and kept.endpoint == fresh_stack.endpoint_id
    assert len(kept_files(fresh_stack.home)) == 1, "the endpoint keeps the result"
    assert service_blobs(fresh_stack.home) == [], "nothing was uploaded to the service yet"
    assert fut.result(timeout=60) == make_bytes(BIG)
    assert fut.result() == make_bytes(BIG)  # fetched once, then it is here


def test_a_chain_on_one_endpoint_never_moves_its_data(fresh_stack, ex):
    first = ex.submit(make_bytes, BIG)
    second = ex.submit(bytes.upper, first)  # the future itself: the endpoint puts the value in
    third = ex.submit(digest, second)
    assert third.result(timeout=60) == digest(make_bytes(BIG).upper())
    assert service_blobs(fresh_stack.home) == [], "no intermediate result crossed the service"
    assert first.remote_value() is not None and second.remote_value() is not None
    # nested in containers too, and a handle (not only a future) will do
    both = ex.submit(lambda pair: [len(x) for x in pair["xs"]], {"xs": [first.remote_value(), second]})
    assert both.result(timeout=60) == [BIG, BIG]
    assert service_blobs(fresh_stack.home) == []


def test_a_small_result_is_sent_by_value_and_a_pending_one_by_reference(ex):
    small = ex.submit(lambda: 21)
    assert ex.submit(lambda x: x * 2, small).result(timeout=60) == 42
    import time as _time

    slow = ex.submit(lambda: (_time.sleep(0.5), 5)[1])
    assert ex.submit(lambda x: x + 1, slow).result(timeout=60) == 6


def test_a_failed_input_fails_the_task_that_takes_it_in_words(ex):
    broken = ex.submit(fail)
    after = ex.submit(len, broken)
    with pytest.raises(TaskFailed) as info:
        after.result(timeout=60)
    assert f"input task {broken.task_id} failed" in str(info.value)
    assert "the producer broke" in str(info.value)


def test_a_released_result_is_freed_and_then_reported_lost(fresh_stack, ex):
    fut = ex.submit(make_bytes, BIG)
    assert fut.exception(timeout=60) is None
    assert len(kept_files(fresh_stack.home)) == 1
    fut.release()
    wait_for(lambda: not kept_files(fresh_stack.home), 30, "the endpoint to free the released result")
    with pytest.raises(ResultLost, match="no longer kept"):
        fut.result(timeout=60)


def test_a_dropped_future_frees_its_result(fresh_stack, ex):
    import gc

    fut = ex.submit(make_bytes, BIG)
    assert fut.exception(timeout=60) is None
    assert len(kept_files(fresh_stack.home)) == 1
    del fut
    gc.collect()
    wait_for(lambda: not kept_files(fresh_stack.home), 30, "the endpoint to free the result nobody holds")


def test_kept_results_survive_an_endpoint_restart(fresh_stack, ex):
    fut = ex.submit(make_bytes, BIG)
    assert fut.exception(timeout=60) is None
    fresh_stack.stop_endpoint()
    fresh_stack.start_endpoint()
    assert ex.submit(digest, fut).result(timeout=90) == digest(make_bytes(BIG))
    assert fut.result(timeout=60) == make_bytes(BIG)


def test_a_full_store_sends_results_to_the_service_as_before(tmp_path):
    from tether.local import local_stack



    with database_env() as db, local_stack(tmp_path / "home", engine="process", workers=1, env=db) as s:
        config = s.home / "endpoints" / "local" / "config.yaml"
        config.write_text(config.read_text().replace("kept_results_max_bytes: 21474836480",
                                                     "kept_results_max_bytes: 0"))
        s.stop_endpoint()
        s.start_endpoint()
        with Executor(endpoint_id=s.endpoint_id, service=s.service_url, token=s.token) as ex:
            fut = ex.submit(make_bytes, BIG)
            assert fut.result(timeout=60) == make_bytes(BIG)
            assert fut.remote_value() is None
            assert hashlib.sha256(fut.result()).hexdigest() == digest(make_bytes(BIG))
        assert kept_files(s.home) == []


def test_an_input_kept_on_another_endpoint_moves_endpoint_to_endpoint(fresh_stack, ex):
    """Through the service, uploaded once by the endpoint that keeps it; never through the client."""
    fresh_stack.configure_endpoint("process", 1, name="other")
    other = fresh_stack.start_endpoint("other")
    try:
        with Executor(endpoint_id=other, service=fresh_stack.service_url, token=fresh_stack.token) as there:
            produced = ex.submit(make_bytes, BIG)
            used = there.submit(digest, produced)
            assert used.result(timeout=90) == digest(make_bytes(BIG))
            assert len(service_blobs(fresh_stack.home)) == 1, "uploaded once, by the endpoint that keeps it"
            again = there.submit(len, produced)  # a second reader: the same blob, no second upload
            assert again.result(timeout=90) == BIG
            assert len(service_blobs(fresh_stack.home)) == 1
            # a small result that finished before its reader was submitted travels by value
            small = ex.submit(lambda: 7)
            assert small.result(timeout=60) == 7
            assert there.submit(lambda x: x * 6, small).result(timeout=60) == 42
    finally:
        fresh_stack.stop_endpoint("other")


def test_an_input_on_an_offline_endpoint_is_reported_in_words(fresh_stack, ex):
    fresh_stack.configure_endpoint("process", 1, name="other")
    other = fresh_stack.start_endpoint("other")
    produced = ex.submit(make_bytes, BIG)
    assert produced.exception(timeout=60) is None
    fresh_stack.stop_endpoint()  # the endpoint that keeps it goes away
    try:
        with Executor(endpoint_id=other, service=fresh_stack.service_url, token=fresh_stack.token) as there:
            used = there.submit(len, produced)
            with pytest.raises(ResultLost, match=f"kept on endpoint {fresh_stack.endpoint_id}, which is not connected"):
                used.result(timeout=90)
    finally:
        fresh_stack.stop_endpoint("other")


def test_keep_results_over_keeps_smaller_results_too(fresh_stack):
    with Executor(endpoint_id=fresh_stack.endpoint_id, service=fresh_stack.service_url, token=fresh_stack.token,
                  keep_results_over=1024) as ex:
        small, large = ex.submit(lambda: b"x" * 100), ex.submit(lambda: b"y" * 4096)
        assert small.result(timeout=60) == b"x" * 100 and small.remote_value() is None
        assert large.exception(timeout=60) is None and large.remote_value() is not None
        assert ex.submit(len, large).result(timeout=60) == 4096
        assert large.result(timeout=60) == b"y" * 4096


def test_results_just_over_a_mebibyte_are_fetched_whole_several_at_once(fresh_stack):
    """What a Dask shuffle does: several kept results a little over a mebibyte (an upload taken
    off the HTTP stack, a first piece and a short last one, a reader following each) fetched
    together, each whole and in time (a receive that waited for a whole piece on a fresh
    connection once stalled every one of them)."""
    size = MIB + 252_502
    with Executor(endpoint_id=fresh_stack.endpoint_id, service=fresh_stack.service_url, token=fresh_stack.token,
                  keep_results_over=64 * 1024) as ex:
        futures = [ex.submit(make_bytes, size, seed) for seed in range(6)]
        for seed, fut in enumerate(futures):
            assert fut.result(timeout=30) == make_bytes(size, seed)


def test_the_rest_client_fetches_a_kept_result(fresh_stack, ex):
    from tether import Client

    fut = ex.submit(make_bytes, BIG)
    assert fut.exception(timeout=60) is None
    with Client(fresh_stack.service_url, fresh_stack.token) as client:
        assert client.get_result(fut.task_id) == make_bytes(BIG)


def test_a_cancelled_input_fails_the_task_waiting_for_it_in_words(ex):
    import time as _time

    slow = ex.submit(lambda: (_time.sleep(30), b"never")[1])
    after = ex.submit(len, slow)
    wait_for(lambda: slow.state == "running", 60, "the producer to start")
    slow.cancel()
    with pytest.raises(TaskFailed, match=f"input task {slow.task_id} was cancelled"):
        after.result(timeout=60)


def _reconfigure(stack, **keys: object) -> None:
    import yaml

    config = stack.home / "endpoints" / "local" / "config.yaml"
    data = yaml.safe_load(config.read_text())
    data.update(keys)
    config.write_text(yaml.safe_dump(data))
    stack.stop_endpoint()
    stack.start_endpoint()


def test_past_its_bytes_the_store_sends_results_to_the_service(fresh_stack, ex):
    _reconfigure(fresh_stack, kept_results_max_bytes=20 * MIB)
    first, second = ex.submit(make_bytes, BIG, 1), ex.submit(make_bytes, BIG, 2)
    assert first.result(timeout=60) == make_bytes(BIG, 1) and second.result(timeout=60) == make_bytes(BIG, 2)
    assert sorted(f is not None for f in (first.remote_value(), second.remote_value())) == [False, True]
    assert len(kept_files(fresh_stack.home)) == 1  # one fits in 20 MiB; the other went as a blob


def test_a_result_past_its_retention_is_freed_and_reported_lost(fresh_stack, ex):
    import os
    import time as _time

    fut = ex.submit(make_bytes, BIG)
    assert fut.exception(timeout=60) is None
    (path,) = kept_files(fresh_stack.home)
    old = _time.time() - 3600
    os.utime(path, (old, old))  # computed an hour ago, as far as the store can tell
    _reconfigure(fresh_stack, kept_results_retention_s=60)  # read back at start: past its retention
    assert kept_files(fresh_stack.home) == []
    with pytest.raises(ResultLost, match="kept_results_retention_s"):
        fut.result(timeout=60)
    with pytest.raises(ResultLost, match="no longer"):
        ex.submit(len, fut).result(timeout=60)
