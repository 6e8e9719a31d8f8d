"""Measurement library for no-op task benchmarks: Tether versus its peers.

Every peer is exposed as a context manager yielding ``submit(fn, *args) -> future``
so the very same measurement loops run against each system.  Futures only need
``.result(timeout=...)``: ``concurrent.futures.Future``, Parsl ``AppFuture`` and
``distributed.Future`` all qualify.

Worker processes of Parsl, Dask and Tether are separate interpreters that must
import :func:`noop` by reference, so every context manager first exports this
module's import root on ``PYTHONPATH`` (see :func:`_export_import_root`).
"""

from __future__ import annotations

import math
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "Submit",
    "dask_local",
    "measure_latency",
    "measure_throughput",
    "noop",
    "parsl_htex",
    "process_pool",
    "tether_stack",
]

#: Upper bound for a single task in the latency loop; a hung system fails fast.
TASK_TIMEOUT_S = 60.0
#: Upper bound for waiting on a whole throughput batch (warmup or measured).
BATCH_TIMEOUT_S = 600.0


class _Future(Protocol):
    def result(self, timeout: float | None = None) -> Any: ...


Submit = Callable[..., _Future]


def noop(x: Any = None) -> Any:
    """Return ``x`` unchanged: the task body costs nothing, so we time only the system."""
    return x


# --------------------------------------------------------------------------- measurement


