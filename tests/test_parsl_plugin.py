"""``tether.parsl.TetherExecutor``: a real Parsl DataFlowKernel driving apps on real service and
endpoint processes (the session stack: process engine, 2 workers), asserting what a Parsl user sees:
results, exception types, files, rank counts, the monitoring database."""

from __future__ import annotations

import contextlib
import dataclasses
import http.server
import os
import sqlite3
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import pytest
from parsl import AUTO_LOGNAME, File, bash_app, python_app
from parsl.app.errors import AppTimeout, BashExitFailure, MissingOutputs
from parsl.executors.errors import InvalidResourceSpecification as ParslInvalidResourceSpecification

import tether
from tether import Client, EndpointOffline, TaskCancelled, TaskFailed, UnknownEndpoint
from tether.local import LocalStack
from tether.parsl import TetherExecutor, version_problems

import helpers
from conftest import needs_mpi, pid_alive, wait_for
from parsl_stack import engine_stack, loaded, tether_executor

# apps defined here run on the endpoint's workers, which cannot import this module
cloudpickle.register_pickle_by_value(sys.modules[__name__])

PY = sys.executable


@contextlib.contextmanager
def extra_endpoint(stack: LocalStack, name: str, config_yaml: str | None = None,
                   env: dict[str, str] | None = None) -> Iterator[str]:
    """A second endpoint on the session's service (its own config.yaml or environment)."""
    other = dataclasses.replace(stack, endpoint_name=name, env={**stack.env, **(env or {})})
    other.configure_endpoint("process", 1)
    if config_yaml is not None:
        (other.endpoint_dir() / "config.yaml").write_text(config_yaml)
    try:
        yield other.start_endpoint()
    finally:
        other.stop_endpoint()


# --- apps ------------------------------------------------------------------------------------
@python_app
def add(a: int, b: int) -> int:
    return a + b


@python_app
def raise_custom(msg: str) -> None:
    helpers.raise_custom(msg)


@python_app
def divide(a: float, b: float) -> float:
    return a / b


@python_app
def cwd_and_env() -> dict:
    return {"cwd": os.getcwd(), "task": os.environ.get("TETHER_TASK_ID"), "pid": os.getpid()}


@bash_app
def hello(stdout=AUTO_LOGNAME, stderr=AUTO_LOGNAME) -> str:  # noqa: B006 - Parsl's idiom
    return "echo hello; echo to-stderr >&2"


@bash_app
def shell(cmd: str, stdout=None, stderr=None, walltime=None, outputs=(), inputs=()) -> str:  # noqa: B006
    return cmd


@bash_app
def ring(parsl_resource_specification={}, stdout=None) -> str:  # noqa: B006 - as the issue writes it
    return f"$PARSL_MPI_PREFIX {PY} -c 'from mpi4py import MPI; c = MPI.COMM_WORLD; print(c.rank, c.size)'"


@python_app
def mpi_env(parsl_resource_specification={}) -> dict:  # noqa: B006
    return {k: v for k, v in os.environ.items() if k.startswith("PARSL_")}


@python_app
def fail_once(marker: str) -> str:
    from pathlib import Path

    if not Path(marker).exists():
        Path(marker).write_text("first try")
        raise RuntimeError("first try fails")
    return "second try"


@python_app
def read_file(inputs=()) -> str:  # noqa: B006
    with open(inputs[0].filepath) as fh:
        return fh.read()


