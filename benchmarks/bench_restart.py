"""Restart under load (issue 24): ``tether endpoint restart`` in the middle of a batch kills no
running task, loses no result and runs no task twice.

Usage::

    python benchmarks/bench_restart.py [--tasks 1000] [--seconds 2] [--workers 4] [--at 0.3]
                                       [--kill] [--engine process|htex|htex-in-daemon] [--json PATH]

A local service and an endpoint (the process engine, or ``--engine htex``: Parsl's
HighThroughputExecutor with LocalProvider, one block of ``--workers`` workers; ``htex-in-daemon``:
the same with ``outlive_daemon: false``, as before 2026-12-07) run ``--tasks``
tasks of ``--seconds`` each; when
``--at`` of them are done the endpoint restarts (``--kill``: its daemon is SIGKILLed and started
again instead). Each task appends ``begin PID T`` and ``end PID T`` to a file of its own, so the counts come
from what the tasks did, not from what the system says:

- killed: tasks that began and never ended in the process that began them (a ``begin`` line
  without its ``end``);
- run twice: tasks with more than one ``begin`` line;
- lost: futures that did not resolve to the task's value;
- the dispatch gap: how long no task began, from the restart command until the first task that
  began after it (new submissions wait that long, and the restart command takes that long);
- a probe: a task submitted once the restart command returned, then its wait for a worker
  (behind the backlog the service holds: the whole batch is submitted at once).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tether import Executor
from tether.local import local_stack

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import tether_cli  # noqa: E402  (needs the sys.path line above)


def marked_sleep(marker: str, seconds: float, value: int) -> int:
    """Record this run's start (and, if it is not killed, its end), then return ``value``: lines
    ``begin PID T`` and ``end PID T``, each written whole (a run killed between the two leaves a
    ``begin`` alone, and a second run begins a line of its own)."""
    import os
    import time

    with open(marker, "a") as fh:
        fh.write(f"begin {os.getpid()} {time.time()}\n")
        fh.flush()
        time.sleep(seconds)
        fh.write(f"end {os.getpid()} {time.time()}\n")
    return value


#: cores_per_worker below 1: HTEX otherwise starts no more workers than the host has cores
HTEX = """
engine:
  type: htex
  max_workers_per_node: {workers}
  cores_per_worker: 0.01
  outlive_daemon: {outlive}
  provider: {{type: LocalProvider, init_blocks: 1, min_blocks: 1, max_blocks: 1}}
"""


def stack_for(engine: str, workers: int, scratch: Path) -> Any:
    """A service and an endpoint of ``engine`` with ``workers`` workers."""
    if engine == "process":
        return local_stack(workers=workers)
    from parsl_stack import engine_stack

    outlive = "false" if engine == "htex-in-daemon" else "true"
    return engine_stack(scratch / "home", HTEX.format(workers=workers, outlive=outlive))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--at", type=float, default=0.3, help="fraction of tasks done when the endpoint restarts")
    ap.add_argument("--kill", action="store_true", help="SIGKILL the daemon and start it, instead of restart")
    ap.add_argument("--engine", choices=("process", "htex", "htex-in-daemon"), default="process")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    marks = Path(tempfile.mkdtemp(prefix="tether-restart-"))
    with stack_for(args.engine, args.workers, marks) as stack:
        ex = Executor(endpoint_id=stack.endpoint_id, service=stack.service_url, token=stack.token)
        t0 = time.time()
        futures = [ex.submit(marked_sleep, str(marks / f"t{i}"), args.seconds, i) for i in range(args.tasks)]
        while sum(f.done() for f in futures) < args.at * args.tasks:
            time.sleep(0.05)
        done_at_restart = sum(f.done() for f in futures)
        restart_at = time.time()
        if args.kill:
            stack.kill_endpoint()
            stack.start_endpoint()
        else:
            tether_cli(stack.env, "endpoint", "restart", stack.endpoint_name)
        restart_s = time.time() - restart_at
        probe_at = time.time()
        probe = ex.submit(marked_sleep, str(marks / "probe"), 0.0, -1)
        lost = 0
        for i, f in enumerate(futures):
            try:
                lost += f.result(timeout=args.tasks * args.seconds + 300) != i
            except Exception:  # noqa: BLE001 - a failure or a timeout is a lost task
                lost += 1
        probe.result(timeout=600)
        probe_s = time.time() - probe_at
        total_s = time.time() - t0
        ex.shutdown()
    runs = [[line.split() for line in (marks / f"t{i}").read_text().splitlines()] for i in range(args.tasks)]
    def pids(lines: list[list[str]], kind: str) -> set[str]:
        return {pid for k, pid, _ in lines if k == kind}

    killed = sum(1 for lines in runs if pids(lines, "begin") - pids(lines, "end"))
    twice = sum(1 for lines in runs if sum(kind == "begin" for kind, _, _ in lines) > 1)
    shutil.rmtree(marks, ignore_errors=True)
    began_after = [float(t) for lines in runs for kind, _, t in lines if kind == "begin" and float(t) > restart_at]
    gap = (min(began_after) - restart_at) if began_after else None
    report = {
        "engine": args.engine, "tasks": args.tasks, "seconds": args.seconds, "workers": args.workers,
        "how": "kill" if args.kill else "restart",
        "done_at_restart": done_at_restart, "killed": killed, "lost": lost, "run_twice": twice,
        "restart_command_s": round(restart_s, 2), "dispatch_gap_s": None if gap is None else round(gap, 2),
        "probe_wait_s": round(probe_s, 2), "total_s": round(total_s, 1),
        "ideal_s": round(args.tasks * args.seconds / args.workers, 1),
    }
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
