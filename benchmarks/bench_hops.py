"""Where a sequential no-op's round trip goes, hop by hop, and what each process spends on it.

Usage::

    python benchmarks/bench_hops.py [--n 2000] [--workers 2]

One local stack (service, endpoint daemon, process engine); ``--n`` no-ops one after another.
Each task's transitions are stamped by the process that saw them, on one clock (this machine's):
the service stamps ``received`` as it takes the submission, the endpoint daemon ``dispatched``
as the task frame arrives, the worker ``running`` and ``success``. The client stamps the submit
and the moment ``result()`` returns. Printed: the median of each hop, the p50 round trip, and
the CPU microseconds per round trip of the client, the service, the endpoint daemon and the
workers (psutil, over the whole loop).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # noqa: E402  (needs the sys.path line above when run as a script)

HOPS = (("client -> service", "submit", "received"), ("service -> endpoint", "received", "dispatched"),
        ("endpoint -> worker", "dispatched", "running"), ("the call", "running", "success"),
        ("worker -> client", "success", "done"))


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)

    from tether import Executor
    from tether.local import local_stack

    peers._export_import_root()
    with local_stack(engine="process", workers=args.workers) as stack, \
            Executor(endpoint_id=stack.endpoint_id, service=stack.service_url, token=stack.token) as ex:
        for i in range(200):
            ex.submit(peers.noop, i).result(timeout=60)
        endpoint = psutil.Process(stack.endpoint_pid() or 0)
        procs = {"client": psutil.Process(), "service": psutil.Process(stack.service_pid()), "endpoint": endpoint}
        workers = endpoint.children(recursive=True)
        print(f"pids: client {procs['client'].pid} service {procs['service'].pid} endpoint {endpoint.pid} "
              f"workers {[w.pid for w in workers]}", flush=True)
        cpu0 = {k: _cpu(v) for k, v in procs.items()}
        wcpu0 = sum(_cpu(w) for w in workers)
        hops: dict[str, list[float]] = {name: [] for name, _, _ in HOPS}
        rtt: list[float] = []
        for i in range(args.n):
            t0 = time.time()
            fut = ex.submit(peers.noop, i)
            fut.result(timeout=60)
            stamps = {**fut.transitions, "submit": t0, "done": time.time()}
            rtt.append((stamps["done"] - t0) * 1e3)
            for name, a, b in HOPS:
                if a in stamps and b in stamps:
                    hops[name].append((stamps[b] - stamps[a]) * 1e3)
        cpu = {k: (_cpu(v) - cpu0[k]) / args.n * 1e6 for k, v in procs.items()}
        cpu["workers"] = (sum(_cpu(w) for w in workers) - wcpu0) / args.n * 1e6
    print(f"{args.n} sequential no-ops: p50 {statistics.median(rtt):.3f} ms, mean {statistics.fmean(rtt):.3f} ms")
    for name, values in hops.items():
        if values:
            print(f"  {name:22} {statistics.median(values):.3f} ms  ({len(values)} stamped)")
    print("  CPU per round trip: " + ", ".join(f"{k} {v:.0f} us" for k, v in cpu.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