# --- the issue's example ---------------------------------------------------------------------
@needs_mpi
def test_issue_example(stack: LocalStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    ex = tether_executor(stack, label="hpc")
    with loaded(tmp_path, ex, retries=1):
        assert add(1, add(2, 3)).result(timeout=60) == 6  # dependencies resolved by Parsl
        h = hello()
        assert h.result(timeout=60) == 0
        assert Path(h.stdout).read_text() == "hello\n"
        assert "to-stderr" in Path(h.stderr).read_text()
        assert str(tmp_path / "runinfo") in h.stdout  # AUTO_LOGNAME: Parsl's task_logs of this run
        ring(parsl_resource_specification={"num_ranks": 4}, stdout="ring.out").result(timeout=90)
        # a relative path is relative to the script's directory: the file came back through Tether
        lines = sorted((tmp_path / "ring.out").read_text().splitlines())
        assert lines == ["0 4", "1 4", "2 4", "3 4"]

        # the try's future carries the Tether task id, which the service knows
        fut = add(20, 22)
        assert fut.result(timeout=60) == 42
        exec_fu = fut.task_record["exec_fu"]
        assert isinstance(exec_fu, tether.TetherFuture)
        assert exec_fu.parsl_executor_task_id == exec_fu.task_id
        assert Client(stack.service_url, stack.token).get_task(exec_fu.task_id)["state"] == "success"
        assert list(exec_fu.transitions)[-2:] == ["running", "success"]


# --- python_app semantics --------------------------------------------------------------------
def test_python_app_exceptions_arrive_as_their_own_type(stack: LocalStack, tmp_path: Path) -> None:
    with loaded(tmp_path, tether_executor(stack)):
        with pytest.raises(helpers.CustomError, match="from the endpoint"):
            raise_custom("from the endpoint").result(timeout=60)
        with pytest.raises(ZeroDivisionError):
            divide(1, 0).result(timeout=60)
        assert divide(1, 4).result(timeout=60) == 0.25
        info = cwd_and_env().result(timeout=60)
        assert info["pid"] != os.getpid() and info["task"]  # ran in an endpoint worker, as a Tether task


# --- bash_app semantics ----------------------------------------------------------------------
def test_bash_app_files_and_failures(stack: LocalStack, tmp_path: Path) -> None:
    out, err = tmp_path / "logs" / "out.txt", tmp_path / "err.txt"
    with loaded(tmp_path, tether_executor(stack)):
        assert shell("echo one", stdout=str(out)).result(timeout=60) == 0
        assert shell("echo two; echo oops >&2", stdout=(str(out), "a"), stderr=(str(err), "w")).result(timeout=60) == 0
        assert out.read_text() == "one\ntwo\n"  # the parent directory was created, then appended to
        assert err.read_text().endswith("oops\n")  # Parsl writes the command line first, then the stream

        with pytest.raises(BashExitFailure) as failed:
            shell("echo before; exit 3", stdout=str(tmp_path / "exit.out")).result(timeout=60)
        assert failed.value.exitcode == 3 and "exit code 3" in str(failed.value)
        assert (tmp_path / "exit.out").read_text() == "before\n"

        started = time.monotonic()
        with pytest.raises(AppTimeout, match="exceeded walltime: 1 seconds"):
            shell("sleep 30", walltime=1).result(timeout=60)
        assert time.monotonic() - started < 20

        made, missing = File(str(tmp_path / "made.txt")), File(str(tmp_path / "missing.txt"))
        assert shell(f"echo data > {made.filepath}", outputs=[made]).result(timeout=60) == 0
        with pytest.raises(MissingOutputs) as lost:
            shell("true", outputs=[missing]).result(timeout=60)
        assert [f.filepath for f in lost.value.outputs] == [missing.filepath]

        # an output File is a DataFuture another app can take as input: Parsl orders the two
        produced = shell(f"echo chained > {tmp_path / 'chain.txt'}", outputs=[File(str(tmp_path / "chain.txt"))])
        assert read_file(inputs=[produced.outputs[0]]).result(timeout=60) == "chained\n"


def test_working_dir_is_where_apps_run_on_the_endpoint(stack: LocalStack, tmp_path: Path) -> None:
    """staging="shared": paths are the endpoint's, relative ones relative to working_dir there."""
    wd = tmp_path / "wd"
    with loaded(tmp_path, tether_executor(stack, working_dir=str(wd), staging="shared")):
        assert shell("echo relative", stdout="rel.out").result(timeout=60) == 0
        assert (wd / "rel.out").read_text() == "relative\n"
        assert cwd_and_env().result(timeout=60)["cwd"] == str(wd)


def test_in_task_http_staging_needs_no_shared_file_system(stack: LocalStack, tmp_path: Path) -> None:
    """Parsl's HTTPInTaskStaging downloads the input on the endpoint, into working_dir."""
    from parsl.data_provider.http import HTTPInTaskStaging

    served = tmp_path / "served"
    served.mkdir()
    (served / "data.txt").write_text("staged over http\n")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: object, **kw: object) -> None:
            super().__init__(*a, directory=str(served), **kw)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        ex = tether_executor(stack, working_dir=str(tmp_path / "staged"), storage_access=[HTTPInTaskStaging()])
        with loaded(tmp_path, ex):
            url = f"http://127.0.0.1:{server.server_address[1]}/data.txt"
            assert read_file(inputs=[File(url)]).result(timeout=60) == "staged over http\n"
        assert (tmp_path / "staged" / "data.txt").exists()
    finally:
        server.shutdown()


