"""Data stays where it is computed (issue 20): how many bytes cross the service and the user's
process when intermediate results stay on the endpoint, and the wall time against the peers a
user would otherwise pick, measured in the same run.

Usage::

    python benchmarks/bench_data_stays.py [--only dask,dataframe,parsl] [--mb 256] [--parsl-mb 100]

- ``dask``: a ``--mb`` random array (8 chunks) persisted, then reduced three ways (sum, mean,
  std), through ``TetherCluster`` (proxy mode, the default) and through Dask's ``LocalCluster``
  with the same number of single-threaded workers.
- ``dataframe``: CSV files written on the endpoint's disk (this host), read, grouped and
  aggregated on the endpoint, against ``LocalCluster``.
- ``parsl``: a chain of three ``python_app``s over ``--parsl-mb`` numpy arrays, through
  ``TetherExecutor`` and through Parsl's HighThroughputExecutor on a LocalProvider.

Bytes are what the processes' read and write system calls moved (``rchar + wchar`` in
``/proc/PID/io``: sockets, pipes and files alike), as a share of the data's size. Nothing passes
or fails on time: the machine is shared; compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cloudpickle  # noqa: E402

from peers import _export_import_root, _parsl_launch_cmds  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])
WORKERS = 2


def io_bytes(pid: int | str = "self") -> int:
    """Bytes the process moved through read and write system calls so far."""
    fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return int(fields["rchar"]) + int(fields["wchar"])


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


# --- Dask ------------------------------------------------------------------------------------------
def dask_workload(client: Any, mb: int) -> tuple[float, list[float]]:
    import dask
    import dask.array as da
    from distributed import wait

    rows = mb * 1024 * 1024 // 8 // 4096
    x = da.random.RandomState(0).random((rows, 4096), chunks=(max(1, rows // 8), 4096))

    def run() -> list[float]:
        y = x.persist()
        wait(y)
        out = dask.compute(y.sum(), y.mean(), y.std())
        del y
        return [float(v) for v in out]

    return timed(run)


def write_csvs(directory: Path, files: int = 8, rows: int = 200_000) -> str:
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    for i in range(files):
        pd.DataFrame({"k": rng.integers(0, 50, rows), "x": rng.random(rows), "y": rng.random(rows)}).to_csv(
            directory / f"part-{i}.csv", index=False)
    return str(directory / "part-*.csv")


def dataframe_workload(client: Any, pattern: str) -> tuple[float, Any]:
    import dask.dataframe as dd

    def run() -> Any:
        df = dd.read_csv(pattern)
        return df.groupby("k").agg({"x": "mean", "y": "sum"}).compute()

    return timed(run)


def bench_dask(mb: int, csv_pattern: str | None) -> None:
    from distributed import Client, LocalCluster

    from tether.dask import TetherCluster
    from tether.local import local_stack

    _export_import_root()
    data = mb * 1024 * 1024
    with local_stack(engine="process", workers=WORKERS) as stack:
        service = stack.service_pid()
        with TetherCluster(endpoint_id=stack.endpoint_id, service=stack.service_url, token=stack.token) as cluster, \
                Client(cluster) as client:
            dask_workload(client, 8)  # warm: imports on the endpoint's workers
            s0, u0 = io_bytes(service), io_bytes()
            t_tether, v_tether = dask_workload(client, mb)
            s1, u1 = io_bytes(service), io_bytes()
            print(f"dask  tether proxy: {t_tether:6.2f} s  service moved {(s1 - s0) / data:6.1%} of {mb} MB, "
                  f"this process {(u1 - u0) / data:6.1%}")
            if csv_pattern:
                dataframe_workload(client, csv_pattern)  # warm
                s0, u0 = io_bytes(service), io_bytes()
                t_df_tether, _ = dataframe_workload(client, csv_pattern)
                s1, u1 = io_bytes(service), io_bytes()
                print(f"frame tether proxy: {t_df_tether:6.2f} s  service moved {(s1 - s0) / 2**20:8.1f} MiB, "
                      f"this process {(u1 - u0) / 2**20:8.1f} MiB")
    with tempfile.TemporaryDirectory() as tmp, \
            LocalCluster(n_workers=WORKERS, threads_per_worker=1, processes=True, dashboard_address=None,
                         local_directory=tmp) as cluster, Client(cluster) as client:
        dask_workload(client, 8)
        t_local, v_local = dask_workload(client, mb)
        same = all(abs(a - b) < 1e-6 * max(1, abs(b)) for a, b in zip(v_tether, v_local, strict=True))
        print(f"dask  LocalCluster: {t_local:6.2f} s   -> tether / local = {t_tether / t_local:.2f}x "
              f"(same values: {same})")
        if csv_pattern:
            dataframe_workload(client, csv_pattern)
            t_df_local, _ = dataframe_workload(client, csv_pattern)
            print(f"frame LocalCluster: {t_df_local:6.2f} s   -> tether / local = {t_df_tether / t_df_local:.2f}x")


# --- Parsl -----------------------------------------------------------------------------------------
def make_array(mb: int, seed: int) -> Any:
    import numpy as np

    return np.random.default_rng(seed).random(mb * 1024 * 1024 // 8)


def scaled(a: Any) -> Any:
    return a * 2.0


def shifted(a: Any) -> Any:
    return a + 1.0


def total(a: Any) -> float:
    return float(a.sum())


def parsl_chain(dfk: Any, label: str, mb: int) -> tuple[float, float]:
    import parsl

    apps = [parsl.python_app(f, data_flow_kernel=dfk, executors=[label]) for f in (make_array, scaled, shifted, total)]
    make, f, g, reduce = apps
    return timed(lambda: reduce(g(f(make(mb, 1)))).result())


def bench_parsl(mb: int) -> None:
    import parsl
    from parsl.config import Config
    from parsl.executors import HighThroughputExecutor
    from parsl.providers import LocalProvider

    from tether.local import local_stack
    from tether.parsl import TetherExecutor

    _export_import_root()
    data = 3 * mb * 1024 * 1024  # three intermediate arrays
    with local_stack(engine="process", workers=WORKERS) as stack, tempfile.TemporaryDirectory() as tmp:
        ex = TetherExecutor(endpoint_id=stack.endpoint_id, label="tether", service=stack.service_url,
                            token=stack.token)
        dfk = parsl.load(Config(executors=[ex], run_dir=os.path.join(tmp, "runinfo"), usage_tracking=0))
        try:
            parsl_chain(dfk, "tether", 0)  # warm (imports); tiny, so no deferred database writes follow
            u0, s0 = io_bytes(), io_bytes(stack.service_pid())
            t_tether, v_tether = parsl_chain(dfk, "tether", mb)
            u1, s1 = io_bytes(), io_bytes(stack.service_pid())
        finally:
            dfk.cleanup()
            parsl.clear()
    print(f"parsl tether:       {t_tether:6.2f} s  this process moved {(u1 - u0) / data:6.1%} of the "
          f"{3 * mb} MB of intermediates, the service {(s1 - s0) / data:6.1%}")
    launch_cmd, interchange_cmd = _parsl_launch_cmds()
    with tempfile.TemporaryDirectory() as tmp:
        htex = HighThroughputExecutor(label="htex", address="127.0.0.1", max_workers_per_node=WORKERS,
                                      launch_cmd=launch_cmd, interchange_launch_cmd=interchange_cmd,
                                      worker_logdir_root=tmp, provider=LocalProvider(init_blocks=1, max_blocks=1))
        dfk = parsl.load(Config(executors=[htex], run_dir=os.path.join(tmp, "runinfo"), strategy="none",
                                usage_tracking=0))
        try:
            parsl_chain(dfk, "htex", 0)
            u0 = io_bytes()
            t_htex, v_htex = parsl_chain(dfk, "htex", mb)
            u1 = io_bytes()
        finally:
            dfk.cleanup()
            parsl.clear()
    print(f"parsl HTEX:         {t_htex:6.2f} s  this process moved {(u1 - u0) / data:6.1%}   "
          f"-> tether / HTEX = {t_tether / t_htex:.2f}x (same value: {abs(v_tether - v_htex) < 1e-6 * abs(v_htex)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="dask,dataframe,parsl")
    parser.add_argument("--mb", type=int, default=256)
    parser.add_argument("--parsl-mb", type=int, default=100)
    args = parser.parse_args()
    only = set(args.only.split(","))
    print(f"bench_data_stays {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    if only & {"dask", "dataframe"}:
        with tempfile.TemporaryDirectory(prefix="bench-csv-") as tmp:
            pattern = write_csvs(Path(tmp)) if "dataframe" in only else None
            bench_dask(args.mb, pattern)
    if "parsl" in only:
        bench_parsl(args.parsl_mb)


if __name__ == "__main__":
    main()
