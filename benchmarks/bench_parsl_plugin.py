"""Parsl through TetherExecutor versus Parsl's own executors: the same no-op apps, in one run.

Usage::

    python benchmarks/bench_parsl_plugin.py [--n 2000] [--latency-n 200] [--only local,slurm] [--json PATH]

``local`` (2 workers each): Parsl's ThreadPoolExecutor (the ceiling: no process boundary at all),
Parsl's HighThroughputExecutor with LocalProvider (what a Parsl user runs on one host), and
TetherExecutor on a local Tether stack (service + process-engine endpoint as processes).

``slurm`` (a one-node Slurm, partition ``debug``; ``.ci/slurm-setup.sh`` starts one): Parsl's
HighThroughputExecutor with SlurmProvider, versus TetherExecutor on a Tether endpoint whose engine
is htex + SlurmProvider. Both start one pilot job (``init_blocks: 1``); the time from loading the
Config to the first result includes Slurm scheduling it.

Measured per system: throughput (all apps submitted at once, tasks/s from the first submit to the
last result) and sequential round-trip latency (p50). Printed as ratios versus the peers measured
in the same run; nothing passes or fails on time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from parsl_stack import engine_stack  # noqa: E402
from peers import _export_import_root, _parsl_launch_cmds, measure_latency, measure_throughput, noop  # noqa: E402

Submit = Callable[..., Any]

TETHER_SLURM_ENDPOINT = """
engine:
  type: htex
  max_workers_per_node: 2
  provider:
    type: SlurmProvider
    partition: debug
    nodes_per_block: 1
    init_blocks: 1
    min_blocks: 0
    max_blocks: 1
    walltime: "00:20:00"
    exclusive: false
    launcher: {type: SrunLauncher}
