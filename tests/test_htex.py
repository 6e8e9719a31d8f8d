"""The ``htex`` engine (Parsl's HighThroughputExecutor) with LocalProvider, through the real stack:
functions, exceptions, RUNNING, cancel (queued and running), a worker killed mid-task (failed in
words, or retried), capacity in ``tether endpoint status``, a clean stop; config validation."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import psutil
import pytest
import yaml

from tether import Executor, TaskCancelled, TaskFailed
from tether.local import LocalStack

import helpers
from conftest import pid_alive, wait_for
from parsl_stack import endpoint_status, engine_stack, service_capacity

pytest.importorskip("parsl", reason="the htex engine needs Parsl: pip install -e '.[test]'")

# functions below run on the endpoint's Parsl workers, which cannot import this module
cloudpickle.register_pickle_by_value(sys.modules[__name__])

ROOT = Path(__file__).resolve().parents[1]

#: Parsl notices a dead worker within heartbeat_period (its default is 30 s) and a silent worker pool
#: after heartbeat_threshold (120 s)
#: the mpi engine on this host: one block, one worker that launches MPI tasks with mpiexec
MPI_LOCAL = """
engine:
  type: mpi
  mpi_launcher: mpiexec
  max_workers_per_block: 1
  heartbeat_period: 1
  provider: {type: LocalProvider, init_blocks: 1, max_blocks: 1, launcher: {type: SimpleLauncher}}
"""
HTEX_LOCAL = """
engine:
  type: htex
  max_workers_per_node: 2
  heartbeat_period: 1
  heartbeat_threshold: 5
  provider: {type: LocalProvider, init_blocks: 1, min_blocks: 0, max_blocks: 1}
