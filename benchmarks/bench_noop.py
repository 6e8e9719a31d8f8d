"""No-op task benchmark: Tether versus a bare process pool, Parsl HTEX and Dask distributed.

Usage::

    python benchmarks/bench_noop.py [--n-latency 300] [--n-throughput 5000] [--workers 2]
                                    [--only tether,process_pool,parsl_htex,dask_local] [--json PATH]

Each system runs in its own child interpreter (unless ``--in-process``) so that one
system's leftover threads, processes or global state (Parsl's DFK, Dask's event
loop) cannot skew the next, and so a hung system can be killed after ``--timeout``.
Ratios are relative to Tether: ``p50 / tether`` > 1 means the peer is slower,
``tps / tether`` > 1 means the peer has more throughput.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # noqa: E402  (needs the sys.path line above when run as a script)

ALL_SYSTEMS = list(peers.PEERS)
Result = dict[str, Any]


def _log(msg: str) -> None:
    """Progress goes to stderr so stdout stays just the table."""
    print(msg, file=sys.stderr, flush=True)


def run_system(name: str, args: argparse.Namespace) -> Result:
    """Start one system, measure latency then throughput, always tear it down."""
    factory = peers.PEERS[name]
    result: Result = {"system": name, "latency": None, "throughput": None, "error": None}
    t0 = time.perf_counter()
    try:
        with factory(args.workers) as submit:
            result["startup_s"] = time.perf_counter() - t0
            _log(f"[{name}] started in {result['startup_s']:.1f}s; latency n={args.n_latency}")
            result["latency"] = peers.measure_latency(submit, n=args.n_latency, warmup=args.warmup_latency)
            _log(f"[{name}] p50={result['latency']['p50_ms']:.2f}ms; throughput n={args.n_throughput}")
            result["throughput"] = peers.measure_throughput(
                submit, n=args.n_throughput, warmup=args.warmup_throughput
            )
            _log(f"[{name}] {result['throughput']['tasks_per_s']:.0f} tasks/s; shutting down")
    except Exception as exc:  # report, never abort the other systems
        result["error"] = f"{type(exc).__name__}: {exc}"
        _log(f"[{name}] FAILED:\n{traceback.format_exc()}")
    result["wall_s"] = time.perf_counter() - t0
    return result


def _kill_group(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """Terminate the child's own process group (created by us), escalating to SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def run_system_isolated(name: str, args: argparse.Namespace) -> Result:
    """Run :func:`run_system` in a fresh interpreter with a hard wall-clock bound."""
    with tempfile.TemporaryDirectory(prefix="bench-noop-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--_child", name,
            "--_out", str(out),
            "--workers", str(args.workers),
            "--n-latency", str(args.n_latency),
            "--n-throughput", str(args.n_throughput),
            "--warmup-latency", str(args.warmup_latency),
            "--warmup-throughput", str(args.warmup_throughput),
        ]  # fmt: skip
        proc = subprocess.Popen(cmd, start_new_session=True)
        try:
            proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            _log(f"[{name}] exceeded {args.timeout:.0f}s; killing its process group")
            _kill_group(proc)
            return {"system": name, "latency": None, "throughput": None, "error": "timeout"}
        finally:
            if proc.poll() is None:  # e.g. KeyboardInterrupt while waiting
                _kill_group(proc)
        if not out.exists():
            return {"system": name, "latency": None, "throughput": None,
                    "error": f"child exited {proc.returncode} without a result"}  # fmt: skip
        return json.loads(out.read_text())


def tether_available() -> str | None:
    """Return None if ``tether.local`` imports, else the reason it does not."""
    try:
        import tether.local  # noqa: F401
    except Exception as exc:  # any import-time failure means "unavailable"
        return f"{type(exc).__name__}: {exc}"
    return None


