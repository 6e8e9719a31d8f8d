"""A small Parsl workflow on a Tether endpoint: a python_app chain, a bash_app writing its output
files, and an MPI bash_app, all through ``tether.parsl.TetherExecutor``.

Run by ``examples/main_job.py`` on its local stack; on your own endpoint::

    import parsl
    from parsl.config import Config
    from tether.parsl import TetherExecutor

    with parsl.load(Config(executors=[TetherExecutor(endpoint_id=EP, label="hpc")])):
        ...  # the apps below
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from typing import Any

import parsl
from parsl import bash_app, python_app
from parsl.config import Config

from tether.parsl import TetherExecutor


@python_app(executors=["tether"])
def add(a: int, b: int) -> int:
    return a + b


@python_app(executors=["tether"])
def where() -> str:
    import os
    import socket

    return f"pid {os.getpid()} on {socket.gethostname()}, Tether task {os.environ.get('TETHER_TASK_ID')}"


@bash_app(executors=["tether"])
def greet(name: str, stdout: Any = parsl.AUTO_LOGNAME, stderr: Any = parsl.AUTO_LOGNAME) -> str:
    return f"echo hello {name} from $(hostname)"


@bash_app(executors=["tether"])
def ranks(python: str, parsl_resource_specification: dict | None = None, stdout: Any = None) -> str:
    # $PARSL_MPI_PREFIX is set by the endpoint for this task's ranks, as Parsl's MPI apps expect
    return f"$PARSL_MPI_PREFIX {python} -c 'from mpi4py import MPI; c = MPI.COMM_WORLD; print(c.rank, c.size)'"


def run(stack: Any) -> None:
    """Run the workflow on ``stack`` (a :func:`tether.local.local_stack`) and print what it did."""
    with tempfile.TemporaryDirectory(prefix="tether-parsl-") as tmp:
        executor = TetherExecutor(endpoint_id=stack.endpoint_id, label="tether", service=stack.service_url,
                                  token=stack.token)
        config = Config(executors=[executor], retries=1, run_dir=os.path.join(tmp, "runinfo"), usage_tracking=0)
        with parsl.load(config):
            t0 = time.perf_counter()
            total = add(1, add(2, add(3, 4)))  # Parsl resolves the dependencies; each add runs remotely
            print(f"parsl add chain      = {total.result()}")
            print(f"parsl python_app ran = {where().result()}")
            hello = greet("parsl")
            hello.result()
            with open(hello.stdout) as fh:
                print(f"parsl bash_app       = {fh.read().strip()!r} (stdout file {os.path.basename(hello.stdout)})")
            try:
                out = os.path.join(tmp, "ranks.out")
                ranks(sys.executable, parsl_resource_specification={"num_ranks": 2}, stdout=out).result()
                with open(out) as fh:
                    lines = sorted(fh.read().split("\n"))
                print(f"parsl MPI bash_app   = {len([x for x in lines if x])} ranks: {[x for x in lines if x]}")
            except Exception as exc:  # noqa: BLE001 - a machine without an MPI launcher: say so, go on
                print(f"parsl MPI bash_app   = skipped ({type(exc).__name__}: {str(exc).splitlines()[0]})")
            print(f"parsl workflow done in {time.perf_counter() - t0:.2f}s")
        parsl.clear()
