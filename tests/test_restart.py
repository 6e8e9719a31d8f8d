"""Restarting the endpoint kills no running task (issue 24): ``tether endpoint restart`` and a
SIGKILL of the daemon leave the process engine's workers running, the next daemon adopts them,
and every task runs once; ``tether endpoint stop`` still ends what runs. Real daemons, started
by the CLI; each task appends its pid to a marker file, so a second run shows as a second line."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

from tether import Executor
from tether.local import LocalStack

from conftest import pid_alive, tether_cli, wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])

LONG_S = 6.0
QUEUED = 6


def marked_sleep(marker: str, seconds: float, value: int) -> tuple[int, int]:
    """Say that this task began (and in which process), then sleep."""
    import os
    import time

    with open(marker, "a") as fh:
        fh.write(f"{os.getpid()}\n")
    time.sleep(seconds)
    return os.getpid(), value


def _lines(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def _each_ran_once(futures: list[Any], marks: list[Path], running: list[int]) -> None:
    """Every future resolves to its value, once; the long tasks (the first two) finished in the
    processes that began them; every task began once."""
    results = [f.result(timeout=60) for f in futures]
    counts = {f.task_id: 0 for f in futures}
    for f in futures:
        f.add_done_callback(lambda f: counts.__setitem__(f.task_id, counts[f.task_id] + 1))
    wait_for(lambda: all(counts.values()), timeout=10, what="every done-callback")
    assert [value for _, value in results] == list(range(len(futures)))
    assert [pid for pid, _ in results[:2]] == running
    assert [len(_lines(m)) for m in marks] == [1] * len(marks), [_lines(m) for m in marks]
    assert set(counts.values()) == {1}


def _restart(stack: LocalStack) -> None:
    tether_cli(stack.env, "endpoint", "restart", stack.endpoint_name)


def _kill_and_start(stack: LocalStack) -> None:
    stack.kill_endpoint()
    stack.start_endpoint()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("interrupt", [_restart, _kill_and_start], ids=["restart", "sigkill"])
def test_running_tasks_survive_a_restart_and_queued_ones_run_once(
        fresh_stack: LocalStack, tmp_path: Path, interrupt: Callable[[LocalStack], None]) -> None:
    # two workers (the fixture's), both running a long task; the short ones queue behind them
    marks = [tmp_path / f"task{i}" for i in range(2 + QUEUED)]
    with Executor(endpoint_id=fresh_stack.endpoint_id, service=fresh_stack.service_url,
                  token=fresh_stack.token) as ex:
        futures = [ex.submit(marked_sleep, str(marks[i]), LONG_S, i) for i in range(2)]
        futures += [ex.submit(marked_sleep, str(marks[i]), 0.1, i) for i in range(2, 2 + QUEUED)]
        wait_for(lambda: _lines(marks[0]) and _lines(marks[1]), what="the long tasks to start")
        running = [_lines(marks[0])[0], _lines(marks[1])[0]]
        old_daemon = fresh_stack.endpoint_pid()
        interrupt(fresh_stack)
        assert fresh_stack.endpoint_pid() != old_daemon
        assert all(pid_alive(pid) for pid in running), "a running task was killed by the restart"
        _each_ran_once(futures, marks, running)
    # adopted workers are replaced by fresh ones: the endpoint has its two workers again
    with Executor(endpoint_id=fresh_stack.endpoint_id, service=fresh_stack.service_url,
                  token=fresh_stack.token) as ex:
        pids = {pid for pid, _ in (f.result(timeout=60) for f in
                                   [ex.submit(marked_sleep, str(tmp_path / "after"), 1.0, 0) for _ in range(2)])}
    assert len(pids) == 2 and not pids & set(running)
    assert not any((fresh_stack.endpoint_dir() / "workers").glob("*.result")), "a result was left behind"


@pytest.mark.timeout(60)
def test_stop_still_ends_running_tasks(fresh_stack: LocalStack, tmp_path: Path) -> None:
    marker = tmp_path / "task"
    ex = Executor(endpoint_id=fresh_stack.endpoint_id, service=fresh_stack.service_url, token=fresh_stack.token)
    ex.submit(marked_sleep, str(marker), 60, 0)
    wait_for(lambda: _lines(marker), what="the task to start")
    fresh_stack.stop_endpoint()
    pid = _lines(marker)[0]
    wait_for(lambda: not pid_alive(pid), timeout=10, what="stop to end the running task")
    ex.shutdown(wait=False)
    assert not [p for p in (fresh_stack.endpoint_dir() / "workers").iterdir() if p.name.isdigit()
                and pid_alive(int(p.name))], os.listdir(fresh_stack.endpoint_dir() / "workers")


def _cancel_an_adopted_task(stack: LocalStack, tmp_path: Path) -> None:
    """A task adopted across a restart is cancelled: its worker ends, and the next task runs."""
    marker = tmp_path / "task"
    ex = Executor(endpoint_id=stack.endpoint_id, service=stack.service_url, token=stack.token)
    future = ex.submit(marked_sleep, str(marker), 60, 0)
    wait_for(lambda: _lines(marker), what="the task to start")
    _restart(stack)
    pid = _lines(marker)[0]
    assert pid_alive(pid)
    assert future.cancel()
    wait_for(lambda: not pid_alive(pid), timeout=10, what="the cancel to end the adopted task")
    assert future.cancelled()
    # its worker is replaced (by the engine, or by Parsl): the endpoint runs the next task
    assert ex.submit(marked_sleep, str(tmp_path / "next"), 0, 1).result(timeout=30)[1] == 1
    ex.shutdown(wait=False)


@pytest.mark.timeout(60)
def test_an_adopted_task_can_be_cancelled(fresh_stack: LocalStack, tmp_path: Path) -> None:
    _cancel_an_adopted_task(fresh_stack, tmp_path)


# --- the Parsl engines: the engine host outlives the daemon (engines/parsl/host.py) ----------------

def _engine_processes(stack: LocalStack) -> dict[str, object]:
    """The engine host's pid and the pids of everything it started (interchange, worker pools, workers)."""
    import psutil

    host = int((stack.endpoint_dir() / "engine-host.pid").read_text().split()[0])
    children = psutil.Process(host).children(recursive=True)
    interchange = [p.pid for p in children if "HTEX interchange" in " ".join(p.cmdline())]
    return {"host": host, "interchange": interchange, "all": [host, *(p.pid for p in children)]}


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("interrupt", [_restart, _kill_and_start], ids=["restart", "sigkill"])
def test_htex_tasks_survive_a_restart_and_run_once(tmp_path: Path, interrupt: Callable[[LocalStack], None]) -> None:
    pytest.importorskip("parsl", reason="the htex engine needs Parsl")
    from test_htex import HTEX_LOCAL

    from parsl_stack import engine_stack

    config = HTEX_LOCAL % 0  # LocalProvider, one block of two workers

    marks = [tmp_path / f"task{i}" for i in range(2 + QUEUED)]
    with engine_stack(tmp_path / "home", config) as stack:
        ex = Executor(endpoint_id=stack.endpoint_id, service=stack.service_url, token=stack.token)
        # two workers, both running a long task; the short ones wait in Parsl's interchange
        futures = [ex.submit(marked_sleep, str(marks[i]), LONG_S, i) for i in range(2)]
        wait_for(lambda: _lines(marks[0]) and _lines(marks[1]), what="the long tasks to start")
        futures += [ex.submit(marked_sleep, str(marks[i]), 0.1, i) for i in range(2, 2 + QUEUED)]
        running = [_lines(marks[0])[0], _lines(marks[1])[0]]
        before = _engine_processes(stack)
        assert before["interchange"], before
        old_daemon = stack.endpoint_pid()
        interrupt(stack)
        assert stack.endpoint_pid() != old_daemon
        assert all(pid_alive(pid) for pid in running), "a running task was killed by the restart"
        assert all(pid_alive(pid) for pid in before["all"]), "the engine host, interchange or workers ended"
        assert _engine_processes(stack)["host"] == before["host"], "the new daemon started another engine host"
        _each_ran_once(futures, marks, running)
        # new tasks run, on the same workers
        assert ex.submit(marked_sleep, str(tmp_path / "after"), 0, 99).result(timeout=30)[1] == 99
        ex.shutdown(wait=False)
        stack.stop_endpoint()
        # a real stop ends the engine host and everything it started
        wait_for(lambda: not any(pid_alive(pid) for pid in before["all"]), timeout=30,
                 what="'tether endpoint stop' to end the engine host, interchange and workers")


