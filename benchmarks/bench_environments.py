"""Matching environments (issue 22): what the first task in a new environment costs, and a warm
task's round trip in a cached environment against the same task in the endpoint's own.

Usage::

    python benchmarks/bench_environments.py [--n 300] [--json PATH]

One local service and one endpoint (process engine, 1 worker; environments enabled, 1 worker per
environment, a cache directory of its own), in one run:

* **first task, cold**: an environment never built, with uv's package cache empty (every wheel
  downloaded from the index): the task's round trip, and the build time the endpoint recorded;
* **first task, warm uv cache**: another new environment, wheels already in uv's cache (what an
  endpoint that has built a few environments sees);
* **warm round trip**: ``--n`` no-op tasks one after the other in each, alternating task by task
  between the endpoint's own environment and the cached one (same client, same function, same worker
  count), p50 of each and their ratio (goal: <= 1.2x).

The environments use this Python's minor version, so one client can submit to both (a function
pickled here loads in either); a different minor version adds nothing to the routing measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

from tether import Executor
from tether.endpoint.environments import directory_size
from tether.environment import this_python
from tether.local import local_stack


def noop() -> None:
    return None


def _first_task(ex: Executor, environment: dict) -> float:
    started = time.perf_counter()
    ex.submit_task(noop, environment=environment).result(timeout=900)
    return time.perf_counter() - started


def _round_trip(ex: Executor, environment: dict | None) -> float:
    started = time.perf_counter()
    ex.submit_task(noop, environment=environment).result(timeout=60)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="round trips per system")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tether-bench-env-") as tmp:
        uv_cache = Path(tmp) / "uv-cache"
        with local_stack(Path(tmp) / "home", workers=1, env={"UV_CACHE_DIR": str(uv_cache)}) as stack:
            stack.configure_endpoint("process", 1, name="envs")
            config = stack.endpoint_dir("envs") / "config.yaml"
            config.write_text(config.read_text() + yaml.safe_dump(
                {"environments": {"enabled": True, "workers": 1, "cache_dir": str(Path(tmp) / "envs")}}))
            endpoint_id = stack.start_endpoint("envs")
            cold = {"python": this_python(), "requirements": ["packaging==23.2"]}
            warm = {"python": this_python(), "requirements": ["packaging==24.0"]}
            with Executor(endpoint_id=endpoint_id, service=stack.service_url, token=stack.token) as ex:
                first_cold = _first_task(ex, cold)
                first_warm = _first_task(ex, warm)
                for _ in range(20):  # both warmed up: functions loaded, connections made
                    _round_trip(ex, None), _round_trip(ex, warm)
                own: list[float] = []
                cached: list[float] = []
                for i in range(args.n):  # alternating task by task: the machine's swings hit both alike
                    first, second = (None, warm) if i % 2 else (warm, None)
                    a, b = _round_trip(ex, first), _round_trip(ex, second)
                    own.append(b if i % 2 == 0 else a)
                    cached.append(a if i % 2 == 0 else b)
            manifests = {json.loads(p.read_text())["requirements"][0]: json.loads(p.read_text())["build_s"]
                         for p in (Path(tmp) / "envs").glob("*/environment.json")}
            downloaded = directory_size(uv_cache)  # what the cold build fetched into uv's empty cache
            stack.stop_endpoint("envs")
    p50_own, p50_env = statistics.median(own), statistics.median(cached)
    figures = {
        "python": this_python(),
        "first_task_cold_s": round(first_cold, 2), "build_cold_s": manifests.get("packaging==23.2"),
        "first_task_warm_uv_cache_s": round(first_warm, 2), "build_warm_uv_cache_s": manifests.get("packaging==24.0"),
        "p50_own_ms": round(p50_own * 1e3, 2), "p50_cached_env_ms": round(p50_env * 1e3, 2),
        "ratio_cached_over_own": round(p50_env / p50_own, 2), "n": len(own),
        "uv_cache_bytes_after": downloaded,
    }
    print(f"first task in a new environment, empty uv cache:  {first_cold:6.2f} s "
          f"(build {figures['build_cold_s']} s; uv's cache then held {downloaded / 2**20:.0f} MiB)")
    print(f"first task in a new environment, warm uv cache:   {first_warm:6.2f} s "
          f"(build {figures['build_warm_uv_cache_s']} s)")
    print(f"warm no-op round trip, p50 of {len(own)}: endpoint's own environment {p50_own * 1e3:.2f} ms, "
          f"cached environment {p50_env * 1e3:.2f} ms: {p50_env / p50_own:.2f}x (goal <= 1.2x)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
