"""Scale: many endpoints on one service, and a deep queue for an offline endpoint.

    python benchmarks/bench_scale.py [--endpoints 100] [--tasks-per-endpoint 100] [--queued 10000]
                                     [--backlog 1000000 [--prefetch 1000] [--backlog-only]]

1. ``--endpoints`` real endpoint daemons (thread engine, one worker each; run together in one
   "farm" process to save memory, each with its own WebSocket, spool and credential) connect
   to one embedded service; the time until the service lists them all online is reported.
2. One client submits ``--tasks-per-endpoint`` tasks to every one of them at once and waits for
   every result: tasks/s through the fan-out, and a check that each result is right.
3. ``--queued`` tasks are submitted to an endpoint that is offline (they wait in the service),
   then that endpoint is started (process engine): the time for the queue to drain.
4. ``--backlog`` (off by default; e.g. 1,000,000): the same at scale, with flow control in
   play: the submission rate, the drain rate once the endpoint starts, the most tasks the
   endpoint held at once (never more than its workers + ``--prefetch``), and the peak RSS of
   service, endpoint and client sampled during the drain.

Figures depend on the machine; what matters is that nothing falls over or goes missing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FARM = r"""
import asyncio, json, sys
from tether.endpoint.config import load_config, write_default_config
from tether.endpoint.credential import read_credential
from tether.endpoint.daemon import EndpointDaemon
from tether.endpoint.manage import ensure_registered

async def main(names):
    daemons = [EndpointDaemon(load_config(n), read_credential(load_config(n).dir)) for n in names]
    await asyncio.gather(*(d.run() for d in daemons))

names = [f"farm-{i:03d}" for i in range(int(sys.argv[1]))]
for n in names:
    write_default_config(n, "thread", 1)
    ensure_registered(n)
