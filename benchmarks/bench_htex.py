"""Round-trip latency through the Parsl engines, end to end (client → service → endpoint → client).

Usage::

    python benchmarks/bench_htex.py [--n 200] [--warmup 30] [--first 3] [--only local,slurm] [--json PATH]

- ``local``: htex + LocalProvider (one block of 2 workers, up before measuring);
- ``slurm``: htex + SlurmProvider (partition ``debug``), ``init_blocks: 0``: the time from the first
  submit to its result (Slurm schedules the pilot job, the worker pool starts, the task runs) is
  measured ``--first`` times on fresh endpoints, then the no-op latency once the block is up.

No-ops are sequential (submit, wait), as in ``bench_noop.py``.

``--host-ab ROUNDS``: htex + LocalProvider with Parsl in the engine host (the default, which
outlives the daemon) and inside the daemon (``outlive_daemon: false``, as before 2026-12-07),
alternately, ROUNDS times each: the cost of the host's extra hop.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from tether import Executor  # noqa: E402

from parsl_stack import engine_stack  # noqa: E402

LOCAL = """
engine:
  type: htex
  max_workers_per_node: 2
  provider: {type: LocalProvider, init_blocks: 1, min_blocks: 0, max_blocks: 1}
"""
SLURM = """
engine:
  type: htex
  max_workers_per_node: 2
  provider:
    type: SlurmProvider
    partition: debug
    nodes_per_block: 1
    init_blocks: 0
    max_blocks: 1
    walltime: "00:10:00"
    exclusive: false
    launcher: {type: SrunLauncher}
"""


def noop(x: object = None) -> object:
    return x


@contextmanager
def executor(config: str):
    with tempfile.TemporaryDirectory(prefix="bench-htex-") as tmp:
        with engine_stack(Path(tmp) / "home", config) as st:
            with Executor(endpoint_id=st.endpoint_id, service=st.service_url, token=st.token) as ex:
                yield ex


def latency(ex: Executor, n: int, warmup: int) -> dict:
    for i in range(warmup):
        ex.submit(noop, i).result(timeout=120)
    samples = []
    for i in range(n):
        t = time.perf_counter()
        assert ex.submit(noop, i).result(timeout=60) == i
        samples.append((time.perf_counter() - t) * 1000)
    samples.sort()
    return {"n": n, "p50_ms": samples[n // 2], "p90_ms": samples[int(n * 0.9)], "min_ms": samples[0],
            "mean_ms": statistics.fmean(samples)}


def main() -> None:
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--first", type=int, default=3)
    ap.add_argument("--only", default="local,slurm")
    ap.add_argument("--json")
    ap.add_argument("--host-ab", type=int, default=0, metavar="ROUNDS")
    args = ap.parse_args()
    out: dict = {}
    if args.host_ab:
        runs: dict[str, list[float]] = {"engine_host": [], "in_daemon": []}
        for _ in range(args.host_ab):
            for name, extra in (("in_daemon", "  outlive_daemon: false\n"), ("engine_host", "")):
                config = LOCAL.replace("  type: htex\n", "  type: htex\n" + extra)
                with executor(config) as ex:
                    p50 = latency(ex, args.n, args.warmup)["p50_ms"]
                runs[name].append(round(p50, 2))
                print(name, "p50_ms", round(p50, 2), flush=True)
        out["host_ab_p50_ms"] = runs
        print(json.dumps(runs), flush=True)
    if "local" in args.only:
        with executor(LOCAL) as ex:
            out["htex_local"] = latency(ex, args.n, args.warmup)
        print("htex+LocalProvider", out["htex_local"], flush=True)
    if "slurm" in args.only:
        firsts = []
        for k in range(args.first):
            with executor(SLURM) as ex:
                t = time.perf_counter()
                ex.submit(noop, 0).result(timeout=300)
                firsts.append(time.perf_counter() - t)
                if k == args.first - 1:
                    out["htex_slurm"] = latency(ex, args.n, args.warmup)
        out["slurm_first_result_s"] = sorted(firsts)
        print("htex+SlurmProvider", out["htex_slurm"], flush=True)
        print("first result with init_blocks=0 (s):", [round(f, 2) for f in firsts], flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