# --- MPI apps --------------------------------------------------------------------------------
@needs_mpi
@pytest.mark.parametrize("ranks", [2, 4])
def test_mpi_bash_app_rank_count(stack: LocalStack, tmp_path: Path, ranks: int) -> None:
    out = tmp_path / "ranks.out"
    with loaded(tmp_path, tether_executor(stack)):
        ring(parsl_resource_specification={"num_ranks": ranks}, stdout=str(out)).result(timeout=90)
    lines = sorted(out.read_text().splitlines())
    assert lines == [f"{r} {ranks}" for r in range(ranks)], out.read_text()


@needs_mpi
def test_mpi_environment_is_parsls_and_only_for_mpi_apps(stack: LocalStack, tmp_path: Path) -> None:
    spec = {"num_nodes": 1, "ranks_per_node": 2, "launcher_options": "-l"}
    with loaded(tmp_path, tether_executor(stack)):
        env = mpi_env(parsl_resource_specification=spec).result(timeout=60)
        plain = mpi_env().result(timeout=60)
    assert env["PARSL_NUM_RANKS"] == "2" and env["PARSL_NUM_NODES"] == "1" and env["PARSL_MPI_NODELIST"] == "localhost"
    assert "-n 2 -ppn 2 -hosts localhost -l" in env["PARSL_MPI_PREFIX"]
    assert not any(k in plain for k in ("PARSL_MPI_PREFIX", "PARSL_NUM_RANKS"))  # restored after the MPI app


# --- one bad task never breaks the executor --------------------------------------------------
def test_bad_specifications_fail_their_app_and_later_apps_run(stack: LocalStack, tmp_path: Path) -> None:
    with loaded(tmp_path, tether_executor(stack), retries=1):
        with pytest.raises(ParslInvalidResourceSpecification, match="did you mean 'num_ranks'"):
            ring(parsl_resource_specification={"num_rank": 4}).result(timeout=60)
        assert add(1, 1).result(timeout=60) == 2  # Parsl issue 3620: GlobusComputeExecutor is broken from here on
        with pytest.raises(tether.InvalidResourceSpecification, match="num_ranks=5 does not fit"):
            ring(parsl_resource_specification={"num_nodes": 1, "ranks_per_node": 2, "num_ranks": 5}).result(timeout=60)
        with pytest.raises(ValueError, match="user_endpoint_config'.*must be a dict"):
            add(1, 2, parsl_resource_specification={"user_endpoint_config": "big"}).result(timeout=60)
        # a specification the endpoint cannot satisfy fails at the endpoint, in words
        with pytest.raises(tether.InvalidResourceSpecification, match="num_nodes=2"):
            mpi_env(parsl_resource_specification={"num_nodes": 2, "ranks_per_node": 2}).result(timeout=60)
        assert [f.result(timeout=60) for f in [add(i, 1) for i in range(5)]] == [1, 2, 3, 4, 5]
    with pytest.raises(ParslInvalidResourceSpecification, match="unknown key 'cores'"):
        TetherExecutor(endpoint_id=stack.endpoint_id, resource_specification={"cores": 4})


