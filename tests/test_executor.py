"""The client API against a real service and endpoint: results, errors, states, cancel, groups."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tether import Executor, TaskCancelled, TaskFailed
from tether.protocol import TaskState

import helpers
from conftest import pid_alive, wait_for


def test_submit_and_map(executor: Executor) -> None:
    assert executor.submit(pow, 2, 10).result(timeout=30) == 1024
    assert list(executor.map(str.upper, ["a", "b"])) == ["A", "B"]
    assert list(executor.map(helpers.add, range(5), range(5))) == [0, 2, 4, 6, 8]
    assert executor.submit(helpers.add, 1, b=41).result(timeout=30) == 42


def test_many_tasks_all_resolve_with_right_values(executor: Executor) -> None:
    futures = [executor.submit(helpers.square, i) for i in range(2000)]
    assert [f.result(timeout=60) for f in futures] == [i * i for i in range(2000)]


@pytest.mark.timeout(120)
def test_large_arguments_and_results_in_flight_together_never_wedge_a_worker(executor: Executor) -> None:
    """Each worker is sent several large arguments while it sends back a large result: neither
    side may wait on the other (a blocking pipe once hung the Dask example this way)."""
    chunk = 600_000  # past a pipe's buffer, under the blob threshold: it travels inline
    futures = [executor.submit(bytes, bytes([i]) * chunk) for i in range(40)]
    results = [f.result(timeout=90) for f in futures]
    assert [(len(r), r[:1]) for r in results] == [(chunk, bytes([i])) for i in range(40)]


def test_function_from_main_runs(stack) -> None:
    script = textwrap.dedent(f"""
        from tether import Executor
        def triple(x):
            return 3 * x
        class Box:
            def __init__(self, v): self.v = v
        def unbox(b): return b.v + 1
        with Executor(endpoint_id={stack.endpoint_id!r}, service={stack.service_url!r}, token={stack.token!r}) as ex:
            print(ex.submit(triple, 14).result(timeout=30), ex.submit(unbox, Box(9)).result(timeout=30))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["42", "10"]


def test_remote_exception_keeps_type_message_and_traceback(executor: Executor) -> None:
    fut = executor.submit(helpers.fail_with, KeyError("missing-key"))
    with pytest.raises(KeyError) as info:
        fut.result(timeout=30)
    exc = info.value
    assert isinstance(exc, TaskFailed)
    assert exc.remote_type == "KeyError"
    assert "missing-key" in exc.remote_message
    assert "fail_with" in exc.remote_traceback
    assert fut.state == TaskState.FAILED

    with pytest.raises(helpers.CustomError, match="only here"):
        executor.submit(helpers.raise_custom, "only here").result(timeout=30)


def test_system_exit_in_task_is_a_failure_not_a_dead_worker(executor: Executor) -> None:
    # raised as TaskFailed, not SystemExit: a remote sys.exit must not end the client
    with pytest.raises(TaskFailed) as info:
        executor.submit(sys.exit, 3).result(timeout=30)
    assert info.value.remote_type == "SystemExit"
    assert executor.submit(helpers.square, 3).result(timeout=30) == 9


def test_states_and_transitions(executor: Executor) -> None:
    fut = executor.submit(helpers.sleep_then, 1.0, "done")
    wait_for(fut.running, timeout=30, what="the future to be RUNNING")
    assert fut.state == TaskState.RUNNING
    assert fut.result(timeout=30) == "done"
    order = [s.value for s in TaskState][:4] + ["success"]
    assert list(fut.transitions) == order
    times = [fut.transitions[s] for s in order]
    assert times == sorted(times)


def test_task_knows_its_id_and_runs_in_the_tasks_directory(executor: Executor, stack) -> None:
    fut = executor.submit(helpers.task_env)
    env = fut.result(timeout=30)
    assert env["task_id"] == fut.task_id
    assert Path(env["cwd"]) == stack.endpoint_dir() / "tasks"
    assert executor.submit(helpers.task_env).result(timeout=30)["task_id"] != fut.task_id


