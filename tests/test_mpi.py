"""MPIFunction with the mpich + mpi4py wheels from PyPI, through a real service and endpoint
(process engine, one host): rank counts, Parsl's environment variables, resource specification
validation at submit, and a request the host cannot satisfy failing in words."""

from __future__ import annotations

import os
import sys

import pytest

from tether import Executor, InvalidResourceSpecification, MPIFunction, ShellFunction, TaskFailed
from tether.mpi import MPILauncherNotFound, compose_prefixes, find_launcher, mpi_environment
from tether.resources import check_mpi_specification, mpi_layout, validate_resource_specification

from conftest import MPI_MISSING, needs_mpi

RANK = MPIFunction(
    f"{sys.executable} -c 'from mpi4py import MPI; c = MPI.COMM_WORLD; print(c.rank, c.size)'", walltime=60,
)


@needs_mpi
@pytest.mark.parametrize("ranks", [2, 4])
def test_mpi_ranks(executor: Executor, ranks: int) -> None:
    executor.resource_specification = {"num_ranks": ranks}
    r = executor.submit(RANK).result(timeout=90)
    assert r.returncode == 0, r.stderr
    lines = sorted(r.stdout.splitlines())
    assert lines == [f"{i} {ranks}" for i in range(ranks)], r.stdout
    assert r.cmd.startswith("$PARSL_MPI_PREFIX ")


@needs_mpi
def test_mpi_issue_example(executor: Executor) -> None:
    executor.resource_specification = {"num_nodes": 1, "ranks_per_node": 4}
    cmd = f"{sys.executable} -c 'from mpi4py import MPI; print(MPI.COMM_WORLD.rank)'"
    # exactly as a user writes it, on an endpoint whose environment sets PYTHONUNBUFFERED (conftest
    # makes sure): MPIFunction drops it, so each rank's line is written whole, not interleaved
    out = executor.submit(MPIFunction(cmd)).result(timeout=90)
    assert sorted(out.stdout.split()) == ["0", "1", "2", "3"]


@needs_mpi
def test_parsl_environment_reaches_the_command(executor: Executor) -> None:
    executor.resource_specification = {"num_ranks": 2, "launcher_options": "-l"}
    fn = MPIFunction("bash -c 'echo \"$PARSL_NUM_RANKS|$PARSL_RANKS_PER_NODE|$PARSL_NUM_NODES|"
                     "$PARSL_MPI_NODELIST|$PARSL_LAUNCHER_OPTIONS|$TETHER_MPI_PREFIX|$PARSL_MPI_PREFIX\"'")
    r = executor.submit(fn).result(timeout=90)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2  # one per rank; -l makes mpiexec label each line "[rank] "
    labels = sorted(line.split("]", 1)[0].strip("[ ") for line in lines)
    assert labels == ["0", "1"]
    fields = lines[0].split("] ", 1)[1].split("|")
    assert fields[:5] == ["2", "2", "1", "localhost", "-l"]
    assert fields[5] == fields[6] and "mpiexec" in fields[5]
    assert "-n 2 -ppn 2 -hosts localhost -l" in fields[5]


@needs_mpi
def test_template_and_walltime_apply_to_mpi(executor: Executor) -> None:
    executor.resource_specification = {"num_ranks": 2}
    r = executor.submit(MPIFunction("sleep {t}", walltime=1), t=100).result(timeout=60)
    assert r.returncode == 124


def test_bad_specifications_are_rejected_at_submit(executor: Executor) -> None:
    fn = MPIFunction("hostname")
    cases = [
        ({"num_rank": 4}, "did you mean 'num_ranks'"),
        ({"num_ranks": 0}, "'num_ranks'.*positive integer"),
        ({"num_ranks": -2}, "positive integer"),
        ({"ranks_per_node": 2.5}, "'ranks_per_node'"),
        ({"num_ranks": True}, "'num_ranks'"),
        ({"num_nodes": 1, "ranks_per_node": 2, "num_ranks": 5}, "does not fit"),
        ({"num_nodes": 3, "ranks_per_node": 2, "num_ranks": 4}, "leaves nodes empty"),
        ({"num_ranks": 2, "launcher_options": ["-l"]}, "launcher_options"),
        ({"num_nodes": 2}, "how many ranks"),
        ({}, "how many ranks"),
        (None, "how many ranks"),
        ("4 ranks", "must be a dict"),
    ]
    for spec, message in cases:
        executor.resource_specification = spec
        with pytest.raises(InvalidResourceSpecification, match=message):
            executor.submit(fn)
    # a plain function with a bad specification is refused too; a good one is accepted
    executor.resource_specification = {"cores": 4}
    with pytest.raises(InvalidResourceSpecification, match="unknown key 'cores'"):
        executor.submit(pow, 2, 3)
    executor.resource_specification = {"num_ranks": 2, "priority": 1}
    assert executor.submit(pow, 2, 3).result(timeout=30) == 8
    assert executor.submit(ShellFunction("echo ok")).result(timeout=30).stdout == "ok\n"


