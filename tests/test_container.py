"""Workers in a container image (``engine.container``), with real podman: an image built here
(``FROM scratch`` and a marker file; the host's system, this Python and this checkout mounted
read-only through ``options``), and tasks that prove from the inside that they run in it: the
marker, ``TETHER_TASK_ID``, a shell command in its sandbox, MPI ranks, cancel; on the process
engine, the htex engine and through the Parsl plugin. Config mistakes are refused in words."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import psutil
import pytest

from tether import Executor, MPIFunction, ShellFunction, TaskCancelled
from tether.endpoint.engines.container_worker import ContainerExited
from tether.local import LocalStack

from conftest import MPI_MISSING, home_env, tether_cli, wait_for
from container_image import container_yaml, host_mounts, marker_image

cloudpickle.register_pickle_by_value(sys.modules[__name__])

MARKER = "tether container marker " + uuid.uuid4().hex[:8]
PODMAN_MISSING = None if shutil.which("podman") else (
    "podman is not installed (apt-get install podman runc; .ci/podman-setup.sh configures it)")
pytestmark = pytest.mark.skipif(PODMAN_MISSING is not None and not os.environ.get("CI"), reason=PODMAN_MISSING or "")


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    with marker_image(MARKER) as tag:
        # podman installed is not podman working: on some hosts it needs the setup of
        # .ci/podman-setup.sh (runc, cgroupfs, lower ulimits) before any container starts
        smoke = subprocess.run(["podman", "run", "--rm", *host_mounts(), tag, "/bin/true"], capture_output=True,
                               text=True, timeout=120)
        if smoke.returncode != 0 and not os.environ.get("CI"):
            pytest.skip(f"podman cannot start a container on this host ({smoke.stderr.strip()[-300:]}); "
                        ".ci/podman-setup.sh shows a setup that works")
        yield tag


def inside() -> dict:
    """Runs in the task: what only the image, the task's environment and its context hold."""
    from tether.runtime import current_task

    with open("/etc/tether-marker") as fh:  # container_image.MARKER_PATH
        marker = fh.read()
    return {"marker": marker, "task_id": os.environ.get("TETHER_TASK_ID"), "pid": os.getpid(),
            "sandbox": current_task().sandbox}


SHELL = ShellFunction('cat /etc/tether-marker; echo; echo "$TETHER_TASK_ID"; pwd; echo made > here.txt; cat here.txt',
                      walltime=60)


def check_task(ex: Executor) -> None:
    fut = ex.submit(inside)
    got = fut.result(timeout=120)
    assert got["marker"] == MARKER  # only the image has this file
    assert got["task_id"] == fut.task_id
    fut = ex.submit(SHELL)
    r = fut.result(timeout=120)
    assert r.returncode == 0, r.stderr
    marker, task_id, cwd, made = r.stdout.splitlines()
    assert (marker, task_id, made) == (MARKER, fut.task_id, "made")
    assert cwd.endswith(f"/tasks/{fut.task_id}")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Seen by the client and, mounted, by the tasks in the image: a shared filesystem's part."""
    return tmp_path_factory.mktemp("shared")


