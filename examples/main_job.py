"""The main job: an embedded service and a local endpoint start, a real workload runs through
tether.Executor, the results are printed, everything shuts down.

    python examples/main_job.py
"""

from __future__ import annotations

import math
import statistics
import time

from tether import Executor, ShellFunction, TaskFailed
from tether.local import local_stack

import parsl_workflow  # examples/parsl_workflow.py, next to this file


def monte_carlo_pi(samples: int, seed: int) -> float:
    """Defined in __main__: travels by value to the endpoint's worker processes."""
    import random

    rng = random.Random(seed)
    inside = sum(1 for _ in range(samples) if rng.random() ** 2 + rng.random() ** 2 <= 1.0)
    return 4.0 * inside / samples


def where_am_i() -> dict:
    import os
    import socket

    return {"host": socket.gethostname(), "pid": os.getpid(), "task": os.environ.get("TETHER_TASK_ID"),
            "cwd": os.getcwd()}


def fails(x: float) -> float:
    return math.log(x)  # ValueError for x <= 0


def main() -> None:
    print("starting an embedded Tether service and a local endpoint (process engine, 2 workers)...")
    with local_stack(engine="process", workers=2) as stack:
        print(f"  service  {stack.service_url}\n  endpoint {stack.endpoint_id}\n  state    {stack.home}")
        with Executor(endpoint_id=stack.endpoint_id, service=stack.service_url, token=stack.token) as ex:
            t0 = time.perf_counter()
            print("pow(2, 10)           =", ex.submit(pow, 2, 10).result())
            print("map(str.upper)       =", list(ex.map(str.upper, ["a", "b", "c"])))
            estimates = list(ex.map(monte_carlo_pi, [200_000] * 8, range(8)))
            print(f"pi (8 tasks)         = {statistics.mean(estimates):.4f} (± {statistics.stdev(estimates):.4f})")
            info = ex.submit(where_am_i).result()
            print(f"ran in               = pid {info['pid']} on {info['host']}, task {info['task']}")
            shell = ex.submit(ShellFunction("echo {greeting} from $(hostname)"), greeting="hello").result()
            print(f"shell command        = exit {shell.returncode}, stdout {shell.stdout.split()}")
            fut = ex.submit(fails, -1.0)
            try:
                fut.result()
            except ValueError as exc:  # the remote type is preserved ...
                assert isinstance(exc, TaskFailed)  # ... and it is a TaskFailed too, with the remote traceback
                print(f"log(-1) raised       = {exc.remote_type}: {exc.remote_message}")
            print(f"task {fut.task_id} went through: {', '.join(fut.transitions)}")
            n = 2000
            t1 = time.perf_counter()
            total = sum(f.result() for f in [ex.submit(abs, -i) for i in range(n)])
            dt = time.perf_counter() - t1
            print(f"{n} small tasks     = sum {total} in {dt:.2f}s ({n / dt:,.0f} tasks/s)")
            print(f"all done in {time.perf_counter() - t0:.2f}s")
        print("a Parsl workflow on the same endpoint (tether.parsl.TetherExecutor):")
        parsl_workflow.run(stack)
        import dask_workflow  # examples/dask_workflow.py: a Dask computation on the same endpoint
        dask_workflow.run(stack)
        import snakemake_workflow  # examples/snakemake_workflow.py: a workflow through --executor tether
        snakemake_workflow.run(stack)
        print("shutting down")
    print("service and endpoint stopped.")


if __name__ == "__main__":
    main()