print(json.dumps([read_credential(load_config(n).dir)["endpoint_id"] for n in names]), flush=True)
asyncio.run(main(names))
"""


def square(x: int) -> int:
    return x * x


def drain_backlog(stack, n: int, workers: int = 2) -> int:  # noqa: ANN001 - a LocalStack
    """Phase 4: queue ``n`` tasks for an offline endpoint, start it, report rates and peak RSS."""
    import json
    import threading

    import psutil

    from tether import Executor

    stack.configure_endpoint("process", workers, name="backlog")
    stack.start_endpoint("backlog")
    stack.stop_endpoint("backlog")
    endpoint_id = json.loads((stack.endpoint_dir("backlog") / "credential.json").read_text())["endpoint_id"]
    ex = Executor(endpoint_id=endpoint_id, service=stack.service_url, token=stack.token)
    t0 = time.perf_counter()
    futures = [ex.submit(square, i) for i in range(n)]
    while futures[-1].state != "waiting-for-endpoint":
        time.sleep(0.1)
    dt = time.perf_counter() - t0
    print(f"{n:,} tasks queued for an offline endpoint in {dt:.1f}s ({n / dt:,.0f}/s)", flush=True)
    peaks = {"service": 0, "endpoint": 0, "client": 0}
    done = threading.Event()

    def sample() -> None:
        procs = {"service": psutil.Process(stack.service_pid()), "client": psutil.Process()}
        while not done.is_set():
            pid = stack.endpoint_pid("backlog")
            if pid and "endpoint" not in procs:
                procs["endpoint"] = psutil.Process(pid)
            for name, proc in procs.items():
                try:
                    peaks[name] = max(peaks[name], proc.memory_info().rss)
                except psutil.Error:
                    pass
            time.sleep(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    stack.start_endpoint("backlog")
    wrong = 0
    for i, f in enumerate(futures):
        wrong += f.result(timeout=3600) != i * i
    dt = time.perf_counter() - t0
    done.set()
    sampler.join()
    stack.stop_endpoint("backlog")
    status = json.loads((stack.endpoint_dir("backlog") / "status.json").read_text())
    print(f"backlog drained: {dt:.1f}s ({n / dt:,.0f} tasks/s), {wrong} wrong; endpoint held at most "
          f"{status.get('peak_inflight')} tasks at once")
    print("peak RSS during the drain: " + ", ".join(f"{k} {v / 2**20:,.0f} MiB" for k, v in peaks.items()))
    ex.shutdown(wait=False)
    return wrong


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--endpoints", type=int, default=100)
    parser.add_argument("--tasks-per-endpoint", type=int, default=100)
    parser.add_argument("--queued", type=int, default=10_000)
    parser.add_argument("--backlog", type=int, default=0, help="phase 4: tasks queued for an offline endpoint")
    parser.add_argument("--prefetch", type=int, default=None, help="the service's prefetch (flow control)")
    parser.add_argument("--backlog-only", action="store_true", help="run phase 4 alone")
    args = parser.parse_args()

    import json

    from tether import Client, Executor
    from tether.local import LocalStack

    with tempfile.TemporaryDirectory(prefix="tether-scale-") as home:
        env = {**os.environ, "TETHER_HOME": home, "TETHER_LOG_LEVEL": "WARNING"}
        stack = LocalStack(home=Path(home), env=env)
        stack.start_service(*(("--prefetch", str(args.prefetch)) if args.prefetch is not None else ()))
        farm = None
        try:
            if args.backlog_only:
                return 0 if drain_backlog(stack, args.backlog) == 0 else 1
            client = Client(stack.service_url, stack.token)
            t0 = time.perf_counter()
            farm = subprocess.Popen([sys.executable, "-c", FARM, str(args.endpoints)], env=env,
                                    stdout=subprocess.PIPE, text=True)
            endpoint_ids = json.loads(farm.stdout.readline())
            while sum(e["online"] for e in client.list_endpoints()) < args.endpoints:
                if farm.poll() is not None:
                    raise SystemExit("the endpoint farm exited")
                time.sleep(0.1)
            print(f"{args.endpoints} endpoints registered and online in {time.perf_counter() - t0:.1f}s")

            n = args.endpoints * args.tasks_per_endpoint
            t0 = time.perf_counter()
            executors = [Executor(endpoint_id=e, service=stack.service_url, token=stack.token) for e in endpoint_ids]
            futures = [(i, ex.submit(square, i)) for i in range(args.tasks_per_endpoint) for ex in executors]
            wrong = sum(f.result(timeout=600) != i * i for i, f in futures)
            dt = time.perf_counter() - t0
            print(f"{n} tasks over {args.endpoints} endpoints: {dt:.1f}s ({n / dt:,.0f} tasks/s), {wrong} wrong")

            stack.configure_endpoint("process", 2, name="deep")
            stack.start_endpoint("deep")
            stack.stop_endpoint("deep")
            deep_id = json.loads((stack.endpoint_dir("deep") / "credential.json").read_text())["endpoint_id"]
            ex = Executor(endpoint_id=deep_id, service=stack.service_url, token=stack.token)
            t0 = time.perf_counter()
            queued = [ex.submit(square, i) for i in range(args.queued)]
            while sum(f.state == "waiting-for-endpoint" for f in queued) < args.queued:
                time.sleep(0.05)
            print(f"{args.queued} tasks queued for an offline endpoint in {time.perf_counter() - t0:.1f}s")
            t0 = time.perf_counter()
            stack.start_endpoint("deep")
            wrong = sum(f.result(timeout=900) != i * i for i, f in enumerate(queued))
            print(f"queue drained after the endpoint started: {time.perf_counter() - t0:.1f}s, {wrong} wrong")
            stack.stop_endpoint("deep")
            if args.backlog:
                wrong += drain_backlog(stack, args.backlog)
            return 0 if wrong == 0 else 1
        finally:
            from tether.connection import Connection

            Connection.close_all()
            if farm is not None:
                farm.kill()
            stack.stop_service()


if __name__ == "__main__":
    sys.exit(main())
