"""The MPI environment of one task: launcher prefix and the variables Parsl's MPI apps read.

Contract with the engines:

* an engine built on Parsl's MPIExecutor (``mpi``) has already put ``PARSL_MPI_PREFIX`` and
  friends in ``os.environ`` for the nodes it allocated to the task: they are used as they are;
* otherwise (the one-host ``thread``/``process`` engines, or ``htex`` without MPI mode) the
  prefix is composed here from the task's resource specification and the engine's facts
  (``TaskContext.engine``): ``mpi_launcher`` (``mpiexec``, the default, ``srun`` or ``aprun``;
  the thread/process engines take it from their config) and ``mpi_hosts`` (default
  ``["localhost"]`` for mpiexec, this host's name for srun/aprun).

The variables are those Parsl's worker sets (``process_worker_pool._init_mpi_env``):
``PARSL_NUM_NODES``, ``PARSL_RANKS_PER_NODE``, ``PARSL_NUM_RANKS``, ``PARSL_LAUNCHER_OPTIONS``,
``PARSL_MPI_NODELIST``, ``PARSL_{MPIEXEC,SRUN,APRUN}_PREFIX`` and ``PARSL_MPI_PREFIX``;
``TETHER_MPI_PREFIX`` repeats the last.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

from tether.errors import InvalidResourceSpecification, TetherError
from tether.resources import MPILayout, check_mpi_specification

LAUNCHERS = ("mpiexec", "srun", "aprun")
#: engines that run tasks on this one host and never set PARSL_MPI_PREFIX themselves
LOCAL_ENGINES = ("thread", "process")


class MPILauncherNotFound(TetherError):
    """The endpoint has no MPI launcher to start ranks with."""


def find_launcher(name: str = "mpiexec") -> str:
    """The launcher's path: next to the endpoint's Python first (the ``mpich`` wheel installs
    ``mpiexec`` in the environment's ``bin``, which need not be on PATH), then on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found:
        return found
    raise MPILauncherNotFound(
        f"no MPI launcher found: {name!r} is neither next to the endpoint's Python ({beside.parent}) nor on "
        f"its PATH. Install one into the endpoint's environment ('pip install mpich'), load your site's MPI "
        f"module before starting the endpoint, or set the engine's mpi_launcher"
    )


def _compose(launcher: str, spec: dict[str, Any], hosts: list[str]) -> dict[str, str]:
    """Parsl's prefixes (``compose_all``). Parsl's own composer is used when Parsl is already
    loaded in this process (the Parsl engines); on the local engines the same composition is
    done here, so an MPI task does not pay a second of ``import parsl`` (tests check the two agree)."""
    if "parsl" in sys.modules:
        try:
            from parsl.executors.high_throughput.mpi_prefix_composer import compose_all

            return dict(compose_all(launcher, dict(spec), hosts))
        except ImportError:
            pass
    return compose_prefixes(launcher, spec, hosts)


def compose_prefixes(launcher: str, spec: dict[str, Any], hosts: list[str]) -> dict[str, str]:
    """The prefixes Parsl's ``mpi_prefix_composer.compose_all`` makes, for the same inputs."""
    nodes = ",".join(hosts)
    opts = spec.get("launcher_options", "")
    ranks, per_node = spec.get("num_ranks"), spec.get("ranks_per_node")
    def join(*args: Any) -> str:
        return " ".join(str(a) for a in args)

    table = {
        "PARSL_APRUN_PREFIX": join("aprun", "-n", ranks, "-N", per_node, "-node-list", nodes, opts),
        "PARSL_SRUN_PREFIX": join("srun", "--ntasks", ranks, "--ntasks-per-node", per_node,
                                  "--nodelist", nodes, "--nodes", len(hosts), opts),
        "PARSL_MPIEXEC_PREFIX": join("mpiexec", "-n", ranks, "-ppn", per_node, "-hosts", nodes, opts),
    }
    if launcher not in LAUNCHERS:
        raise RuntimeError(f"Unknown mpi_launcher:{launcher}")
    table["PARSL_MPI_PREFIX"] = table[f"PARSL_{launcher.upper()}_PREFIX"]
    return table


def mpi_environment(spec: dict[str, Any] | None, engine: dict[str, Any] | None = None) -> dict[str, str]:
    """Environment variables for one MPI task (to add to the command's environment).

    Raises :class:`InvalidResourceSpecification` for a specification this engine cannot satisfy
    (more nodes than it has) and :class:`MPILauncherNotFound` when there is no launcher.
    """
    engine = engine or {}
    kind = engine.get("type")
    if kind not in LOCAL_ENGINES and os.environ.get("PARSL_MPI_PREFIX"):
        # Parsl's MPIExecutor placed this task on nodes of its block and said how to launch on them
        return {"TETHER_MPI_PREFIX": os.environ["PARSL_MPI_PREFIX"]}
    if engine.get("parsl_mpi_env"):
        raise InvalidResourceSpecification(
            f"the {kind} engine did not give this task an MPI launch prefix (PARSL_MPI_PREFIX is not set "
            f"in the worker); its resource_specification was {spec!r}. Ask for ranks with 'num_ranks' or "
            f"'ranks_per_node', and check that the engine runs Parsl's MPIExecutor"
        )
    layout: MPILayout = check_mpi_specification(spec)
    launcher = engine.get("mpi_launcher") or "mpiexec"
    # mpiexec (Hydra) knows "localhost" is here; srun and aprun want the node's name
    hosts = list(engine.get("mpi_hosts") or ["localhost" if launcher == "mpiexec" else socket.gethostname()])
    if layout.num_nodes > len(hosts):
        where = "this host only" if len(hosts) == 1 else f"{len(hosts)} hosts ({', '.join(hosts)})"
        raise InvalidResourceSpecification(
            f"resource_specification asks for num_nodes={layout.num_nodes}, but this endpoint's "
            f"{kind or 'engine'} engine runs tasks on {where}; multi-node MPI needs an endpoint with an "
            f"'mpi' engine (Parsl's MPIExecutor inside a batch job)"
        )
    if launcher not in LAUNCHERS:
        raise InvalidResourceSpecification(
            f"the engine's mpi_launcher {launcher!r} is not one of {', '.join(LAUNCHERS)}"
        )
    hosts = hosts[: layout.num_nodes]
    norm = layout.as_spec()
    env = {f"PARSL_{key.upper()}": str(value) for key, value in norm.items()}
    env["PARSL_MPI_NODELIST"] = ",".join(hosts)
    prefixes = _compose(launcher, norm, hosts)
    path = find_launcher(launcher)
    for key, prefix in prefixes.items():  # launch by absolute path: the venv's bin need not be on PATH
        word, _, rest = prefix.partition(" ")
        if word == launcher:
            prefixes[key] = f"{shlex.quote(path)} {rest}"
    env.update(prefixes)
    env["TETHER_MPI_PREFIX"] = env["PARSL_MPI_PREFIX"]
    return env


#: variables an MPI task's command runs without, as Parsl's MPIFunction does: unbuffered Python
#: ranks write a line in pieces that interleave with other ranks' ("0" "1" "\n" "\n"); buffered,
#: each rank's line is written whole
UNSET_FOR_MPI = ("PYTHONUNBUFFERED",)


def task_mpi_environment() -> dict[str, str]:
    """:func:`mpi_environment` for the task running in this thread (its resource specification
    and its engine's facts); outside a task, the defaults of a one-host engine."""
    from .runtime import current_task

    task = current_task()
    return mpi_environment(task.spec if task else None, task.engine if task else None)
