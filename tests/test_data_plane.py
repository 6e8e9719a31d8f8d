"""The data plane under load and at its limits: frames bounded in bytes on every hop, flow
control to endpoints, and memory that stays flat however many tasks have gone through."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from tether import Executor
from tether.connection import Connection
from tether.errors import PayloadTooLarge
from tether.local import local_stack
from tether.protocol import FRAME_ENVELOPE, ErrorInfo, Result, Task, Tasks, TooLarge, encode, frame_batches
from tether.service.store import Store

import helpers
from conftest import TEST_MAX_PAYLOAD, wait_for

MiB = 1024 * 1024


def test_items_too_large_for_a_frame_fail_alone_and_the_rest_flows(stack, executor: Executor) -> None:
    executor.submit(helpers.square, 1).result(timeout=30)  # connected: the limits are known
    # three arguments, each under the payload limit, that no single frame could carry together
    near_limit = [executor.submit(helpers.identity, bytes([i]) * (TEST_MAX_PAYLOAD - 64 * 1024)) for i in range(3)]
    # a function body and arguments that together fit no frame: this task alone fails, in words
    heavy = executor.submit(helpers.closure_over(b"b" * (2 * MiB)), b"a" * (TEST_MAX_PAYLOAD - 256 * 1024))
    after = executor.submit(helpers.square, 7)
    with pytest.raises(PayloadTooLarge, match="frame limit"):
        heavy.result(timeout=60)
    assert after.result(timeout=60) == 49
    for i, fut in enumerate(near_limit):
        assert fut.result(timeout=60) == bytes([i]) * (TEST_MAX_PAYLOAD - 64 * 1024)


def test_a_frame_the_service_can_no_longer_take_is_recut_not_resent(fresh_stack, tmp_path: Path) -> None:
    """Batches sent but not acknowledged when the service went down are resent after the
    reconnect: if the restarted service accepts smaller frames, they are cut again to fit, and
    a task that fits no frame fails alone; nothing is resent forever."""
    ex = Executor(endpoint_id=fresh_stack.endpoint_id, service=fresh_stack.service_url, token=fresh_stack.token)
    assert ex.submit(helpers.square, 2).result(timeout=30) == 4
    pid = fresh_stack.service_pid()
    os.kill(pid, signal.SIGSTOP)  # the service takes the frame but never answers it
    try:
        big = ex.submit(helpers.identity, b"z" * (3 * MiB))
        small = ex.submit(helpers.square, 3)
        conn = Connection.get(ex._info)
        wait_for(lambda: conn._unacked, what="the batch to be sent and left unacknowledged")
    finally:
        os.kill(pid, signal.SIGKILL)
        os.kill(pid, signal.SIGCONT)
    fresh_stack.start_service("--max-payload-bytes", str(1 * MiB))  # frames of at most 2 MiB now
    with pytest.raises(PayloadTooLarge, match="frame limit"):
        big.result(timeout=60)
    assert small.result(timeout=60) == 9
    assert ex.submit(helpers.square, 5).result(timeout=30) == 25
    ex.shutdown()


def _status(home: Path, name: str = "local") -> dict:
    return json.loads((home / "endpoints" / name / "status.json").read_text())


def test_a_backlog_for_an_offline_endpoint_drains_within_its_window(tmp_path: Path) -> None:
    n, prefetch, workers = 50_000, 100, 2
    with local_stack(tmp_path / "home", workers=workers, service_args=("--prefetch", str(prefetch))) as stack:
        stack.stop_endpoint()
        with Executor(endpoint_id=stack.endpoint_id, service=stack.service_url, token=stack.token) as ex:
            futures = [ex.submit(helpers.square, i) for i in range(n)]
            wait_for(lambda: all(f.state == "waiting-for-endpoint" for f in futures[-100:]), timeout=60,
                     what="the backlog to be stored")
            t0 = time.monotonic()
            stack.start_endpoint()
            assert [f.result(timeout=120) for f in futures] == [i * i for i in range(n)]
            drained = time.monotonic() - t0
        stack.stop_endpoint()
        status = _status(stack.home)
        # the endpoint never held more than its window: workers + prefetch
        assert 0 < status["peak_inflight"] <= workers + prefetch, status
        print(f"{n} queued tasks drained in {drained:.1f}s ({n / drained:,.0f}/s); peak held {status['peak_inflight']}")


def _rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


@pytest.mark.slow
def test_memory_stays_flat_in_the_number_of_tasks(fresh_stack) -> None:
    """RSS of service, endpoint, its largest worker and client after N and after 2N tasks
    (N = 25,000, after the caches of the first N have filled): what grows with every task ever
    run would show here."""
    pids = {"service": fresh_stack.service_pid(), "endpoint": fresh_stack.endpoint_pid(), "client": os.getpid()}
    batch, rounds = 5_000, 5

    def run(ex: Executor) -> dict[str, int]:
        for _ in range(rounds):
            futures = [ex.submit(helpers.square, i) for i in range(batch)]
            assert sum(f.result(timeout=60) for f in futures) == sum(i * i for i in range(batch))
        rss = {name: _rss(pid) for name, pid in pids.items()}
        rss["worker"] = max(w.memory_info().rss for w in psutil.Process(pids["endpoint"]).children())
        return rss

    with Executor(endpoint_id=fresh_stack.endpoint_id, service=fresh_stack.service_url,
                  token=fresh_stack.token) as ex:
        after_n = run(ex)
        after_2n = run(ex)
    n = batch * rounds
    growth = {name: after_2n[name] - after_n[name] for name in after_n}
    print(f"RSS growth from {n:,} to {2 * n:,} tasks:", {k: f"{v / MiB:.1f} MiB" for k, v in growth.items()})
    for name, grown in growth.items():
        # flat: ~120 bytes per task ever run (one task id and its set entry) would fail this; so
        # did SQLite's statement cache before it was bounded (~4 MiB from 25,000 to 50,000 tasks),
        # and, in a worker (a lean process: 0.5 MiB), libc's copy of every TETHER_TASK_ID it set
        # (~95 bytes per task: ~1.2 MiB over the 12,500 tasks each of the two workers runs here)
        assert grown < (MiB // 2 if name == "worker" else 3 * MiB), (name, growth)


def test_frames_are_cut_by_bytes_and_count_in_order() -> None:
    ids = [f"t{i}" for i in range(8)]
    sizes = [10, 3000, 100, 9000, 10, 10, 10, 10]
    tasks = [Task(id=i, function="0" * 32, endpoint="e", payload=b"x" * n) for i, n in zip(ids, sizes, strict=True)]
    out = list(frame_batches(tasks, max_frame=FRAME_ENVELOPE + 4096, max_count=3))
    flat = [t.id for b in out for t in ([b.item] if isinstance(b, TooLarge) else b)]
    assert flat == ids  # nothing lost, nothing reordered
    assert [b.item.id for b in out if isinstance(b, TooLarge)] == ["t3"]  # alone, not sent
    for b in out:
        if not isinstance(b, TooLarge):
            assert len(b) <= 3 and len(encode(Tasks(tasks=b))) <= FRAME_ENVELOPE + 4096


def test_results_nobody_collects_expire(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'tether.db'}")
    try:
        owner, _ = store.create_user("someone")
        endpoint, _ = store.register_endpoint(owner, "ep")
        tasks = [Task(id=f"t{i}", function="0" * 32, endpoint=endpoint, payload=b"") for i in range(3)]
        store.insert_tasks(owner, tasks)
        long_ago = time.time() - 3600
        store.write_results([Result(id="t0", state="success", data=b"1", times={"success": long_ago}),
                             Result(id="t1", state="success", data=b"1", times={"success": time.time()})])
        assert store.purge(retention_s=7 * 86400, uncollected_retention_s=600) == 1  # t0 only
        assert {r.id for r in store.get_tasks(owner, ["t0", "t1", "t2"])} == {"t1", "t2"}  # t2 is still open
    finally:
        store.close()


def _task_path_on(tmp_path: Path, driver: bool) -> tuple[list, list]:
    """One store's answers and rows for a scenario of the task path: new, resubmitted, foreign
    and deleted-endpoint tasks, a result, a failure, and a second result that must not land."""
    store = Store(f"sqlite:///{tmp_path / f'driver-{driver}.db'}")
    store._driver_sql = driver  # the SQLite driver's statements (store_sqlite.py), or SQLAlchemy's
    try:
        alice, _ = store.create_user("alice")
        bob, _ = store.create_user("bob")
        ep, _ = store.register_endpoint(alice, "ep")
        gone, _ = store.register_endpoint(alice, "gone")
        store.delete_endpoint(gone, {"type": "EndpointDeleted", "message": "deleted"})
        names = {alice: "alice", bob: "bob", ep: "ep", gone: "gone"}

        def task(tid: str, endpoint: str = ep, **more: object) -> Task:
            return Task(id=tid, function="0" * 32, endpoint=endpoint, payload=b"args-" + tid.encode(), **more)

        answers = [
            store.insert_tasks(alice, [task("t1", spec={"cores": 2}, uec={"v": 1}, group="g", keep=5),
                                       task("t2")], 100.0),
            store.insert_tasks(alice, [task("t2"), task("t3")], 101.0),  # a resubmission and a new one
            store.insert_tasks(bob, [task("t1")], 102.0),  # someone else's id
            store.insert_tasks(alice, [task("t4", endpoint=gone)], 103.0),  # a deleted endpoint
            store.write_results([Result(id="t1", state="success", data=b"one",
                                        times={"dispatched": 1.0, "success": 3.0}),
                                 Result(id="t2", state="failed", error=ErrorInfo(type="E", message="m"),
                                        times={"running": 2.0, "failed": 4.0})]),
            store.write_results([Result(id="t2", state="success", data=b"late", times={"success": 9.0})]),
            store.insert_tasks(alice, [task("t5"), task("t5")], 104.0),  # an id twice in one batch
            # one task still open, one ended: only the first is stored (the driver's one-statement
            # way finds the guard left a row alone, rolls back, and looks first)
            store.write_results([Result(id="t3", state="success", data=b"three", times={"success": 5.0}),
                                 Result(id="t1", state="success", data=b"again", times={"success": 6.0})]),
        ]
        answers = [[[t.id if isinstance(t, Task) else t for t in part] for part in a] if isinstance(a, tuple)
                   else [r.id for r in a] for a in answers]
        with store.engine.connect() as conn:
            rows = [tuple(names.get(v, v) if isinstance(v, str) else v for v in row)
                    for row in conn.exec_driver_sql("SELECT * FROM tasks ORDER BY id")]
        return answers, rows
    finally:
        store.close()


def test_the_sqlite_task_path_writes_what_sqlalchemy_writes(tmp_path: Path) -> None:
    """A submission's insert and a result's update go to SQLite's driver directly (one task
    cost ~4x less), in one statement with no look first while every row is fresh (resp. open);
    the rows and answers must be those of the SQLAlchemy statements, in every case where the
    one-statement way must give up (resubmitted, foreign, repeated or deleted-endpoint ids, a
    result for a task that has one)."""
    fast_answers, fast_rows = _task_path_on(tmp_path, driver=True)
    answers, rows = _task_path_on(tmp_path, driver=False)
    assert fast_answers == answers
    assert fast_answers[1] == [["t3"], ["t2"], [], []] and fast_answers[2] == [[], [], ["t1"], []]
    assert fast_answers[3] == [[], [], [], ["t4"]] and fast_answers[5] == []  # a stored result stays
    assert fast_answers[7] == ["t3"]  # t1's first result stays
    assert fast_rows == rows and len(rows) == 4
