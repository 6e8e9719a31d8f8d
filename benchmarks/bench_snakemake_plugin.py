"""A 200-job workflow of trivial rules, through the Tether plugin and through its peers, in one run.

Usage::

    python benchmarks/bench_snakemake_plugin.py [--n 200] [--only local,tether,cold,grouped,slurm,tether-slurm]

- ``local``: Snakemake's own local executor (``--cores 2``): the ceiling, no remote jobs at all;
- ``tether``: ``--executor tether`` on a local process endpoint with 2 workers (each job's
  ``python -m snakemake`` starts in a fork of the endpoint's warm runner);
- ``cold``: the same with ``--tether-cold-start``: each job starts a new interpreter, as every
  other remote executor does (and as this plugin did before its warm runner);
- ``grouped``: the same with ``--group-components`` (20 rules per remote job), Snakemake's own
  answer to per-job overhead;
- ``slurm``: ``snakemake-executor-plugin-slurm`` on the one-node Slurm (``.ci/slurm-setup.sh``);
- ``tether-slurm``: ``--executor tether`` on an endpoint whose htex engine gets workers from the
  same Slurm (one pilot job; the Snakemake jobs are tasks inside it).

Prints wall time, jobs per second, the per-job cost and ratios against the local executor and the
slurm plugin measured in the same run, and for the local executor and the Tether variants the CPU
time each cost (Snakemake and its children; the service, the endpoint and all it started): on a
shared machine wall time swings with what else runs, CPU time much less. ``--rounds 3`` runs the
local executor and the Tether variants three times, interleaved, and keeps each one's best.
Never passes or fails on time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import psutil  # noqa: E402

from tether.local import LocalStack, local_stack  # noqa: E402

from parsl_stack import engine_stack  # noqa: E402

SNAKEFILE = """
N = int(config.get("count", 200))

rule all:
    input: expand("out/{i}.txt", i=range(N))

rule trivial:
    output: "out/{i}.txt"
    shell: "echo {wildcards.i} > {output}"
"""

SLURM_PARTITION = "debug"
SLURM_HTEX = f"""
engine:
  type: htex
  max_workers_per_node: 2
  provider:
    type: SlurmProvider
    partition: {SLURM_PARTITION}
    nodes_per_block: 1
    init_blocks: 1
    min_blocks: 0
    max_blocks: 1
    walltime: "00:30:00"
    exclusive: false
    launcher: {{type: SrunLauncher}}
"""


def slurm_missing() -> str | None:
    """Why the Slurm peers cannot run here, or None."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "Slurm is not installed (run .ci/slurm-setup.sh as root)"
    out = subprocess.run(["sinfo", "-h", "-p", SLURM_PARTITION, "-o", "%T"], capture_output=True, text=True,
                         timeout=20)
    if out.returncode != 0 or not any(s.rstrip("*~#") in ("idle", "mixed") for s in out.stdout.split()):
        return f"no usable node in Slurm partition {SLURM_PARTITION!r} ({out.stderr.strip() or out.stdout.strip()})"
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        return "snakemake-executor-plugin-slurm is not installed (pip install -e '.[bench]')"
    return None


def run_workflow(n: int, args: list[str], env: dict[str, str] | None = None,
                 stack: LocalStack | None = None) -> tuple[float, float]:
    """Run the workflow in a fresh directory; return its wall time and the CPU time it cost
    (seconds): Snakemake and what it started, plus, with ``stack``, the service, the endpoint and
    everything the endpoint started (workers, warm runners, jobs). CPU time does not care what
    else the shared machine runs meanwhile; wall time does."""
    with tempfile.TemporaryDirectory(prefix="bench-smk-", dir=os.getcwd()) as tmp:
        wd = Path(tmp)
        (wd / "Snakefile").write_text(SNAKEFILE)
        cmd = [sys.executable, "-m", "snakemake", "all", "--config", f"count={n}", *args]
        roots = [stack.service_pid(), stack.endpoint_pid()] if stack is not None else []
        cpu0 = _children_cpu() + tree_cpu(roots)
        t0 = time.perf_counter()
        out = subprocess.run(cmd, cwd=wd, env=env or dict(os.environ), capture_output=True, text=True,
                             stdin=subprocess.DEVNULL, timeout=3600)
        elapsed = time.perf_counter() - t0
        cpu = _children_cpu() + tree_cpu(roots) - cpu0
        made = len(list((wd / "out").glob("*.txt"))) if (wd / "out").is_dir() else 0
        if out.returncode != 0 or made != n:
            raise RuntimeError(f"snakemake {' '.join(args)} failed (exit {out.returncode}, {made}/{n} outputs):\n"
                               f"{out.stderr[-3000:]}")
    return elapsed, cpu


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def tree_cpu(pids: list[int | None]) -> float:
    """CPU seconds used so far by these processes and their descendants, living or reaped (a
    reaped child's time is in its parent's ``children_*``)."""
    total, seen = 0.0, set()
    for pid in pids:
        if pid is None:
            continue
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for proc in procs:
            if proc.pid in seen:
                continue
            seen.add(proc.pid)
            try:
                t = proc.cpu_times()
            except psutil.Error:
                continue
            total += t.user + t.system + t.children_user + t.children_system
    return total