def _percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile: no interpolation, so p99 is an observed round trip."""
    if not sorted_values:
        raise ValueError("no samples")
    rank = max(1, min(len(sorted_values), math.ceil(pct / 100.0 * len(sorted_values))))
    return sorted_values[rank - 1]


def measure_latency(submit: Submit, n: int = 300, warmup: int = 50) -> dict[str, float]:
    """Time ``n`` sequential round trips (submit, then wait) after ``warmup`` untimed ones.

    Sequential on purpose: it measures per-task overhead on an idle system, which is
    what an interactive user feels; the warmup absorbs worker start-up and imports.
    """
    for i in range(warmup):
        submit(noop, i).result(timeout=TASK_TIMEOUT_S)
    samples: list[float] = []
    for i in range(n):
        t0 = time.perf_counter()
        out = submit(noop, i).result(timeout=TASK_TIMEOUT_S)
        samples.append((time.perf_counter() - t0) * 1000.0)
        if out != i:
            raise RuntimeError(f"noop({i}) returned {out!r}")
    samples.sort()
    return {
        "n": n,
        "p50_ms": _percentile(samples, 50),
        "p99_ms": _percentile(samples, 99),
        "mean_ms": statistics.fmean(samples),
        "min_ms": samples[0],
        "max_ms": samples[-1],
    }


def _submit_and_wait(submit: Submit, n: int, timeout: float) -> None:
    """Submit ``n`` no-ops, then wait for each under one shared deadline."""
    futures = [submit(noop, i) for i in range(n)]
    deadline = time.monotonic() + timeout
    for fut in futures:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{n} tasks did not finish within {timeout:.0f}s")
        fut.result(timeout=remaining)


def measure_throughput(submit: Submit, n: int = 5000, warmup: int = 200) -> dict[str, float]:
    """Submit ``n`` no-ops at once, wait for all; report tasks/s over submit-to-last-result.

    The clock includes submission because client-side serialisation and queueing
    are part of what bounds a user's throughput.
    """
    if warmup:
        _submit_and_wait(submit, warmup, BATCH_TIMEOUT_S)
    t0 = time.perf_counter()
    _submit_and_wait(submit, n, BATCH_TIMEOUT_S)
    elapsed = time.perf_counter() - t0
    return {"n": n, "seconds": elapsed, "tasks_per_s": n / elapsed}


# --------------------------------------------------------------------------- peers


def _export_import_root() -> None:
    """Put the directory ``noop`` is importable from on ``PYTHONPATH`` for child processes.

    Parsl (dill) and Dask (pickle) ship module-level functions by reference, so worker
    interpreters started by a shell or a nanny must be able to ``import`` this module
    under the same name it has here (``peers`` when run as a script from
    ``benchmarks/``, ``benchmarks.peers`` when imported from the repo root).
    """
    root = Path(__file__).resolve().parent
    for _ in range(__name__.count(".")):
        root = root.parent
    current = os.environ.get("PYTHONPATH", "")
    parts = [p for p in current.split(os.pathsep) if p]
    if str(root) not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(root), *parts])


@contextmanager
def process_pool(workers: int = 2) -> Iterator[Submit]:
    """A bare ``ProcessPoolExecutor``: the floor any federated system is measured against."""
    _export_import_root()
    pool = ProcessPoolExecutor(max_workers=workers)
    try:
        yield pool.submit
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _parsl_launch_cmds() -> tuple[str, list[str]]:
    """Worker-pool and interchange commands that run under *this* interpreter.

    Parsl's defaults are the bare script names ``process_worker_pool.py`` and
    ``interchange.py``, found via ``PATH``; running from a venv without activating
    it then fails (or silently picks another install).  Both modules run fine with
    ``python -m``, so we substitute that and keep the rest of Parsl's template.
    """
    from parsl.executors.high_throughput import executor as htex_mod

    python = shlex.quote(sys.executable)
    default: str = htex_mod.DEFAULT_LAUNCH_CMD
    script = "process_worker_pool.py"
    if not default.startswith(script):
        raise RuntimeError(f"unexpected Parsl DEFAULT_LAUNCH_CMD: {default[:60]!r}")
    launch_cmd = f"{python} -m parsl.executors.high_throughput.process_worker_pool{default[len(script) :]}"
    interchange_cmd = [sys.executable, "-m", "parsl.executors.high_throughput.interchange"]
    return launch_cmd, interchange_cmd


@contextmanager
def parsl_htex(workers: int = 2) -> Iterator[Submit]:
    """Parsl's HighThroughputExecutor on one local block, with Parsl's default settings otherwise."""
    import parsl
    from parsl.config import Config
    from parsl.executors import HighThroughputExecutor
    from parsl.providers import LocalProvider

    _export_import_root()
    launch_cmd, interchange_cmd = _parsl_launch_cmds()
    with tempfile.TemporaryDirectory(prefix="bench-parsl-", ignore_cleanup_errors=True) as tmp:
        htex = HighThroughputExecutor(
            label="htex_bench",
            address="127.0.0.1",  # skip probing every interface on the host
            max_workers_per_node=workers,
            launch_cmd=launch_cmd,
            interchange_launch_cmd=interchange_cmd,
            worker_logdir_root=tmp,
            provider=LocalProvider(init_blocks=1, min_blocks=0, max_blocks=1),
        )
        config = Config(
            executors=[htex],
            run_dir=os.path.join(tmp, "runinfo"),
            strategy="none",  # one fixed block; no scaling thread deciding mid-run
            usage_tracking=0,
        )
        dfk = None
        try:
            dfk = parsl.load(config)
            apps: dict[Callable[..., Any], Callable[..., _Future]] = {}

            def submit(fn: Callable[..., Any], *args: Any) -> _Future:
                # A Parsl app is bound to one function; wrap each function once, then call it.
                app = apps.get(fn)
                if app is None:
                    app = apps[fn] = parsl.python_app(fn, data_flow_kernel=dfk, executors=[htex.label])
                return app(*args)

            yield submit
        finally:
            try:
                if dfk is not None:
                    dfk.cleanup()
            finally:
                parsl.clear()


@contextmanager
def dask_local(workers: int = 2) -> Iterator[Submit]:
    """Dask distributed on a LocalCluster of single-threaded worker processes."""
    from distributed import Client, LocalCluster

    _export_import_root()
    with tempfile.TemporaryDirectory(prefix="bench-dask-", ignore_cleanup_errors=True) as tmp:
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,  # no bokeh server, no port 8787 clash
            local_directory=tmp,
        )
        try:
            client = Client(cluster)
            try:

                def submit(fn: Callable[..., Any], *args: Any) -> _Future:
                    # pure=False: identical calls must not be deduplicated into one task.
                    return client.submit(fn, *args, pure=False)

                yield submit
            finally:
                client.close(timeout=30)
        finally:
            cluster.close(timeout=30)


@contextmanager
def tether_stack(workers: int = 2) -> Iterator[Submit]:
    """Tether end to end: embedded service + endpoint as real subprocesses, driven by the client SDK.

    Raises ``ImportError`` if Tether (``tether.local``) is not installed.
    """
    from tether.local import local_stack

    _export_import_root()
    with local_stack(engine="process", workers=workers) as stack:
        from tether import Executor

        with Executor(endpoint_id=stack.endpoint_id, service=stack.service_url, token=stack.token) as ex:
            yield ex.submit


#: Name -> context-manager factory, in the order bench_noop.py runs them.
PEERS: dict[str, Callable[[int], AbstractContextManager[Submit]]] = {
    "tether": tether_stack,
    "process_pool": process_pool,
    "parsl_htex": parsl_htex,
    "dask_local": dask_local,
}