heartbeat_s: 0.5
retries_on_worker_loss: %d
"""


def die_once(marker: str) -> str:
    """Kill our own worker the first time; succeed when run again."""
    if not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        os._exit(9)
    return "second try"


def die_with_pool_once(marker: str, seconds: float) -> str:
    """Kill our worker pool (the manager: as if the node or the batch job were lost) the first time."""
    if not os.path.exists(marker):
        Path(marker).write_text("")
        os.kill(os.getppid(), 9)
        time.sleep(seconds)
    return "second try"


def worker_pid() -> int:
    return os.getpid()


@pytest.fixture(scope="module")
def htex(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with engine_stack(tmp_path_factory.mktemp("htex"), HTEX_LOCAL % 0) as stack:
        yield stack


@pytest.fixture
def ex(htex: LocalStack) -> Iterator[Executor]:
    executor = Executor(endpoint_id=htex.endpoint_id, service=htex.service_url, token=htex.token)
    yield executor
    executor.shutdown(wait=False, cancel_futures=True)  # a test that failed mid-way must not hang here


def test_functions_run_on_parsl_workers(ex: Executor, htex: LocalStack) -> None:
    assert ex.submit(pow, 2, 10).result(timeout=60) == 1024
    assert list(ex.map(helpers.add, range(20), range(20))) == [2 * i for i in range(20)]
    env = ex.submit(helpers.task_env).result(timeout=30)
    assert env["task_id"] and Path(env["cwd"]) == htex.endpoint_dir() / "tasks"  # python_sandbox is off
    pid = env["pid"]
    assert "process_worker_pool" in " ".join(psutil.Process(pid).parent().cmdline())
    # Parsl's run directory is the endpoint's
    assert (htex.endpoint_dir() / "parsl" / "submit_scripts").is_dir()


def test_exceptions_keep_type_message_and_traceback(ex: Executor) -> None:
    with pytest.raises(KeyError) as info:
        ex.submit(helpers.fail_with, KeyError("missing-key")).result(timeout=30)
    assert isinstance(info.value, TaskFailed) and "fail_with" in info.value.remote_traceback
    with pytest.raises(helpers.CustomError, match="only here"):
        ex.submit(helpers.raise_custom, "only here").result(timeout=30)
    with pytest.raises(TaskFailed) as info:
        ex.submit(sys.exit, 3).result(timeout=30)
    assert info.value.remote_type == "SystemExit"


def test_running_is_reported_when_the_worker_starts_it(ex: Executor) -> None:
    fut = ex.submit(helpers.sleep_then, 1.0, "done")
    wait_for(fut.running, timeout=30, what="the future to be RUNNING")
    assert fut.result(timeout=30) == "done"
    assert list(fut.transitions) == ["received", "waiting-for-endpoint", "dispatched", "running", "success"]


def test_capacity_is_in_endpoint_status(ex: Executor, htex: LocalStack) -> None:
    ex.submit(pow, 1, 1).result(timeout=60)  # the block is up
    cap = wait_for(
        lambda: (c := service_capacity(htex)).get("managers") == 1 and c,
        timeout=30,
        what="a heartbeat that reports the block's manager",
    )
    assert cap["engine"] == "htex" and cap["provider"] == "LocalProvider"
    assert cap["workers_total"] == 2 and cap["blocks"] == 1 and cap["max_blocks"] == 1
    local = endpoint_status(htex)["local"]["capacity"]
    assert local["workers_total"] == 2
    fut = ex.submit(helpers.sleep_then, 3, "x")
    wait_for(fut.running, timeout=30, what="the task to run")
    wait_for(
        lambda: service_capacity(htex).get("tasks_running") == 1,
        timeout=30,
        what="a heartbeat with one task running",
    )
    assert fut.result(timeout=30) == "x"


def test_cancel_running_task_kills_its_worker_and_children(ex: Executor, tmp_path: Path) -> None:
    marker = tmp_path / "started"
    fut = ex.submit(helpers.touch_then_sleep, str(marker), 120)
    wait_for(marker.exists, timeout=30, what="the task to start")
    pid, child = map(int, marker.read_text().split())
    wait_for(fut.running, timeout=30, what="RUNNING")
    assert fut.cancel()
    with pytest.raises(TaskCancelled):
        fut.result(timeout=5)
    wait_for(
        lambda: not pid_alive(pid) and not pid_alive(child),
        timeout=20,
        what="the worker and the task's child to be killed",
    )
    # Parsl restarts the worker; the endpoint keeps serving
    assert ex.submit(helpers.square, 7).result(timeout=60) == 49


def test_cancel_queued_task_never_runs(ex: Executor, tmp_path: Path) -> None:
    # both workers busy, long enough to outlast a worker that is still restarting after the
    # previous test (under load the second blocker can start seconds after the first)
    blockers = [ex.submit(helpers.sleep_then, 6) for _ in range(2)]
    for b in blockers:
        wait_for(b.running, timeout=30, what="the blockers to run")
    assert not any(b.done() for b in blockers), "a blocker ended before the other started: the test proves nothing"
    marker = tmp_path / "must-not-exist"
    queued = ex.submit(helpers.touch, str(marker))
    time.sleep(0.2)  # let it reach Parsl's interchange: the case HTEX itself cannot withdraw
    assert queued.cancel()
    with pytest.raises(TaskCancelled):
        queued.result(timeout=5)
    for b in blockers:
        b.result(timeout=30)
    assert ex.submit(helpers.square, 2).result(timeout=30) == 4  # the workers got past it
    assert not marker.exists()


def test_worker_killed_mid_task_fails_it_in_words(ex: Executor) -> None:
    fut = ex.submit(helpers.die_hard)
    with pytest.raises(TaskFailed, match=r"Parsl worker running this task .* died") as info:
        fut.result(timeout=60)
    assert info.value.remote_type.endswith("WorkerLost")
    assert ex.submit(helpers.square, 5).result(timeout=60) == 25  # the pool replaced the worker


@pytest.mark.slow
def test_worker_lost_mid_task_is_retried_when_configured(tmp_path: Path) -> None:
    with engine_stack(tmp_path / "home", HTEX_LOCAL % 1) as stack:
        with Executor(endpoint_id=stack.endpoint_id, service=stack.service_url, token=stack.token) as ex:
            marker = tmp_path / "died-once"
            assert ex.submit(die_once, str(marker)).result(timeout=90) == "second try"
            assert marker.exists()
            # retried once only: a task that always kills its worker fails, saying how often it was tried
            with pytest.raises(TaskFailed, match=r"died.*tried 2 times"):
                ex.submit(helpers.die_hard).result(timeout=90)
            # a whole block lost mid-task (its worker pool killed): the task runs again on a new block,
            # and the engine goes on (Parsl's own handler would fail every later task)
            pool = psutil.Process(ex.submit(worker_pid).result(timeout=60)).parent()
            fut = ex.submit(die_with_pool_once, str(tmp_path / "pool-died"), 30)
            # well before the first attempt's orphaned worker ends its 30 s: attempts never wait for each other
            assert fut.result(timeout=25) == "second try"
            assert not pool.is_running() or pool.status() == psutil.STATUS_ZOMBIE
            assert ex.submit(helpers.square, 6).result(timeout=60) == 36
        run_dir = stack.endpoint_dir() / "parsl"
        pools = [
            p
            for p in psutil.process_iter(["cmdline"])
            if "process_worker_pool" in " ".join(p.info["cmdline"] or [])
            and str(run_dir) in " ".join(p.info["cmdline"])
        ]
        assert pools, "the block's worker pool should be running"
        stack.stop_endpoint()
        wait_for(
            lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in pools),
            timeout=30,
            what="the endpoint's stop to end its Parsl block",
        )


# --- configuration ---------------------------------------------------------------------------------


def test_misspelt_provider_is_reported_with_file_key_and_hint(tmp_path: Path) -> None:
    env = {**os.environ, "TETHER_HOME": str(tmp_path)}
    d = tmp_path / "endpoints" / "typo"
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(
        "engine:\n  type: htex\n  provider: {type: SlurmProvder, partiton: debug}\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "tether.cli", "endpoint", "start", "typo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    squash = lambda t: "".join(t.split())  # noqa: E731 - the CLI wraps long lines anywhere, even in a path
    text = squash(out.stderr)
    assert (
        squash(f"{d / 'config.yaml'}: engine.provider.type: 'SlurmProvder' is not a Parsl provider") in text
    )
    assert squash("(did you mean 'SlurmProvider'?)") in text


@pytest.mark.parametrize(
    "engine, message",
    [
        (
            {"type": "htex", "provider": {"type": "SlurmProvider", "partiton": "debug"}},
            r"engine\.provider\.partiton: unknown keyword for SlurmProvider \(did you mean 'partition'\?\)",
        ),
        (
            {"type": "htex", "provider": {"type": "SlurmProvider", "launcher": {"type": "SrunLaunchr"}}},
            r"engine\.provider\.launcher\.type: 'SrunLaunchr' is not a Parsl launcher "
            r"\(did you mean 'SrunLauncher'",
        ),
        (
            {"type": "htex", "max_worker_per_node": 2},
            r"engine\.max_worker_per_node: unknown key for the htex engine "
            r"\(did you mean 'max_workers_per_node'\?\)",
        ),
        (
            {"type": "htex", "provider": {"type": "SlurmProvider", "nodes_per_block": "two"}},
            r"engine\.provider: SlurmProvider\(nodes_per_block='two'\) is not valid",
        ),
        (
            {"type": "htex", "cores_per_worker": "fast"},
            r"engine\.cores_per_worker: 'fast' has the wrong type",
        ),
        (
            {"type": "htex", "strategy": "simpel"},
            r"engine\.strategy: 'simpel' is not one of .*did you mean 'simple'",
        ),
        (
            {"type": "mpi", "mpi_launcher": "mpiexe"},
            r"engine\.mpi_launcher: 'mpiexe' is not one of srun, aprun, mpiexec",
        ),
        (
            {"type": "mpi", "provider": {"type": "SlurmProvider", "launcher": {"type": "SrunLauncher"}}},
            r"engine\.provider\.launcher: the mpi engine needs launcher: \{type: SimpleLauncher\}",
        ),
        ({"type": "thread", "max_workers_per_node": 2}, r"unknown key 'max_workers_per_node'"),
    ],
)
def test_bad_parsl_engine_config_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: dict, message: str
) -> None:
    from tether.endpoint.config import load_config
    from tether.errors import ConfigError

    monkeypatch.setenv("TETHER_HOME", str(tmp_path))
    d = tmp_path / "endpoints" / "e"
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({"engine": engine}))
    with pytest.raises(ConfigError, match=message) as info:
        load_config("e")
    assert str(d / "config.yaml") in str(info.value)


def _doc_examples() -> list[tuple[str, str]]:
    path = ROOT / "docs" / "endpoint-admin.md"
    text = path.read_text() if path.exists() else ""  # its absence fails the test below, not collection
    blocks = re.findall(r"<!-- example: ([\w-]+) -->\s*```yaml\n(.*?)```", text, flags=re.S)
    return blocks


def test_admin_guide_has_the_promised_examples() -> None:
    names = {name for name, _ in _doc_examples()}
    assert {"one-host", "slurm", "pbs", "mpi-slurm", "mpi-local"} <= names, names


@pytest.mark.parametrize("name, text", _doc_examples(), ids=[n for n, _ in _doc_examples()])
def test_admin_guide_examples_pass_validation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, text: str
) -> None:
    from tether.endpoint.config import load_config

    monkeypatch.setenv("TETHER_HOME", str(tmp_path))
    d = tmp_path / "endpoints" / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(text)
    cfg = load_config(name)
    assert cfg.engine["type"] in ("thread", "process", "htex", "mpi")


def test_configure_writes_a_valid_htex_template(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tether.endpoint.config import load_config, write_default_config

    monkeypatch.setenv("TETHER_HOME", str(tmp_path))
    for kind in ("htex", "mpi"):
        write_default_config(f"t-{kind}", kind, 2)
        assert load_config(f"t-{kind}").engine["type"] == kind


# --- the mpi engine (Parsl's MPIExecutor) on one host --------------------------------------------


def _mpi_missing() -> str | None:
    from shutil import which

    exe = which("mpiexec") or (Path(sys.executable).parent / "mpiexec").exists()
    if not exe:
        return "mpiexec not found (pip install -e '.[test]' installs the mpich wheel)"
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (pip install -e '.[test]')"
    try:
        from tether import MPIFunction  # noqa: F401
    except ImportError:
        return "tether.MPIFunction is not available"
    return None


@pytest.mark.skipif(_mpi_missing() is not None and not os.environ.get("CI"), reason=_mpi_missing() or "")
@pytest.mark.timeout(180)
def test_mpi_engine_runs_mpi_functions_with_parsls_prefix(tmp_path: Path) -> None:
    from tether import MPIFunction

    config = MPI_LOCAL
    bindir = str(Path(sys.executable).parent)
    rank = MPIFunction(
        f"{sys.executable} -c 'from mpi4py import MPI; c = MPI.COMM_WORLD; print(c.rank, c.size)'",
        env={"PYTHONUNBUFFERED": "", "PATH": bindir + os.pathsep + os.environ.get("PATH", "")},
        walltime=90,
    )
    with engine_stack(tmp_path / "home", config) as stack:
        with Executor(endpoint_id=stack.endpoint_id, service=stack.service_url, token=stack.token) as ex:
            assert ex.submit(pow, 3, 2).result(timeout=90) == 9  # plain Python on the mpi engine
            ex.resource_specification = {"num_nodes": 1, "num_ranks": 2}
            r = ex.submit(rank).result(timeout=90)
            assert r.returncode == 0, r.stderr
            assert sorted(r.stdout.split("\n")[:-1]) == ["0 2", "1 2"]
            env = ex.submit(lambda: {k: v for k, v in os.environ.items() if k.startswith("PARSL_")}).result(
                timeout=60
            )
            assert env["PARSL_NUM_RANKS"] == "2" and env["PARSL_MPI_PREFIX"].startswith("mpiexec -n 2")
            # more nodes than a block has: a message at once (Parsl itself would keep it queued forever)
            ex.resource_specification = {"num_nodes": 2, "num_ranks": 2}
            with pytest.raises(Exception, match=r"num_nodes=2 is more than a block .* \(nodes_per_block=1\)"):
                ex.submit(rank).result(timeout=30)


def test_interchange_death_fails_tasks_in_words_not_a_hang(tmp_path: Path) -> None:
    with engine_stack(tmp_path / "home", HTEX_LOCAL % 0) as stack:
        with Executor(endpoint_id=stack.endpoint_id, service=stack.service_url, token=stack.token) as ex:
            assert ex.submit(helpers.square, 3).result(timeout=60) == 9
            daemon = psutil.Process(stack.endpoint_pid())
            # (the engine host's child, see engines/parsl/host.py)
            (interchange,) = [p for p in daemon.children(recursive=True)
                              if "HTEX interchange" in " ".join(p.cmdline())]
            running = ex.submit(helpers.sleep_then, 30)
            wait_for(running.running, timeout=30, what="the task to run")
            interchange.kill()
            with pytest.raises(TaskFailed, match=r"interchange process .* exited"):
                running.result(timeout=30)
            with pytest.raises(TaskFailed, match=r"Restart the endpoint"):
                ex.submit(helpers.square, 4).result(timeout=30)
            ex.shutdown(wait=False, cancel_futures=True)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_engine_host_death_fails_tasks_in_words_and_a_restart_recovers(tmp_path: Path) -> None:
    with engine_stack(tmp_path / "home", HTEX_LOCAL % 0) as stack:
        ex = Executor(endpoint_id=stack.endpoint_id, service=stack.service_url, token=stack.token)
        try:
            marker = tmp_path / "started"
            running = ex.submit(helpers.touch_then_sleep, str(marker), 120)
            wait_for(lambda: marker.exists() and marker.read_text(), timeout=30, what="the task to start")
            worker = int(marker.read_text().split()[0])
            host = psutil.Process(int((stack.endpoint_dir() / "engine-host.pid").read_text().split()[0]))
            parsl_procs = host.children(recursive=True)
            host.kill()  # the process that runs Parsl for the endpoint (engines/parsl/host.py)
            with pytest.raises(TaskFailed, match=r"engine host \(pid \d+\) that runs Parsl .* ended") as info:
                running.result(timeout=30)
            assert info.value.remote_type.endswith("WorkerLost")
            # what its Parsl started is ended too, the task's worker included
            wait_for(lambda: not any(pid_alive(p.pid) for p in parsl_procs), timeout=20,
                     what="the dead host's interchange and workers to be ended")
            assert not pid_alive(worker)
            with pytest.raises(TaskFailed, match=r"Restart the endpoint"):
                ex.submit(helpers.square, 4).result(timeout=30)
            subprocess.run([sys.executable, "-m", "tether.cli", "endpoint", "restart", stack.endpoint_name],
                           env=stack.env, check=True, capture_output=True, timeout=120)
            assert ex.submit(helpers.square, 5).result(timeout=60) == 25
        finally:
            ex.shutdown(wait=False, cancel_futures=True)