def tether_env(stack: LocalStack) -> dict[str, str]:
    return dict(os.environ, TETHER_SERVICE_URL=stack.service_url, TETHER_TOKEN=stack.token)


@contextmanager
def process_endpoint() -> Iterator[LocalStack]:
    with local_stack(engine="process", workers=2) as stack:
        yield stack


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200, help="jobs in the workflow")
    ap.add_argument("--only", default="local,tether,cold,grouped,slurm,tether-slurm")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run local, tether, cold and grouped this many times, interleaved; keep each one's best")
    args = ap.parse_args()
    only = set(args.only.split(","))
    n = args.n
    results: dict[str, float] = {}
    cpus: dict[str, float] = {}
    skipped: dict[str, str] = {}

    def record(name: str, measured: tuple[float, float], with_cpu: bool = True) -> None:
        seconds, cpu = measured
        results[name] = min(seconds, results.get(name, seconds))
        if with_cpu:
            cpus[name] = min(cpu, cpus.get(name, cpu))
        print(f"{name:<14} {seconds:7.1f} s  {n / seconds:6.1f} jobs/s"
              + (f"  CPU {cpu:6.1f} s" if with_cpu else ""), flush=True)

    stack_cm = process_endpoint() if only & {"tether", "cold", "grouped"} else contextlib.nullcontext()
    with stack_cm as stack:
        for _ in range(args.rounds):
            if "local" in only:
                record("local", run_workflow(n, ["--cores", "2"]))
            if stack is None:
                continue
            base = ["--executor", "tether", "--tether-endpoint-id", stack.endpoint_id, "--jobs", "16"]
            if "tether" in only:
                record("tether", run_workflow(n, base, tether_env(stack), stack))
            if "cold" in only:
                record("cold", run_workflow(n, [*base, "--tether-cold-start"], tether_env(stack), stack))
            if "grouped" in only:
                grouping = ["--groups", "trivial=g", "--group-components", "g=20"]
                record("grouped", run_workflow(n, [*base, *grouping], tether_env(stack), stack))
    missing = slurm_missing() if only & {"slurm", "tether-slurm"} else None
    if "slurm" in only:
        if missing:
            skipped["slurm"] = missing
        else:
            record("slurm", run_workflow(n, [
                "--executor", "slurm", "--jobs", "16", "--default-resources", f"slurm_partition={SLURM_PARTITION}",
                "runtime=10", "mem_mb=100", "--seconds-between-status-checks", "1", "--slurm-status-command",
                "squeue"]), with_cpu=False)  # (Slurm's daemons and job steps are not this process's children)
    if "tether-slurm" in only:
        if missing:
            skipped["tether-slurm"] = missing
        else:
            with tempfile.TemporaryDirectory(prefix="bench-smk-home-") as home:
                with engine_stack(Path(home) / "home", SLURM_HTEX) as stack:
                    record("tether-slurm", run_workflow(n, [
                        "--executor", "tether", "--tether-endpoint-id", stack.endpoint_id, "--jobs", "16"],
                        tether_env(stack)), with_cpu=False)

    print(f"\n{n} trivial jobs, 2 cores; per job: wall time (best of {args.rounds}) and CPU time; "
          f"ratios are per-job costs over the local executor's (lower is faster):")
    for name, seconds in results.items():
        parts = [f"{name:<14} per job {seconds / n * 1000:7.0f} ms"]
        if name in cpus:
            parts.append(f"CPU {cpus[name] / n * 1000:6.0f} ms")
        if "local" in results and name != "local":
            parts.append(f"wall {seconds / results['local']:6.2f}x local")
            if name in cpus and "local" in cpus:
                parts.append(f"CPU {cpus[name] / cpus['local']:6.2f}x local")
        if "slurm" in results and name != "slurm":
            parts.append(f"{results['slurm'] / seconds:6.1f}x faster than slurm")
        print("   ".join(parts))
    for name, why in skipped.items():
        print(f"{name:<14} skipped: {why}")


if __name__ == "__main__":
    main()
