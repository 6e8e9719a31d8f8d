"""Dask through Tether versus the clusters a Dask user would otherwise pick, in one run.

Usage::

    python benchmarks/bench_dask_plugin.py [--n 2000] [--size 4000] [--chunk 500] [--workers 2]
                                           [--only tether_proxy,tether_workers,local,slurm,tether_workers_slurm]

Systems (each with ``--workers`` single-threaded workers):

- ``tether_proxy``: ``TetherCluster`` (proxy mode, the default) on a local service + process-engine
  endpoint: every task goes client → service → endpoint → client;
- ``tether_workers``: ``TetherCluster(mode="workers")``: real dask workers started as endpoint tasks;
- ``local``: Dask's ``LocalCluster`` (worker processes), the ceiling on one host;
- ``slurm``: dask-jobqueue's ``SLURMCluster`` on the one-node Slurm (skipped if Slurm is not there);
- ``tether_workers_slurm``: ``TetherCluster(mode="workers")`` on an ``htex`` + SlurmProvider endpoint.

Measured: throughput of one ``client.map`` of ``--n`` no-ops, p50 of sequential no-op round trips,
and the wall time of a dask.array reduction (``random((size, size), chunks).sum()``). The time until
the first worker is up is printed too (Slurm jobs start on their own schedule). Ratios are versus
``local`` and ``slurm`` measured in this run; nothing passes or fails on time.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))

import dask.array as da  # noqa: E402
from distributed import Client, LocalCluster  # noqa: E402

import peers  # noqa: E402  (noop, importable by dask workers once peers exports PYTHONPATH)

SLURM_HTEX = """
engine:
  type: htex
  max_workers_per_node: {workers}
  provider:
    type: SlurmProvider
    partition: debug
    nodes_per_block: 1
    init_blocks: 0
    max_blocks: 1
    walltime: "00:15:00"
    exclusive: false
    launcher: {{type: SrunLauncher}}