def test_unknown_and_offline_endpoints_fail_their_apps_in_words(stack: LocalStack, tmp_path: Path) -> None:
    offline = Client(stack.service_url, stack.token).register_endpoint("never-started")["endpoint_id"]
    good = tether_executor(stack, label="good")
    unknown = tether_executor(stack, label="unknown", endpoint_id="00000000-0000-0000-0000-000000000000")
    strict = tether_executor(stack, label="strict", endpoint_id=offline, require_online=True)
    with pytest.warns(RuntimeWarning) as record, loaded(tmp_path, good, unknown, strict):
        texts = " | ".join(str(w.message) for w in record)
        assert "'unknown'" in texts and "cannot be used" in texts and "'strict'" in texts and "offline" in texts

        @python_app(executors=["unknown"])
        def on_unknown() -> int:
            return 1

        @python_app(executors=["strict"])
        def on_offline() -> int:
            return 2

        @python_app(executors=["good"])
        def on_good(x: int) -> int:
            return x

        with pytest.raises(UnknownEndpoint, match="unknown endpoint 00000000"):
            on_unknown().result(timeout=60)
        with pytest.raises(EndpointOffline, match="is offline and executor 'strict' has require_online=True"):
            on_offline().result(timeout=60)
        assert [on_good(i).result(timeout=60) for i in range(3)] == [0, 1, 2]


def test_a_function_the_endpoint_refuses_fails_that_app(stack: LocalStack, tmp_path: Path) -> None:
    """Two executors in one Config, on two endpoints: one only runs allow-listed functions."""
    refusing = "engine: {type: process, workers: 1}\nallowed_functions: []\n"
    with extra_endpoint(stack, "refusing", refusing) as refusing_id:
        with loaded(tmp_path, tether_executor(stack, label="open"),
                    tether_executor(stack, label="locked", endpoint_id=refusing_id)):

            @python_app(executors=["locked"])
            def locked_app() -> int:
                return 1

            @python_app(executors=["open"])
            def open_app() -> str:
                return os.getcwd()

            with pytest.raises(PermissionError, match="not in this endpoint's allowed_functions") as refused:
                locked_app().result(timeout=60)
            assert isinstance(refused.value, TaskFailed)
            assert Path(open_app().result(timeout=60)).parent.name == stack.endpoint_name


def test_two_executors_same_endpoint_different_user_endpoint_config(stack: LocalStack, tmp_path: Path) -> None:
    a = tether_executor(stack, label="small", user_endpoint_config={"WORKERS": 1})
    b = tether_executor(stack, label="large", user_endpoint_config={"WORKERS": 8})
    with loaded(tmp_path, a, b):

        @python_app(executors=["small"])
        def on_small(x: int) -> int:
            return x + 1

        @python_app(executors=["large"])
        def on_large(x: int, parsl_resource_specification: dict | None = None) -> int:
            return x * 2

        futures = [on_small(i) for i in range(20)] + [on_large(i) for i in range(20)]
        futures.append(on_large(5, parsl_resource_specification={"user_endpoint_config": {"WORKERS": 2}}))
        assert [f.result(timeout=60) for f in futures] == [i + 1 for i in range(20)] + [i * 2 for i in range(20)] + [10]
        labels = {f.task_record["executor"] for f in futures}
        assert labels == {"small", "large"}
        assert (a.user_endpoint_config, b.user_endpoint_config) == ({"WORKERS": 1}, {"WORKERS": 8})  # never swapped


