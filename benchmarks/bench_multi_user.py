"""Multi-user endpoint: first-task latency through a new user endpoint (cold) and a running one
(warm), the memory one user endpoint costs, and the same no-op on an ordinary endpoint.

Usage (as root: it creates POSIX users)::

    python benchmarks/bench_multi_user.py [--users 3] [--n-warm 50]

Each "user" is a fresh service user mapped to a fresh local account (``useradd``); their first
task makes the multi-user endpoint map the identity, render the config and start a user
endpoint process as that account (cold); later tasks go straight to it (warm). Memory is the
summed RSS of a user endpoint's process tree (daemon + workers), read from /proc.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import statistics
import subprocess
import sys
import time

import psutil

from tether import Client, Executor
from tether.local import local_stack


def _cli(env: dict[str, str], *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "tether.cli", *args], env=env, capture_output=True, text=True,
                          check=True, timeout=120).stdout


def _noop() -> None:
    return None


def _ms(samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    return f"p50 {statistics.median(ms):7.1f} ms   min {ms[0]:7.1f}   max {ms[-1]:7.1f}   (n={len(ms)})"


def _tree_rss(uid: int) -> int:
    """RSS of every process of this uid (a user endpoint and its workers)."""
    total = 0
    for proc in psutil.process_iter(["uids", "memory_info"]):
        if proc.info["uids"] and proc.info["uids"].real == uid and proc.info["memory_info"]:
            total += proc.info["memory_info"].rss
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=3)
    parser.add_argument("--n-warm", type=int, default=50)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_multi_user: run as root (it creates users with useradd and starts processes as them)")
    with local_stack(engine="process", workers=1) as stack:
        env = stack.env
        _cli(env, "endpoint", "configure", "cluster", "--multi-user", "--force")
        d = stack.endpoint_dir("cluster")
        (d / "identity_mapping.json").write_text(json.dumps([{
            "DATA_TYPE": "expression_identity_mapping#1.0.0",
            "mappings": [{"source": "{username}", "match": "bench(.*)", "output": "tether_bench{0}"}]}]))
        (d / "user_config_template.yaml.j2").write_text("engine:\n  type: process\n  workers: 1\n")
        cluster = stack.start_endpoint("cluster")
        cold, warm, rss = [], [], []
        for i in range(args.users):
            local = f"tether_bench{i}"
            try:
                pwd.getpwnam(local)
            except KeyError:
                subprocess.run(["useradd", "--create-home", local], check=True)
            token = json.loads(_cli(env, "service", "user-add", f"bench{i}", "--json"))["token"]
            ex = Executor(endpoint_id=cluster, service=stack.service_url, token=token)
            t = time.perf_counter()
            ex.submit(_noop).result(timeout=120)
            cold.append(time.perf_counter() - t)
            for _ in range(args.n_warm):
                t = time.perf_counter()
                ex.submit(_noop).result(timeout=60)
                warm.append(time.perf_counter() - t)
            rss.append(_tree_rss(pwd.getpwnam(local).pw_uid))
        ordinary = Executor(endpoint_id=stack.endpoint_id, service=stack.service_url, token=stack.token)
        ordinary.submit(_noop).result(timeout=60)
        direct = []
        for _ in range(args.n_warm):
            t = time.perf_counter()
            ordinary.submit(_noop).result(timeout=60)
            direct.append(time.perf_counter() - t)
        users = Client(stack.service_url, stack.token).list_user_endpoints(cluster)
        stack.stop_endpoint("cluster")
    print(f"multi-user endpoint, {args.users} users (one user endpoint each, process engine, 1 worker)")
    print(f"  cold first task (map + render + start a user endpoint as the user): {_ms(cold)}")
    print(f"  warm task through a running user endpoint:                          {_ms(warm)}")
    print(f"  the same no-op on an ordinary endpoint:                             {_ms(direct)}")
    print(f"  warm / ordinary p50: {statistics.median(warm) / statistics.median(direct):.2f}   "
          f"cold / warm p50: {statistics.median(cold) / statistics.median(warm):.0f}")
    print(f"  memory per user endpoint (daemon + worker RSS): {statistics.median(rss) / 2**20:.0f} MiB "
          f"(min {min(rss) / 2**20:.0f}, max {max(rss) / 2**20:.0f}); user endpoints listed: {len(users)}")


if __name__ == "__main__":
    main()