def add_ratios(results: list[Result]) -> None:
    """Annotate each row with ratios against Tether, if Tether produced figures."""
    base = next((r for r in results if r["system"] == "tether" and not r["error"]), None)
    for r in results:
        r["p50_ratio"] = r["tps_ratio"] = None
        if base is None:
            continue
        if r["latency"] and base["latency"]:
            r["p50_ratio"] = r["latency"]["p50_ms"] / base["latency"]["p50_ms"]
        if r["throughput"] and base["throughput"]:
            r["tps_ratio"] = r["throughput"]["tasks_per_s"] / base["throughput"]["tasks_per_s"]


def _rows(results: list[Result]) -> list[list[str]]:
    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    rows = []
    for r in results:
        lat, thr = r["latency"] or {}, r["throughput"] or {}
        rows.append([
            r["system"] + (f" (FAILED: {r['error']})" if r["error"] else ""),
            fmt(lat.get("p50_ms"), ".2f"),
            fmt(lat.get("p99_ms"), ".2f"),
            fmt(thr.get("tasks_per_s"), ",.0f"),
            fmt(r["p50_ratio"], ".2f"),
            fmt(r["tps_ratio"], ".2f"),
        ])  # fmt: skip
    return rows


HEADERS = ["system", "p50 ms", "p99 ms", "throughput tasks/s", "p50 / tether", "tps / tether"]


def print_table(results: list[Result], with_ratios: bool, title: str) -> None:
    """Render with rich when installed, else as aligned plain text."""
    headers, rows = HEADERS, _rows(results)
    if not with_ratios:
        headers, rows = headers[:4], [row[:4] for row in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
        print(title)
        for line in [headers, ["-" * w for w in widths], *rows]:
            cells = [
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(line, widths, strict=True))
            ]
            print("  ".join(cells))
        return
    table = Table(title=title)
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist in ("tether", "parsl", "dask", "distributed"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-latency", type=int, default=300, help="timed sequential round trips")
    p.add_argument("--n-throughput", type=int, default=5000, help="tasks in the throughput batch")
    p.add_argument("--warmup-latency", type=int, default=50)
    p.add_argument("--warmup-throughput", type=int, default=200)
    p.add_argument("--workers", type=int, default=2, help="worker processes per system")
    p.add_argument("--only", default=",".join(ALL_SYSTEMS), help="comma list of: " + ",".join(ALL_SYSTEMS))
    p.add_argument("--json", metavar="PATH", help="also write raw figures as JSON")
    p.add_argument("--timeout", type=float, default=900.0, help="hard wall-clock bound per system, seconds")
    p.add_argument("--in-process", action="store_true", help="run systems in this interpreter (no isolation)")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    p.add_argument("--_out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.systems = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(args.systems) - set(ALL_SYSTEMS))
    if unknown:
        p.error(f"unknown system(s) {unknown}; choose from {ALL_SYSTEMS}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._child:  # child mode: measure one system, hand the figures back via a file
        # SIGTERM from the parent's timeout becomes SystemExit, so `with` blocks still tear down.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        result = run_system(args._child, args)
        Path(args._out).write_text(json.dumps(result))
        return 0

    systems = list(args.systems)
    tether_error = tether_available() if "tether" in systems else None
    if tether_error:
        print(f"Tether is unavailable ({tether_error}); running peers only, ratios omitted.")
        systems.remove("tether")

    results = [run_system(s, args) if args.in_process else run_system_isolated(s, args) for s in systems]
    add_ratios(results)
    with_ratios = any(r["system"] == "tether" and not r["error"] for r in results)
    title = (
        f"no-op tasks, {args.workers} workers, latency n={args.n_latency}, "
        f"throughput n={args.n_throughput} ({os.cpu_count()} CPUs)"
    )
    print_table(results, with_ratios, title)

    if args.json:
        meta = {
            "argv": sys.argv[1:],
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "versions": _versions(),
            "tether_unavailable": tether_error,
            "unix_time": time.time(),
        }
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    return 1 if any(r["error"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