@pytest.fixture(scope="module")
def process_stack(image: str, workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    from parsl_stack import engine_stack

    with engine_stack(tmp_path_factory.mktemp("home"), container_yaml(image, shared=str(workdir))) as stack:
        yield stack


@pytest.fixture
def process_executor(process_stack: LocalStack) -> Iterator[Executor]:
    with Executor(endpoint_id=process_stack.endpoint_id, service=process_stack.service_url,
                  token=process_stack.token) as ex:
        yield ex


@pytest.mark.timeout(240)
def test_process_engine_runs_tasks_in_the_image(process_executor: Executor) -> None:
    check_task(process_executor)
    # the function's body reaches a worker once; later tasks of it run too
    futures = [process_executor.submit(inside) for _ in range(6)]
    assert [f.result(timeout=120)["marker"] for f in futures] == [MARKER] * 6
    # a result past the blob threshold comes back from inside the image; an argument goes in
    assert process_executor.submit(os.urandom, 9 << 20).result(timeout=120).__len__() == 9 << 20
    assert process_executor.submit(len, b"x" * (9 << 20)).result(timeout=120) == 9 << 20


def test_the_endpoints_status_says_its_workers_run_in_the_image(process_stack: LocalStack, image: str) -> None:
    listed = tether_cli(process_stack.env, "endpoint", "status", process_stack.endpoint_name, "--json")
    assert json.loads(listed.stdout)["container"] == {"type": "podman", "image": image}
    shown = tether_cli(process_stack.env, "endpoint", "status", process_stack.endpoint_name).stdout
    assert "container" in shown and "workers run in podman image" in " ".join(shown.split())


@pytest.mark.timeout(240)
@pytest.mark.skipif(MPI_MISSING is not None and not os.environ.get("CI"), reason=MPI_MISSING or "")
def test_mpi_ranks_run_in_the_image(process_executor: Executor) -> None:
    process_executor.resource_specification = {"num_ranks": 2}
    try:
        r = process_executor.submit(MPIFunction("cat /etc/tether-marker", walltime=60)).result(timeout=120)
    finally:
        process_executor.resource_specification = None
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(MARKER) == 2, r.stdout  # once per rank


def _sleeping(pattern: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if pattern in " ".join(proc.info["cmdline"] or []):
            found.append(proc)
    return found


def cancel_running(ex: Executor) -> None:
    """A command running in the image is killed by cancel."""
    seconds = 300 + int(uuid.uuid4().int % 1000)  # a command line no other test runs
    fut = ex.submit(ShellFunction(f"cat /etc/tether-marker && sleep {seconds}"))
    wait_for(lambda: _sleeping(f"sleep {seconds}"), timeout=120, what="the command to start in the container")
    fut.cancel()
    with pytest.raises(TaskCancelled):
        fut.result(timeout=30)
    wait_for(lambda: not _sleeping(f"sleep {seconds}"), timeout=30, what="the cancelled command to end")


@pytest.mark.timeout(240)
def test_cancel_kills_the_task_in_the_image(process_executor: Executor) -> None:
    cancel_running(process_executor)
    check_task(process_executor)  # the replacement worker is in the image too


@pytest.mark.timeout(300)
def test_htex_engine_runs_tasks_in_the_image(image: str, tmp_path: Path) -> None:
    from parsl_stack import engine_stack

    yaml = container_yaml(image, "type: htex\n  max_workers_per_node: 1\n  heartbeat_period: 1\n  provider: "
                                 "{type: LocalProvider, init_blocks: 1, min_blocks: 0, max_blocks: 1}")
    with engine_stack(tmp_path / "home", yaml) as stack, \
            Executor(endpoint_id=stack.endpoint_id, service=stack.service_url, token=stack.token) as ex:
        check_task(ex)
        cancel_running(ex)  # by the pid the worker reported: the image shares the host's pids
        check_task(ex)
        # a Parsl app through the plugin, to the same endpoint
        import parsl
        from parsl import python_app

        from parsl_stack import loaded, tether_executor

        @python_app(executors=["tether"])
        def read_marker() -> str:
            with open("/etc/tether-marker") as fh:
                return fh.read() + "|" + os.environ["TETHER_TASK_ID"]

        with loaded(tmp_path, tether_executor(stack)):
            marker, task_id = read_marker().result(timeout=120).split("|")
        assert marker == MARKER and task_id
        assert parsl is not None


@pytest.mark.timeout(240)
@pytest.mark.skipif(MPI_MISSING is not None and not os.environ.get("CI"), reason=MPI_MISSING or "")
def test_mpi_engine_ranks_run_in_the_image(image: str, tmp_path: Path) -> None:
    from parsl_stack import engine_stack

    yaml = container_yaml(image, "type: mpi\n  mpi_launcher: mpiexec\n  max_workers_per_block: 1\n  provider: "
                                 "{type: LocalProvider, max_blocks: 1, launcher: {type: SimpleLauncher}}")
    # Parsl's prefix names a bare mpiexec: the image's PATH must hold it (here: the venv's mpich wheel)
    ranks = MPIFunction("cat /etc/tether-marker", env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"},
                        walltime=60)
    with engine_stack(tmp_path / "home", yaml) as stack, \
            Executor(endpoint_id=stack.endpoint_id, service=stack.service_url, token=stack.token,
                     resource_specification={"num_nodes": 1, "num_ranks": 2}) as ex:
        r = ex.submit(ranks).result(timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(MARKER) == 2, r.stdout  # once per rank


@pytest.mark.timeout(240)
def test_an_image_that_cannot_start_fails_tasks_in_words(image: str, tmp_path: Path) -> None:
    from parsl_stack import engine_stack

    missing = "localhost/tether-no-such-image:1"
    yaml = container_yaml(missing, "type: process\n  workers: 1", extra=("--pull=never",))  # no registry here
    with engine_stack(tmp_path / "home", yaml) as stack, \
            Executor(endpoint_id=stack.endpoint_id, service=stack.service_url, token=stack.token) as ex:
        with pytest.raises(ContainerExited) as info:
            ex.submit(inside).result(timeout=120)
        assert "the worker's container ended" in str(info.value)
        assert missing in str(info.value)  # podman's own words name the image it could not find
        # the endpoint keeps serving: the next task is tried (and fails) the same way
        with pytest.raises(ContainerExited):
            ex.submit(inside).result(timeout=120)


BAD = {
    "type: podmn\n    image: x": "'podmn' is not a container runtime Tether knows; choose one of podman",
    "type: podman": "engine.container.image: missing",
    "type: apptainer\n    image: x.sif": "apptainer is not installed on this host",
    "type: custom\n    cmd: run-it": "needs cmd, a shell command with {command}",
    "type: podman\n    image: x\n    optons: []": "engine.container.optons: unknown key",
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("container", list(BAD))
def test_bad_container_config_is_refused_in_words(container: str, tmp_path: Path) -> None:
    if container.startswith("type: apptainer") and shutil.which("apptainer"):
        pytest.skip("apptainer is installed here")
    env = {**home_env(tmp_path), "COLUMNS": "1000"}  # messages unwrapped
    tether_cli(env, "endpoint", "configure", "box", "--engine", "process")
    config = tmp_path / "endpoints" / "box" / "config.yaml"
    config.write_text(f"engine:\n  type: process\n  container:\n    {container}\n")
    started = time.monotonic()
    out = tether_cli(env, "endpoint", "start", "box", "--detach", check=False)
    assert out.returncode != 0
    assert BAD[container] in out.stdout + out.stderr
    assert str(config) in out.stdout + out.stderr
    assert time.monotonic() - started < 60


@pytest.mark.timeout(240)
def test_dask_task_runs_in_the_image(process_stack: LocalStack) -> None:
    pytest.importorskip("distributed", reason="the Dask plugin needs pip install 'tether[dask]'")
    from distributed import Client

    from tether.dask import TetherCluster

    with TetherCluster(endpoint_id=process_stack.endpoint_id, service=process_stack.service_url,
                       token=process_stack.token) as cluster, Client(cluster) as client:
        got = client.submit(inside, pure=False).result(timeout=120)
    assert got["marker"] == MARKER and got["task_id"]


@pytest.mark.timeout(240)
def test_snakemake_rule_runs_in_the_image(process_stack: LocalStack, workdir: Path) -> None:
    pytest.importorskip("snakemake", reason="the Snakemake plugin needs pip install 'tether[snakemake]'")
    wf = workdir / "snakemake"
    wf.mkdir()
    (wf / "Snakefile").write_text(
        'rule marker:\n    output: "marker.txt"\n'
        '    shell: "(cat /etc/tether-marker; echo; echo task=$TETHER_TASK_ID) > {output}"\n')
    env = dict(process_stack.env, TETHER_SERVICE_URL=process_stack.service_url, TETHER_TOKEN=process_stack.token)
    out = subprocess.run([sys.executable, "-m", "snakemake", "--executor", "tether", "--tether-endpoint-id",
                          process_stack.endpoint_id, "--jobs", "1"], cwd=wf, env=env, capture_output=True,
                         text=True, timeout=200, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    marker, task = (wf / "marker.txt").read_text().splitlines()
    assert marker == MARKER and task.startswith("task=") and len(task) > len("task=")