def test_python_sandbox_gives_each_task_a_directory(fresh_stack) -> None:
    config = fresh_stack.endpoint_dir() / "config.yaml"
    fresh_stack.stop_endpoint()
    config.write_text(config.read_text().replace("python_sandbox: false", "python_sandbox: true"))
    fresh_stack.start_endpoint()
    with Executor(endpoint_id=fresh_stack.endpoint_id, service=fresh_stack.service_url,
                  token=fresh_stack.token) as ex:
        fut = ex.submit(helpers.task_env)
        assert Path(fut.result(timeout=30)["cwd"]) == fresh_stack.endpoint_dir() / "tasks" / fut.task_id
        kept = ex.submit(helpers.write_in_sandbox, "out.txt")
        assert Path(kept.result(timeout=30)) == fresh_stack.endpoint_dir() / "tasks" / kept.task_id / "out.txt"
        empty = ex.submit(helpers.square, 2)
        assert empty.result(timeout=30) == 4
        assert not (fresh_stack.endpoint_dir() / "tasks" / empty.task_id).exists()  # empty sandboxes go


def test_cancel_running_task_kills_its_process_and_children(executor: Executor, tmp_path: Path) -> None:
    marker = tmp_path / "started"
    fut = executor.submit(helpers.touch_then_sleep, str(marker), 120)
    wait_for(marker.exists, what="the task to start")
    worker_pid, child_pid = map(int, marker.read_text().split())
    assert fut.cancel() is True
    assert fut.cancelled()
    with pytest.raises(TaskCancelled):
        fut.result(timeout=5)
    wait_for(lambda: not pid_alive(worker_pid) and not pid_alive(child_pid), timeout=20,
             what="the task's process and its child to be killed")
    # the endpoint replaced the worker and keeps serving
    assert executor.submit(helpers.square, 7).result(timeout=30) == 49


def test_cancel_queued_task_never_runs(executor: Executor, tmp_path: Path) -> None:
    blockers = [executor.submit(helpers.sleep_then, 3) for _ in range(4)]  # 2 workers busy, 2 queued
    marker = tmp_path / "must-not-exist"
    queued = executor.submit(helpers.touch, str(marker))
    assert queued.cancel()
    for b in blockers:
        b.result(timeout=30)
    assert executor.submit(helpers.square, 2).result(timeout=30) == 4  # queue drained past it
    assert not marker.exists()
    assert queued.cancelled()


def test_shutdown_cancel_futures(stack, tmp_path: Path) -> None:
    ex = Executor(endpoint_id=stack.endpoint_id, service=stack.service_url, token=stack.token)
    futures = [ex.submit(helpers.sleep_then, 2) for _ in range(6)]
    ex.shutdown(wait=True, cancel_futures=True)
    assert all(f.done() for f in futures)
    assert any(f.cancelled() for f in futures)
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(helpers.square, 1)


def test_worker_death_fails_only_its_task_in_words(executor: Executor) -> None:
    fut = executor.submit(helpers.die_hard)
    with pytest.raises(TaskFailed, match="worker process .* exited with code 17"):
        fut.result(timeout=30)
    assert executor.submit(helpers.square, 5).result(timeout=30) == 25


def test_as_completed_and_wait_work(executor: Executor) -> None:
    futures = [executor.submit(helpers.sleep_then, 0.2 * (3 - i), i) for i in range(3)]
    got = [f.result() for f in concurrent.futures.as_completed(futures, timeout=30)]
    assert sorted(got) == [0, 1, 2]


def test_task_group_reload_from_a_new_process(stack) -> None:
    group = "group-" + str(time.time_ns())
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import cloudpickle, helpers
        cloudpickle.register_pickle_by_value(helpers)
        from tether import Executor
        ex = Executor(endpoint_id={stack.endpoint_id!r}, service={stack.service_url!r}, token={stack.token!r},
                      task_group_id={group!r})
        futs = [ex.submit(helpers.sleep_then, 0.5, i) for i in range(5)]
        futs[0].result(timeout=30)   # fire, make sure the batch is stored, and leave without waiting
        print("submitted")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    ex = Executor(endpoint_id=stack.endpoint_id, service=stack.service_url, token=stack.token, task_group_id=group)
    futures = ex.reload()
    assert len(futures) == 5
    assert sorted(f.result(timeout=30) for f in futures) == [0, 1, 2, 3, 4]
    assert len({f.task_id for f in futures}) == 5


def test_submit_to_registered_function(executor: Executor) -> None:
    fid = executor.register_function(helpers.add)
    assert executor.submit_to_registered_function(fid, (2,), {"b": 3}).result(timeout=30) == 5