@pytest.mark.timeout(120)
def test_htex_stop_after_a_sigkill_ends_the_engine_host(tmp_path: Path) -> None:
    pytest.importorskip("parsl", reason="the htex engine needs Parsl")
    from test_htex import HTEX_LOCAL

    from parsl_stack import engine_stack

    config = HTEX_LOCAL % 0  # LocalProvider, one block of two workers

    marker = tmp_path / "task"
    with engine_stack(tmp_path / "home", config) as stack:
        ex = Executor(endpoint_id=stack.endpoint_id, service=stack.service_url, token=stack.token)
        ex.submit(marked_sleep, str(marker), 60, 0)
        wait_for(lambda: _lines(marker), what="the task to start")
        engine = _engine_processes(stack)
        stack.kill_endpoint()  # no daemon now; the task runs on in the engine host
        assert pid_alive(_lines(marker)[0])
        stack.stop_endpoint()
        wait_for(lambda: not any(pid_alive(pid) for pid in engine["all"]), timeout=30,
                 what="'tether endpoint stop' to end the orphaned engine host and its task")
        ex.shutdown(wait=False)


@pytest.mark.timeout(90)
def test_an_adopted_htex_task_can_be_cancelled(tmp_path: Path) -> None:
    pytest.importorskip("parsl", reason="the htex engine needs Parsl")
    from test_htex import HTEX_LOCAL

    from parsl_stack import engine_stack

    with engine_stack(tmp_path / "home", HTEX_LOCAL % 0) as stack:
        _cancel_an_adopted_task(stack, tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_mpi_engine_tasks_survive_a_restart(tmp_path: Path) -> None:
    pytest.importorskip("parsl", reason="the mpi engine needs Parsl")
    from test_htex import MPI_LOCAL

    from parsl_stack import engine_stack

    config = MPI_LOCAL
    marks = [tmp_path / "long", tmp_path / "queued"]
    with engine_stack(tmp_path / "home", config) as stack:
        ex = Executor(endpoint_id=stack.endpoint_id, service=stack.service_url, token=stack.token)
        futures = [ex.submit(marked_sleep, str(marks[0]), LONG_S, 0)]
        wait_for(lambda: _lines(marks[0]), timeout=60, what="the long task to start")
        futures.append(ex.submit(marked_sleep, str(marks[1]), 0.1, 1))  # waits: one MPI app at a time
        running = _lines(marks[0])[0]
        _restart(stack)
        assert pid_alive(running), "a running task was killed by the restart"
        assert [f.result(timeout=60) for f in futures][0] == (running, 0)
        assert futures[1].result(timeout=30)[1] == 1
        assert [len(_lines(m)) for m in marks] == [1, 1], [_lines(m) for m in marks]
        ex.shutdown(wait=False)
