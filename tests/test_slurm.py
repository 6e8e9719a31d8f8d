"""The ``htex`` engine with Parsl's SlurmProvider against a REAL Slurm: functions and a shell command
run through pilot jobs that Slurm schedules (init_blocks: 0, so the first task makes the block),
and Slurm's own tools (squeue while it runs, ``sacct -c`` after) saw the pilot job.

Outside CI these tests skip with a message saying what is missing; with ``CI`` set they must run
(``.ci/run`` calls ``.ci/slurm-setup.sh``, which installs and starts a one-node Slurm).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import pytest

from tether import Executor, TaskFailed
from tether.local import LocalStack

import helpers
from conftest import wait_for
from parsl_stack import engine_stack, service_capacity
from slurm import PARTITION, SLURM_HTEX, require_slurm, slurm_missing

# functions below run on the pilot job's workers, which cannot import this module
cloudpickle.register_pickle_by_value(sys.modules[__name__])

@pytest.fixture(scope="module")
def slurm_ready() -> None:
    require_slurm()


@pytest.fixture(scope="module")
def slurm_stack(slurm_ready: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with engine_stack(tmp_path_factory.mktemp("slurm"), SLURM_HTEX) as stack:
        yield stack


def slurm_job() -> dict:
    """Runs on the pilot job: what Slurm told the worker about its job."""
    return {k: os.environ.get(k) for k in ("SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_JOB_PARTITION")} | {
        "pid": os.getpid(),
        "task": os.environ.get("TETHER_TASK_ID"),
    }


def marked_sleep_in_pilot_job(marker: str, seconds: float) -> dict:
    """Say that this task began (in which process, in which pilot job), sleep, then what slurm_job says."""
    with open(marker, "a") as fh:
        fh.write(f"{os.getpid()} {os.environ.get('SLURM_JOB_ID')}\n")
    time.sleep(seconds)
    return slurm_job()


def parsl_env() -> dict:
    return {k: v for k, v in os.environ.items() if k.startswith("PARSL_")}


def squeue(job_id: str) -> list[str]:
    out = subprocess.run(
        ["squeue", "-h", "-j", job_id, "-o", "%j|%T|%P"], capture_output=True, text=True, timeout=30
    )
    return out.stdout.split() if out.returncode == 0 else []


def sacct_completed(job_id: str) -> list[str]:
    """Finished jobs as Slurm's job-completion log has them (no slurmdbd here, hence ``-c``)."""
    out = subprocess.run(
        ["sacct", "-c", "-P", "-n", "-o", "JobID,JobName,State,Partition"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    return [line for line in out.stdout.splitlines() if line.split("|")[0] == job_id]


@pytest.mark.timeout(300)
def test_functions_and_shell_run_in_slurm_pilot_jobs(slurm_stack: LocalStack) -> None:
    with Executor(
        endpoint_id=slurm_stack.endpoint_id, service=slurm_stack.service_url, token=slurm_stack.token
    ) as ex:
        t0 = time.monotonic()
        job = ex.submit(slurm_job).result(timeout=240)  # no block yet: this one makes Slurm start the pilot
        first = time.monotonic() - t0
        print(f"\ntime to first result with init_blocks=0 on Slurm: {first:.2f} s")
        assert job["SLURM_JOB_ID"], job
        assert job["SLURM_JOB_NAME"].startswith("parsl.tether-htex.block-"), job
        assert job["SLURM_JOB_PARTITION"] == PARTITION
        name, state, partition = squeue(job["SLURM_JOB_ID"])[0].split("|")
        assert (name, state, partition) == (job["SLURM_JOB_NAME"], "RUNNING", PARTITION)

        assert list(ex.map(helpers.square, range(10))) == [i * i for i in range(10)]
        with pytest.raises(helpers.CustomError, match="from slurm"):
            ex.submit(helpers.raise_custom, "from slurm").result(timeout=60)

        try:
            from tether import ShellFunction
        except ImportError:  # the shell functions land separately: a subprocess inside Python then
            ShellFunction = None
        if ShellFunction is not None:
            r = ex.submit(
                ShellFunction("echo job=$SLURM_JOB_ID x={x}; echo oops >&2; exit 3", walltime=60), x=42
            ).result(timeout=60)
            assert (r.returncode, r.stdout, r.stderr) == (3, f"job={job['SLURM_JOB_ID']} x=42\n", "oops\n")
        else:
            out = ex.submit(subprocess.check_output, ["bash", "-c", "echo job=$SLURM_JOB_ID"], text=True)
            assert out.result(timeout=60) == f"job={job['SLURM_JOB_ID']}\n"

        lat = []
        for i in range(20):
            t = time.perf_counter()
            assert ex.submit(helpers.identity, i).result(timeout=60) == i
            lat.append((time.perf_counter() - t) * 1000)
        lat.sort()
        print(
            f"no-op round trip through htex+SlurmProvider, block up: "
            f"p50 {lat[10]:.1f} ms, min {lat[0]:.1f} ms"
        )

        cap = wait_for(
            lambda: (c := service_capacity(slurm_stack)).get("managers") == 1 and c,
            timeout=30,
            what="a heartbeat that reports the pilot job's manager",
        )
        assert cap["provider"] == "SlurmProvider" and cap["blocks"] == 1 and cap["workers_total"] == 2

    # stopping the endpoint cancels the pilot job; Slurm's completion log has it
    slurm_stack.stop_endpoint()
    wait_for(
        lambda: not any("RUNNING" in line for line in squeue(job["SLURM_JOB_ID"])),
        timeout=60,
        what="the pilot job to end when the endpoint stops",
    )
    rows = wait_for(
        lambda: sacct_completed(job["SLURM_JOB_ID"]),
        timeout=60,
        what=f"sacct -c to list pilot job {job['SLURM_JOB_ID']}",
    )
    jobid, name, state, partition = rows[0].split("|")
    assert name == job["SLURM_JOB_NAME"] and partition == PARTITION
    assert state in ("CANCELLED", "COMPLETED"), rows


@pytest.mark.timeout(300)
def test_worker_lost_in_a_pilot_job_fails_the_task_in_words(slurm_ready: None, tmp_path: Path) -> None:
    with engine_stack(tmp_path / "home", SLURM_HTEX) as stack:
        with Executor(endpoint_id=stack.endpoint_id, service=stack.service_url, token=stack.token) as ex:
            assert ex.submit(helpers.square, 3).result(timeout=240) == 9
            with pytest.raises(TaskFailed, match=r"Parsl worker running this task .* died"):
                ex.submit(helpers.die_hard).result(timeout=60)
            assert ex.submit(helpers.square, 4).result(timeout=60) == 16


def test_skip_message_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # no Slurm tools here
    if shutil.which("sinfo"):
        pytest.skip("sinfo is in the venv's bin")
    assert slurm_missing() == (
        "sinfo not found: Slurm is not installed; .ci/slurm-setup.sh installs and starts a one-node Slurm"
    )


@pytest.mark.timeout(300)
def test_a_block_slurm_refuses_fails_tasks_in_words_not_a_hang(slurm_ready: None, tmp_path: Path) -> None:
    config = SLURM_HTEX.replace(f"partition: {PARTITION}", "partition: no-such-partition")
    with engine_stack(tmp_path / "home", config) as stack:
        with Executor(endpoint_id=stack.endpoint_id, service=stack.service_url, token=stack.token) as ex:
            refused = r"blocks failed before their worker pools connected"
            with pytest.raises(TaskFailed, match=refused) as info:
                ex.submit(helpers.square, 3).result(timeout=120)
            assert "partition" in str(info.value).lower()  # sbatch's own complaint reaches the user
            ex.shutdown(wait=False, cancel_futures=True)


SLURM_MPI = f"""
engine:
  type: mpi
  mpi_launcher: srun
  max_workers_per_block: 1
  heartbeat_period: 2
  provider:
    type: SlurmProvider
    partition: {PARTITION}
    nodes_per_block: 1
    init_blocks: 0
    max_blocks: 1
    walltime: "00:10:00"
    exclusive: false
    scheduler_options: "#SBATCH --ntasks-per-node=2"
    launcher: {{type: SimpleLauncher}}
"""


@pytest.mark.timeout(300)
def test_mpi_engine_runs_mpi_functions_with_srun_in_the_pilot_job(slurm_ready: None, tmp_path: Path) -> None:
    try:
        import mpi4py  # noqa: F401

        from tether import MPIFunction
    except ImportError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"{exc} (pip install -e '.[test]')")
    code = "from mpi4py import MPI; c = MPI.COMM_WORLD; print(c.rank, c.size)"
    rank = MPIFunction(f"{sys.executable} -c '{code}'", env={"PYTHONUNBUFFERED": ""}, walltime=120)
    with engine_stack(tmp_path / "home", SLURM_MPI) as stack:
        with Executor(endpoint_id=stack.endpoint_id, service=stack.service_url, token=stack.token) as ex:
            ex.resource_specification = {"num_nodes": 1, "num_ranks": 2}
            r = ex.submit(rank).result(timeout=240)
            assert r.returncode == 0, r.stderr
            assert sorted(r.stdout.split("\n")[:-1]) == ["0 2", "1 2"]
            job = ex.submit(slurm_job).result(timeout=60)
            assert job["SLURM_JOB_NAME"].startswith("parsl.tether-mpi.block-")
            env = ex.submit(parsl_env).result(timeout=60)  # what Parsl's MPI mode gives a task
            assert env["PARSL_MPI_PREFIX"].startswith("srun --ntasks 2 --ntasks-per-node 2 --nodelist "), env
            ex.shutdown(wait=False, cancel_futures=True)


@pytest.mark.timeout(300)
def test_a_restart_keeps_the_pilot_job_and_its_running_task(slurm_ready: None, tmp_path: Path) -> None:
    from conftest import tether_cli

    marker = tmp_path / "started"
    with engine_stack(tmp_path / "home", SLURM_HTEX) as stack:
        with Executor(endpoint_id=stack.endpoint_id, service=stack.service_url, token=stack.token) as ex:
            fut = ex.submit(marked_sleep_in_pilot_job, str(marker), 8)
            wait_for(lambda: marker.exists() and marker.read_text(), timeout=120,
                     what="the task to start in a pilot job")
            pid, job = marker.read_text().split()
            assert squeue(job), "the pilot job should be in squeue"
            tether_cli(stack.env, "endpoint", "restart", stack.endpoint_name)
            assert squeue(job), "the restart ended the pilot job"
            info = fut.result(timeout=60)
            # the task finished in the process (and the pilot job) that began it, and began once
            assert (info["SLURM_JOB_ID"], info["pid"]) == (job, int(pid))
            assert marker.read_text().splitlines() == [f"{pid} {job}"]
            # new work runs in the same pilot job, through the new daemon
            assert ex.submit(slurm_job).result(timeout=60)["SLURM_JOB_ID"] == job