def test_thread_engine_runs_tasks_and_cancels_queued_ones(tmp_path: Path) -> None:
    from tether.local import local_stack

    with local_stack(tmp_path / "home", engine="thread", workers=1) as st:
        with Executor(endpoint_id=st.endpoint_id, service=st.service_url, token=st.token) as ex:
            assert list(ex.map(helpers.square, range(20))) == [i * i for i in range(20)]
            with pytest.raises(ZeroDivisionError):
                ex.submit(helpers.fail_with, ZeroDivisionError("x")).result(timeout=30)
            blocker = ex.submit(helpers.sleep_then, 1.0, "b")
            marker = tmp_path / "never"
            queued = ex.submit(helpers.touch, str(marker))
            assert queued.cancel()
            assert blocker.result(timeout=30) == "b"
            assert ex.submit(helpers.square, 3).result(timeout=30) == 9
            assert not marker.exists()


def test_every_part_runs_on_the_standard_event_loop_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """uvloop is the default where it is installed (tether.event_loop); without it (Windows, or
    TETHER_EVENT_LOOP=asyncio) the client, the service and the endpoint run on asyncio's loop,
    and a worker's large result still crosses its pipe whole."""
    from tether import event_loop
    from tether.local import local_stack

    assert event_loop.name() == "uvloop"  # installed with the service and endpoint extras
    monkeypatch.setenv(event_loop.ENV, "asyncio")
    assert event_loop.name() == "asyncio"
    with local_stack(tmp_path / "home", env={event_loop.ENV: "asyncio"}) as st:
        with Executor(endpoint_id=st.endpoint_id, service=st.service_url, token=st.token) as ex:
            assert type(ex._conn._loop).__module__.startswith("asyncio")
            assert list(ex.map(helpers.square, range(20))) == [i * i for i in range(20)]
            assert len(ex.submit(bytes, 600_000).result(timeout=60)) == 600_000


def test_endpoint_runs_only_allowed_functions(fresh_stack) -> None:
    with Executor(endpoint_id=fresh_stack.endpoint_id, service=fresh_stack.service_url,
                  token=fresh_stack.token) as ex:
        allowed = ex.register_function(helpers.square)
        config = fresh_stack.endpoint_dir() / "config.yaml"
        fresh_stack.stop_endpoint()
        config.write_text(config.read_text().replace("allowed_functions: null", f"allowed_functions: [{allowed}]"))
        fresh_stack.start_endpoint()
        assert ex.submit(helpers.square, 5).result(timeout=30) == 25
        with pytest.raises(PermissionError, match="not in this endpoint's allowed_functions"):
            ex.submit(helpers.add, 1, 2).result(timeout=30)


def test_lone_submissions_written_by_the_user_thread_arrive_whole_and_in_order(fresh_stack) -> None:
    """A lone task's submission is written by the thread that submits it (core/transport.py
    ThreadSender). With the socket's send buffer shrunk, most of each large submission does not
    fit at once: the rest must go out through the client's loop before any other frame, or the
    service would read a torn stream. Every task must come back with its own arguments, and
    the socket must stay the one it was (no reconnect, which would hide a torn frame)."""
    import socket

    from tether.connection import Connection

    with Executor(endpoint_id=fresh_stack.endpoint_id, service=fresh_stack.service_url,
                  token=fresh_stack.token) as ex:
        assert ex.submit(helpers.add, 1, 2).result(timeout=30) == 3  # connected
        conn = Connection.get(ex._conn.info)
        direct = conn._thread_sender
        assert direct is not None, "a plain ws:// connection gets a ThreadSender"
        sock = socket.socket(fileno=os.dup(direct._fd))
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        finally:
            sock.close()
        sent_before = conn.frames_sent["submit"]
        chunk = 300_000  # far past the shrunk buffer, under the blob threshold: it travels inline
        for i in range(12):  # one at a time: each is alone on the line, so its own thread writes it
            payload = bytes([i]) * chunk
            assert ex.submit(bytes, payload).result(timeout=60) == payload
            ex.submit(helpers.add, i, 1).result(timeout=30)  # a small one right behind it
        assert conn.frames_sent["submit"] - sent_before == 24
        assert conn._thread_sender is direct, "the connection was not cut and remade"