@needs_mpi
def test_on_a_thread_endpoint(stack: LocalStack, tmp_path: Path) -> None:
    """Tasks share one process there: MPI apps still get their own environment; working_dir (a
    process-wide current directory) is refused in words; no resource monitor."""
    with extra_endpoint(stack, "threads", "engine: {type: thread, workers: 2}\n") as thread_id:
        plain = tether_executor(stack, label="threads", endpoint_id=thread_id)
        moving = tether_executor(stack, label="moving", endpoint_id=thread_id, working_dir=str(tmp_path / "wd"))
        with loaded(tmp_path, plain, moving):
            assert not plain.monitor_resources()

            @bash_app(executors=["threads"])
            def ring_here(parsl_resource_specification={}, stdout=None) -> str:  # noqa: B006
                return f"$PARSL_MPI_PREFIX {PY} -c 'from mpi4py import MPI; print(MPI.COMM_WORLD.size)'"

            @python_app(executors=["moving"])
            def moved() -> str:
                return os.getcwd()

            out = tmp_path / "ring.out"
            ring_here(parsl_resource_specification={"num_ranks": 2}, stdout=str(out)).result(timeout=90)
            assert out.read_text().split() == ["2", "2"]
            with pytest.raises(RuntimeError, match="working_dir=.*needs an endpoint engine that runs each task"):
                moved().result(timeout=60)


# --- retries and cancel ----------------------------------------------------------------------
def test_retries_and_retry_handler(stack: LocalStack, tmp_path: Path) -> None:
    seen: list[tuple[str, int]] = []

    def handler(exc: Exception, record: dict) -> float:
        seen.append((type(exc).__name__, getattr(exc, "exitcode", 0)))
        return 0.5 if isinstance(exc, BashExitFailure) else 1.0

    with loaded(tmp_path, tether_executor(stack), retries=1, retry_handler=handler):
        assert fail_once(str(tmp_path / "marker")).result(timeout=60) == "second try"
        with pytest.raises(BashExitFailure):  # costs 0.5 per try: three tries fit in retries=1
            shell("exit 9").result(timeout=60)
    assert seen[0] == ("RuntimeError", 0)
    assert seen[1:] == [("BashExitFailure", 9)] * 3