"""


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _slurm_usable() -> bool:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-p", "debug", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return False
    return out.returncode == 0 and any(s.rstrip("*~#") in ("idle", "mixed") for s in out.stdout.split())


@contextlib.contextmanager
def tether_proxy(workers: int) -> Iterator[Client]:
    from tether.dask import TetherCluster
    from tether.local import local_stack

    with local_stack(engine="process", workers=workers) as stack, \
            TetherCluster(endpoint_id=stack.endpoint_id, service=stack.service_url, token=stack.token,
                          **({"oversubscribe": OVERSUBSCRIBE} if OVERSUBSCRIBE else {})) as cluster, \
            Client(cluster) as client:
        yield client


@contextlib.contextmanager
def tether_workers(workers: int) -> Iterator[Client]:
    from tether.dask import TetherCluster
    from tether.local import local_stack

    # one endpoint slot per dask worker, one more for nothing else to wait on
    with local_stack(engine="process", workers=workers) as stack, \
            TetherCluster(endpoint_id=stack.endpoint_id, service=stack.service_url, token=stack.token,
                          mode="workers", n_workers=workers) as cluster, Client(cluster) as client:
        client.wait_for_workers(workers, timeout=120)
        yield client


@contextlib.contextmanager
def tether_workers_slurm(workers: int) -> Iterator[Client]:
    from tether.dask import TetherCluster

    from parsl_stack import engine_stack

    with tempfile.TemporaryDirectory(prefix="bench-dask-slurm-") as home, \
            engine_stack(Path(home), SLURM_HTEX.format(workers=workers)) as stack, \
            TetherCluster(endpoint_id=stack.endpoint_id, service=stack.service_url, token=stack.token,
                          mode="workers", n_workers=workers) as cluster, Client(cluster) as client:
        client.wait_for_workers(workers, timeout=300)
        yield client


@contextlib.contextmanager
def local(workers: int) -> Iterator[Client]:
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client.wait_for_workers(workers, timeout=60)
        yield client


@contextlib.contextmanager
def slurm(workers: int) -> Iterator[Client]:
    from dask_jobqueue import SLURMCluster

    with tempfile.TemporaryDirectory(prefix="bench-dask-jq-") as tmp, \
            SLURMCluster(queue="debug", cores=workers, processes=workers, memory="2GB", walltime="00:15:00",
                         local_directory=tmp, log_directory=tmp, scheduler_options={"dashboard_address": None},
                         job_extra_directives=["--oversubscribe"]) as cluster, Client(cluster) as client:
        cluster.scale(workers)
        client.wait_for_workers(workers, timeout=300)
        yield client


SYSTEMS: dict[str, Callable[[int], contextlib.AbstractContextManager[Client]]] = {
    "tether_proxy": tether_proxy, "tether_workers": tether_workers, "local": local, "slurm": slurm,
    "tether_workers_slurm": tether_workers_slurm,
}
NEEDS_SLURM = ("slurm", "tether_workers_slurm")
#: proxy mode's tasks in flight per endpoint worker (``--oversubscribe``; the cluster's default otherwise)
OVERSUBSCRIBE: int | None = None


def measure(client: Client, n: int, size: int, chunk: int) -> dict[str, float]:
    client.gather(client.map(peers.noop, range(200), pure=False))  # warm up: imports, connections
    t0 = time.perf_counter()
    assert client.gather(client.map(peers.noop, range(n), pure=False)) == list(range(n))
    map_s = time.perf_counter() - t0
    lat = []
    for i in range(100):
        t = time.perf_counter()
        client.submit(peers.noop, i, pure=False).result(timeout=60)
        lat.append((time.perf_counter() - t) * 1000)
    x = da.random.random((size, size), chunks=chunk)
    x.sum().compute()  # warm-up (imports numpy on workers)
    t0 = time.perf_counter()
    x2 = da.random.random((size, size), chunks=chunk)
    total = float(x2.sum().compute())
    array_s = time.perf_counter() - t0
    assert 0.4 * size * size < total < 0.6 * size * size
    return {"map_tps": n / map_s, "p50_ms": statistics.median(lat), "array_s": array_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--size", type=int, default=4000)
    ap.add_argument("--chunk", type=int, default=500)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--only", default=",".join(SYSTEMS))
    ap.add_argument("--oversubscribe", type=int, default=None, help="proxy mode: tasks in flight per endpoint worker")
    args = ap.parse_args()
    global OVERSUBSCRIBE
    if args.oversubscribe:
        OVERSUBSCRIBE = args.oversubscribe
    peers._export_import_root()
    slurm_ok = _slurm_usable()
    results: dict[str, dict[str, float]] = {}
    for name in args.only.split(","):
        if name in NEEDS_SLURM and not slurm_ok:
            _log(f"{name}: skipped (no usable Slurm partition 'debug'; .ci/slurm-setup.sh starts one)")
            continue
        _log(f"{name}: starting...")
        t0 = time.perf_counter()
        try:
            with SYSTEMS[name](args.workers) as client:
                up = time.perf_counter() - t0
                results[name] = measure(client, args.n, args.size, args.chunk) | {"up_s": up}
        except Exception as exc:  # one system failing must not hide the others
            _log(f"{name}: FAILED: {type(exc).__name__}: {exc}")
            continue
        _log(f"{name}: {results[name]}")

    print(f"\nDask benchmark: {args.workers} workers, client.map of {args.n} no-ops, "
          f"random(({args.size}, {args.size}), chunks={args.chunk}).sum()")
    header = f"{'system':22} {'up s':>6} {'map tasks/s':>12} {'p50 ms':>8} {'array s':>8}"
    refs = [r for r in ("local", "slurm") if r in results]
    for ref in refs:
        header += f" {'tps/' + ref:>11} {'p50/' + ref:>11} {'arr/' + ref:>11}"
    print(header)
    for name, r in results.items():
        line = f"{name:22} {r['up_s']:6.1f} {r['map_tps']:12.0f} {r['p50_ms']:8.1f} {r['array_s']:8.2f}"
        for ref in refs:
            b = results[ref]
            line += (f" {r['map_tps'] / b['map_tps']:11.2f} {r['p50_ms'] / b['p50_ms']:11.2f}"
                     f" {r['array_s'] / b['array_s']:11.2f}")
        print(line)
    print("\n(tps/X > 1: more throughput than X; p50/X and arr/X > 1: slower than X)")


if __name__ == "__main__":
    main()