"""


@contextlib.contextmanager
def parsl_dfk(executor: Any) -> Iterator[Submit]:
    """Load a Config with one executor; yield ``submit(fn, *args) -> AppFuture``."""
    import parsl
    from parsl.config import Config

    with tempfile.TemporaryDirectory(prefix="bench-parsl-plugin-", ignore_cleanup_errors=True) as tmp:
        dfk = parsl.load(Config(executors=[executor], run_dir=os.path.join(tmp, "runinfo"), strategy="none",
                                usage_tracking=0))
        try:
            app = parsl.python_app(noop, data_flow_kernel=dfk, executors=[executor.label])

            def submit(fn: Callable[..., Any], *args: Any) -> Any:
                return app(*args)

            yield submit
        finally:
            dfk.cleanup()
            parsl.clear()


@contextlib.contextmanager
def threadpool(workers: int) -> Iterator[Submit]:
    from parsl.executors import ThreadPoolExecutor

    with parsl_dfk(ThreadPoolExecutor(label="threads", max_threads=workers)) as submit:
        yield submit


def _htex(provider: Any, workers: int, logdir: str) -> Any:
    from parsl.executors import HighThroughputExecutor

    launch_cmd, interchange_cmd = _parsl_launch_cmds()
    return HighThroughputExecutor(label="htex", address="127.0.0.1", max_workers_per_node=workers,
                                  launch_cmd=launch_cmd, interchange_launch_cmd=interchange_cmd,
                                  worker_logdir_root=logdir, provider=provider)


@contextlib.contextmanager
def htex_local(workers: int) -> Iterator[Submit]:
    from parsl.providers import LocalProvider

    with tempfile.TemporaryDirectory(prefix="bench-htex-", ignore_cleanup_errors=True) as tmp:
        with parsl_dfk(_htex(LocalProvider(init_blocks=1, min_blocks=0, max_blocks=1), workers, tmp)) as submit:
            yield submit


@contextlib.contextmanager
def htex_slurm(workers: int) -> Iterator[Submit]:
    from parsl.launchers import SrunLauncher
    from parsl.providers import SlurmProvider

    provider = SlurmProvider(partition="debug", nodes_per_block=1, init_blocks=1, min_blocks=0, max_blocks=1,
                             walltime="00:20:00", exclusive=False, launcher=SrunLauncher())
    with tempfile.TemporaryDirectory(prefix="bench-htex-slurm-", dir=os.getcwd(), ignore_cleanup_errors=True) as tmp:
        with parsl_dfk(_htex(provider, workers, tmp)) as submit:
            yield submit


def _tether_executor(stack: Any) -> Any:
    from tether.parsl import TetherExecutor

    return TetherExecutor(endpoint_id=stack.endpoint_id, label="tether", service=stack.service_url,
                          token=stack.token)


@contextlib.contextmanager
def tether_local(workers: int) -> Iterator[Submit]:
    from tether.local import local_stack

    with local_stack(engine="process", workers=workers) as stack:
        with parsl_dfk(_tether_executor(stack)) as submit:
            yield submit


@contextlib.contextmanager
def tether_slurm(workers: int) -> Iterator[Submit]:
    with tempfile.TemporaryDirectory(prefix="bench-tether-slurm-", dir=os.getcwd(), ignore_cleanup_errors=True) as tmp:
        with engine_stack(Path(tmp) / "home", TETHER_SLURM_ENDPOINT.replace("max_workers_per_node: 2",
                                                                            f"max_workers_per_node: {workers}")) as st:
            with parsl_dfk(_tether_executor(st)) as submit:
                yield submit


def measure(name: str, system: Callable[[int], contextlib.AbstractContextManager[Submit]], args: Any) -> dict:
    t0 = time.perf_counter()
    with system(args.workers) as submit:
        submit(noop, 0).result(timeout=600)
        first = time.perf_counter() - t0
        lat = measure_latency(submit, n=args.latency_n, warmup=30)
        thr = measure_throughput(submit, n=args.n, warmup=200)
    row = {"first_result_s": first, "p50_ms": lat["p50_ms"], "p99_ms": lat["p99_ms"],
           "tasks_per_s": thr["tasks_per_s"]}
    print(f"  {name:<22} first result {first:6.2f} s   p50 {lat['p50_ms']:7.2f} ms   "
          f"throughput {thr['tasks_per_s']:8.0f} apps/s", flush=True)
    return row


def ratios(rows: dict[str, dict], ours: str, peers: list[str]) -> None:
    for peer in peers:
        if ours in rows and peer in rows:
            a, b = rows[ours], rows[peer]
            print(f"  {ours} / {peer}: throughput {a['tasks_per_s'] / b['tasks_per_s']:.2f}x, "
                  f"p50 latency {a['p50_ms'] / b['p50_ms']:.2f}x", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="apps in the throughput batch")
    ap.add_argument("--latency-n", type=int, default=200, help="sequential round trips")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--only", default="local,slurm")
    ap.add_argument("--json")
    args = ap.parse_args()
    _export_import_root()  # workers import noop by reference (module ``peers``)
    rows: dict[str, dict] = {}
    if "local" in args.only:
        print(f"one host, {args.workers} workers, {args.n} no-op apps:", flush=True)
        for name, system in (("parsl_threadpool", threadpool), ("parsl_htex_local", htex_local),
                             ("tether_local", tether_local)):
            rows[name] = measure(name, system, args)
        ratios(rows, "tether_local", ["parsl_threadpool", "parsl_htex_local"])
    if "slurm" in args.only:
        if shutil.which("sbatch") is None:
            print("slurm: skipped (no sbatch; run .ci/slurm-setup.sh as root to start a one-node Slurm)")
        else:
            print(f"Slurm (one node, partition debug), {args.workers} workers per pilot job:", flush=True)
            for name, system in (("parsl_htex_slurm", htex_slurm), ("tether_htex_slurm", tether_slurm)):
                rows[name] = measure(name, system, args)
            ratios(rows, "tether_htex_slurm", ["parsl_htex_slurm"])
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