def test_cancel_kills_a_running_app_and_does_not_retry_it(stack: LocalStack, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    ex = tether_executor(stack)
    with loaded(tmp_path, ex, retries=2):
        fut = shell(f"sleep 300 & echo $$ $! > {pids}; wait")
        wait_for(lambda: pids.exists() and len(pids.read_text().split()) == 2, 60, "the bash app to start")
        shell_pid, sleep_pid = map(int, pids.read_text().split())
        assert ex.cancel(fut)
        with pytest.raises(TaskCancelled):
            fut.result(timeout=30)
        wait_for(lambda: not pid_alive(shell_pid) and not pid_alive(sleep_pid), 30, "the app's processes to die")
        assert fut.task_record["try_id"] == 0  # not retried
        assert ex.cancel(fut) is False  # already done
        assert add(2, 2).result(timeout=60) == 4


def test_cancel_a_queued_app_on_an_offline_endpoint(stack: LocalStack, tmp_path: Path) -> None:
    offline = Client(stack.service_url, stack.token).register_endpoint("offline-queue")["endpoint_id"]
    ex = tether_executor(stack, endpoint_id=offline)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "offline: apps wait until it connects"
        with loaded(tmp_path, ex, retries=1):
            fut = add(1, 2)
            exec_fu = wait_for(lambda: fut.task_record.get("exec_fu"), 30, "the app to be launched")
            wait_for(lambda: exec_fu.state == "waiting-for-endpoint", 30, "the task to wait for its endpoint")
            assert ex.cancel(fut)
            with pytest.raises(TaskCancelled):
                fut.result(timeout=30)


# --- scale -----------------------------------------------------------------------------------
def test_a_thousand_small_apps(stack: LocalStack, tmp_path: Path) -> None:
    with loaded(tmp_path, tether_executor(stack)):
        started = time.monotonic()
        futures = [add(i, 1) for i in range(1500)]
        assert sum(f.result(timeout=120) for f in futures) == sum(range(1, 1501))
        assert time.monotonic() - started < 60


# --- versions and monitoring -----------------------------------------------------------------
def test_parsl_version_mismatch_is_reported_before_the_first_app(stack: LocalStack, tmp_path: Path) -> None:
    """An endpoint whose installed Parsl metadata says 2020.1.1 (a dist-info ahead on its PYTHONPATH)."""
    fake = tmp_path / "fake-site"
    (fake / "parsl-2020.1.1.dist-info").mkdir(parents=True)
    (fake / "parsl-2020.1.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: parsl\nVersion: 2020.1.1\n")
    with extra_endpoint(stack, "old-parsl", env={"PYTHONPATH": str(fake)}) as old_id:
        ex = tether_executor(stack, endpoint_id=old_id)
        with pytest.warns(RuntimeWarning, match=r"runs Parsl 2020\.1\.1 but this client runs Parsl \d"), \
                loaded(tmp_path, ex):
            pass
    assert any("2020.1.1" in p for p in ex.endpoint_problems)


def test_version_problems_in_words() -> None:
    me = {"python": "3.11", "parsl": "2025.1.1"}
    assert version_problems(me, {"python": "3.11", "parsl": "2025.1.1"}, "E") == []
    [py] = version_problems(me, {"python": "3.12", "parsl": "2025.1.1"}, "E")
    assert "runs Python 3.12 but this client runs Python 3.11" in py
    [missing] = version_problems(me, {"python": "3.11"}, "E")
    assert "has no Parsl installed" in missing and "pip install" in missing
    assert "could not be compared" in version_problems(me, {}, "E")[0]


def test_monitoring_reaches_the_database(stack: LocalStack, tmp_path: Path) -> None:
    from parsl.monitoring import MonitoringHub

    ex = tether_executor(stack)
    hub = MonitoringHub(resource_monitoring_interval=0.2)
    with loaded(tmp_path, ex, monitoring=hub):
        assert not ex.monitor_resources()  # the process engine's daemonic workers cannot fork a monitor
        assert [f.result(timeout=60) for f in [add(i, i) for i in range(3)]] == [0, 2, 4]
        assert shell("sleep 0.5").result(timeout=60) == 0
        with pytest.raises(BashExitFailure):
            shell("exit 4").result(timeout=60)
        last = add(1, 1)
        assert last.result(timeout=60) == 2
        tid = last.task_record["id"]
    db = sqlite3.connect(tmp_path / "runinfo" / "monitoring.db")
    states = {row[0] for row in db.execute("SELECT task_status_name FROM status")}
    assert {"launched", "exec_done", "failed"} <= states
    running = db.execute("SELECT COUNT(*) FROM try WHERE task_try_time_running IS NOT NULL").fetchone()[0]
    assert running == 6  # the endpoint-side wrapper's first message came back with each result
    assert db.execute("SELECT task_status_name FROM status WHERE task_id = ? ORDER BY timestamp DESC",
                      (tid,)).fetchone()[0] == "exec_done"


HTEX_ENDPOINT = """
engine:
  type: htex
  max_workers_per_node: 2
  heartbeat_period: 1
  provider: {type: LocalProvider, init_blocks: 1, min_blocks: 0, max_blocks: 1}
heartbeat_s: 0.5
"""


def test_on_an_htex_endpoint_with_resource_monitoring(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The endpoint hands apps to Parsl's own HighThroughputExecutor: Parsl's resource monitor runs
    around each app there, and its messages reach this DFK's monitoring database with the results.
    A bash app's relative stdout comes back here through Tether (staging="tether", the default)."""
    from parsl.monitoring import MonitoringHub

    monkeypatch.chdir(tmp_path)

    with engine_stack(tmp_path / "home", HTEX_ENDPOINT) as st:
        wait_for(lambda: Client(st.service_url, st.token).get_endpoint(st.endpoint_id)["status"]
                 .get("capacity", {}).get("engine") == "htex", 60, "the htex endpoint's first heartbeat")
        ex = tether_executor(st, working_dir=str(tmp_path / "wd"))
        with loaded(tmp_path, ex, monitoring=MonitoringHub(resource_monitoring_interval=0.2)):
            assert ex.monitor_resources()
            assert add(add(1, 2), 3).result(timeout=120) == 6
            assert shell("sleep 0.6; echo in-wd", stdout="wd.out").result(timeout=60) == 0
            with pytest.raises(ZeroDivisionError):
                divide(1, 0).result(timeout=60)
    assert (tmp_path / "wd.out").read_text() == "in-wd\n"
    assert list((tmp_path / "wd").iterdir()) == []  # the app's own directory on the endpoint went with it
    db = sqlite3.connect(tmp_path / "runinfo" / "monitoring.db")
    assert db.execute("SELECT COUNT(*) FROM try WHERE task_try_time_running IS NOT NULL").fetchone()[0] == 4
    resources = db.execute("SELECT COUNT(DISTINCT task_id), MAX(psutil_process_time_user) FROM resource").fetchone()
    assert resources[0] == 4 and resources[1] is not None


SLURM_ENDPOINT = """
engine:
  type: htex
  max_workers_per_node: 2
  heartbeat_period: 2
  provider:
    type: SlurmProvider
    partition: debug
    nodes_per_block: 1
    init_blocks: 1
    max_blocks: 1
    walltime: "00:10:00"
    exclusive: false
    launcher: {type: SrunLauncher}
heartbeat_s: 0.5
"""


@pytest.mark.timeout(240)
def test_apps_run_in_a_slurm_pilot_job(tmp_path: Path) -> None:
    """A Parsl script on this side; its apps in a Slurm job started by the endpoint's htex engine."""
    from slurm import require_slurm

    require_slurm()

    @python_app
    def slurm_job() -> str | None:
        return os.environ.get("SLURM_JOB_ID")

    with engine_stack(tmp_path / "home", SLURM_ENDPOINT) as st, loaded(tmp_path, tether_executor(st), retries=1):
        assert slurm_job().result(timeout=200)  # ran inside the pilot job
        out = tmp_path / "hello.out"
        assert shell("echo $SLURM_JOB_ID", stdout=str(out)).result(timeout=60) == 0
        assert out.read_text().strip().isdigit()
        with pytest.raises(BashExitFailure):
            shell("exit 2").result(timeout=60)
        assert sum(f.result(timeout=120) for f in [add(i, 1) for i in range(200)]) == sum(range(1, 201))


# --- data that stays on the endpoint (issue 20) ------------------------------------------------

@python_app(executors=["tether"])
def big_block(n: int, seed: int) -> bytes:
    import random

    return random.Random(seed).randbytes(n)


@python_app(executors=["tether"])
def flipped(data: bytes) -> bytes:
    return bytes(255 - b for b in data[:1024]) + data[1024:]


@python_app(executors=["tether"])
def checksum(data: bytes, salt: bytes) -> str:
    import hashlib

    return hashlib.sha256(data + salt).hexdigest()


def test_a_chain_of_apps_keeps_its_data_on_the_endpoint(stack: LocalStack, tmp_path: Path) -> None:
    """Large results stay on the endpoint: the DataFlowKernel passes a lazy proxy to the next
    app, which the executor sends as a reference; the user's .result() still behaves as the value."""
    import hashlib
    import random

    from tether.parsl import KeptProxy, resolve

    blobs = stack.home / "service" / "blobs"
    before = sorted(blobs.iterdir()) if blobs.exists() else []
    ex = tether_executor(stack)
    size = 12 * 1024 * 1024  # over the blob threshold
    with loaded(tmp_path, ex):
        first = big_block(size, 7)
        second = flipped(first)
        digest = checksum(second, b"!").result(timeout=120)
        after = sorted(blobs.iterdir()) if blobs.exists() else []
        assert after == before, "no intermediate result crossed the service"
        expected = random.Random(7).randbytes(size)
        expected = bytes(255 - b for b in expected[:1024]) + expected[1024:]
        assert digest == hashlib.sha256(expected + b"!").hexdigest()
        value = second.result(timeout=60)
        assert type(value) is KeptProxy  # a proxy of the value, fetched when used
        assert len(value) == size and value[:1024] == expected[:1024]
        assert resolve(value) == expected and type(resolve(value)) is bytes
