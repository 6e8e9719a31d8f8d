"""The event loop's share of a round trip: Tether on uvloop against Tether on asyncio's loop, in one run.

Usage::

    python benchmarks/bench_event_loop.py [--n 3000]

Two local stacks (service, endpoint with 2 process workers, client) run side by side, one started
with ``TETHER_EVENT_LOOP=asyncio``, and sequential no-op round trips alternate between them, so a
noisy moment on a shared machine hits both. A bare ``ProcessPoolExecutor`` with 2 workers runs
beside them as the local floor. Prints each system's p50/p99 and the ratios of the p50s.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # noqa: E402  (needs the sys.path line above when run as a script)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=3000, help="timed round trips per system")
    args = p.parse_args(argv)

    from tether import Executor, event_loop
    from tether.local import local_stack

    if event_loop.name() != "uvloop":
        print("uvloop is not installed (pip install 'tether[service,endpoint]'): nothing to compare")
        return 1
    peers._export_import_root()
    with ExitStack() as stack:
        submit = {"process_pool": stack.enter_context(peers.process_pool(2))}
        for loop in ("asyncio", "uvloop"):
            os.environ[event_loop.ENV] = loop  # read by the client's connection and the stack's processes
            st = stack.enter_context(local_stack(engine="process", workers=2))
            ex = stack.enter_context(Executor(endpoint_id=st.endpoint_id, service=st.service_url, token=st.token))
            submit[f"tether_{loop}"] = ex.submit
        os.environ.pop(event_loop.ENV)
        for fn in submit.values():  # workers started, functions known, imports done
            for i in range(200):
                fn(peers.noop, i).result(timeout=peers.TASK_TIMEOUT_S)
        samples: dict[str, list[float]] = {name: [] for name in submit}
        for i in range(args.n):
            for name, fn in submit.items():
                t0 = time.perf_counter()
                fn(peers.noop, i).result(timeout=peers.TASK_TIMEOUT_S)
                samples[name].append((time.perf_counter() - t0) * 1000.0)
    p50 = {}
    print(f"sequential no-op round trips, alternating, n={args.n} each ({os.cpu_count()} CPUs)")
    for name, values in samples.items():
        values.sort()
        p50[name] = peers._percentile(values, 50)
        print(f"  {name:16} p50 {p50[name]:.2f} ms  p99 {peers._percentile(values, 99):.2f} ms")
    print(f"p50 uvloop / asyncio {p50['tether_uvloop'] / p50['tether_asyncio']:.2f}x; "
          f"p50 / process pool: asyncio {p50['tether_asyncio'] / p50['process_pool']:.1f}x, "
          f"uvloop {p50['tether_uvloop'] / p50['process_pool']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
