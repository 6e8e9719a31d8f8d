"""Round-trip latency of a ShellFunction and of a 4-rank MPIFunction through a real local stack.

Usage::

    python benchmarks/bench_shell_mpi.py [--n 10] [--ranks 4] [--workers 2]

Starts an embedded service and a process-engine endpoint (``tether.local.local_stack``), then
submits one task at a time and waits for its result: client -> service -> endpoint -> worker ->
command -> back. Also times the same commands run directly here (no Tether), for comparison.
Prints medians (and min/max) in milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from tether import Executor, MPIFunction, ShellFunction
from tether.local import local_stack
from tether.mpi import find_launcher


def _stats(samples: list[float]) -> str:
    ms = [s * 1000 for s in samples]
    return f"median {statistics.median(ms):7.1f} ms   min {min(ms):7.1f}   max {max(ms):7.1f}   (n={len(ms)})"


def _time(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    rank_cmd = f"{sys.executable} -c 'from mpi4py import MPI; print(MPI.COMM_WORLD.rank)'"
    mpiexec = find_launcher("mpiexec")
    direct_mpi = f"{mpiexec} -n {args.ranks} -ppn {args.ranks} -hosts localhost {rank_cmd}"

    print(f"direct echo hi (bash -c):          {_stats(_time(lambda: subprocess.run(['/bin/bash', '-c', 'echo hi'], capture_output=True), args.n))}")  # noqa: E501
    print(f"direct {args.ranks}-rank mpi4py (mpiexec): {_stats(_time(lambda: subprocess.run(direct_mpi, shell=True, capture_output=True), args.n))}")  # noqa: E501

    with local_stack(engine="process", workers=args.workers) as s:
        with Executor(endpoint_id=s.endpoint_id, service=s.service_url, token=s.token) as ex:
            echo = ShellFunction("echo hi")
            for _ in range(2 * args.workers):  # warm every worker (first task loads the function)
                assert ex.submit(echo).result(timeout=60).stdout == "hi\n"
            shell = _time(lambda: ex.submit(echo).result(timeout=60), args.n)
            print(f"ShellFunction('echo hi') round trip:  {_stats(shell)}")

            ex.resource_specification = {"num_ranks": args.ranks}
            mpi = MPIFunction(rank_cmd, env={"PYTHONUNBUFFERED": ""})
            for _ in range(2 * args.workers):
                r = ex.submit(mpi).result(timeout=120)
                assert sorted(r.stdout.split()) == [str(i) for i in range(args.ranks)], (r.stdout, r.stderr)
            mpi_t = _time(lambda: ex.submit(mpi).result(timeout=120), args.n)
            print(f"MPIFunction {args.ranks} ranks round trip:   {_stats(mpi_t)}")

            ex.resource_specification = None
            noop = _time(lambda: ex.submit(int).result(timeout=60), args.n)
            print(f"plain function int() round trip:     {_stats(noop)}")


if __name__ == "__main__":
    main()