@needs_mpi
def test_more_nodes_than_the_host_has_fails_with_a_message(executor: Executor) -> None:
    executor.resource_specification = {"num_nodes": 2, "ranks_per_node": 2}
    with pytest.raises(TaskFailed) as info:
        executor.submit(RANK).result(timeout=60)
    assert isinstance(info.value, InvalidResourceSpecification)
    assert "num_nodes=2" in str(info.value) and "one" in str(info.value)


# --- units -----------------------------------------------------------------------------------
def test_layout_fills_in_parsl_keys() -> None:
    assert mpi_layout({"num_ranks": 4}).as_spec() == {"num_nodes": 1, "ranks_per_node": 4, "num_ranks": 4}
    assert mpi_layout({"num_nodes": 2, "ranks_per_node": 3}).num_ranks == 6
    assert mpi_layout({"num_nodes": 2, "num_ranks": 3}).ranks_per_node == 2
    assert validate_resource_specification({"num_ranks": "4"}) == {"num_ranks": 4}
    assert validate_resource_specification(None) == {}
    assert check_mpi_specification({"ranks_per_node": 2}).num_ranks == 2


def test_prefixes_match_parsls_composer() -> None:
    composer = pytest.importorskip("parsl.executors.high_throughput.mpi_prefix_composer")
    for launcher in ("mpiexec", "srun", "aprun"):
        for spec, hosts in [
            ({"num_nodes": 1, "ranks_per_node": 4, "num_ranks": 4}, ["localhost"]),
            ({"num_nodes": 2, "ranks_per_node": 2, "num_ranks": 3, "launcher_options": "--bind-to core"},
             ["n1", "n2"]),
        ]:
            expected = composer.compose_all(launcher, dict(spec), hosts)
            assert compose_prefixes(launcher, spec, hosts) == expected


def test_no_launcher_is_a_clear_error() -> None:
    with pytest.raises(MPILauncherNotFound, match="no MPI launcher found.*pip install mpich"):
        find_launcher("mpiexec-that-does-not-exist")
    with pytest.raises(InvalidResourceSpecification, match="mpi_launcher"):
        mpi_environment({"num_ranks": 2}, {"type": "process", "mpi_launcher": "mpirun-x"})


def test_local_engines_take_mpi_launcher_from_their_config(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tether.endpoint.config import validate
    from tether.endpoint.engines.process import ProcessEngine
    from tether.errors import ConfigError

    validate({"engine": {"type": "process", "mpi_launcher": "srun"}}, "config.yaml")
    with pytest.raises(ConfigError, match="engine.mpi_launcher.*did you mean 'srun'"):
        validate({"engine": {"type": "process", "mpi_launcher": "srn"}}, "config.yaml")
    info = ProcessEngine({"type": "process", "mpi_launcher": "srun"}, print, print).engine_info()
    assert info == {"type": "process", "mpi_launcher": "srun"}
    assert ProcessEngine({"type": "process"}, print, print).engine_info() == {"type": "process"}
    # srun from the config: a fake srun on PATH receives the prefix
    fake = tmp_path / "srun"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    env = mpi_environment({"num_ranks": 2}, info)
    assert env["PARSL_MPI_PREFIX"].startswith(f"{fake} --ntasks 2 --ntasks-per-node 2 --nodelist ")
    assert "localhost" not in env["PARSL_MPI_NODELIST"]


def test_parsl_engine_prefix_from_the_environment_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARSL_MPI_PREFIX", "mpiexec -n 8 -ppn 4 -hosts a,b")
    assert mpi_environment({"num_nodes": 2, "num_ranks": 8}, {"type": "mpi"}) == {
        "TETHER_MPI_PREFIX": "mpiexec -n 8 -ppn 4 -hosts a,b"}
    monkeypatch.delenv("PARSL_MPI_PREFIX")
    with pytest.raises(InvalidResourceSpecification, match="did not give this task an MPI launch prefix"):
        mpi_environment({"num_ranks": 2}, {"type": "mpi", "parsl_mpi_env": True})
    monkeypatch.setenv("PARSL_MPI_PREFIX", "stale")
    # the local engines never inherit a stale prefix: they compose their own
    if MPI_MISSING is None:
        env = mpi_environment({"num_ranks": 2}, {"type": "process"})
        assert "-n 2 -ppn 2 -hosts localhost" in env["PARSL_MPI_PREFIX"]
