"""What runs on the endpoint: one Dask task (proxy mode) or one ``dask worker`` process (worker mode).

This module is shipped by value (``cloudpickle.register_pickle_by_value``), so an endpoint needs
``dask`` and ``distributed`` (the same versions as the client) but not this plugin. Keep it
self-contained: imports inside functions, no references to the rest of ``tether.dask``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any

#: returned instead of a task message when the task turned out to need a Dask worker
NEEDS_WORKER = "tether-needs-worker"
#: the first item of what a task that raised returns: ``(ERRED, the worker's own message)``
ERRED = "tether-dask-erred"


def _raised_for_want_of_a_worker(exc: BaseException | None) -> bool:
    """True if ``exc`` came out of ``get_worker()``/``get_client()``/``secede()``: the task wants
    the worker it runs on, which an endpoint process is not. The proxy then runs it locally."""
    if exc is None:
        return False
    import distributed.worker as dw

    codes = {dw.get_worker.__code__, dw.get_client.__code__, dw.secede.__code__}
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:  # the chain too: P2P wraps get_worker's error
        seen.add(id(exc))
        tb = exc.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code in codes:
                return True
            tb = tb.tb_next
        exc = exc.__cause__ or exc.__context__
    return False


def run_dask_task(task: Any, data: dict, time_delay: float) -> Any:
    """Run one Dask task as a worker's executor would.

    Returns the task's value itself, so that a large one stays on the endpoint as any large
    Tether result does (the proxy worker holds a reference, and the next task that needs it
    reads it there); the proxy makes the worker's message. A task that raised returns
    ``(ERRED, message)``: its exception travels inside the message (``exception`` is pickled
    by Dask itself); ``actual_exception`` is dropped when it does not pickle, since Dask only
    needs it to recognise ``Reschedule``.
    """
    import cloudpickle
    from distributed.worker import _run_task_simple

    msg: dict[str, Any] = _run_task_simple(task, data, time_delay)
    if msg.get("op") == "task-finished":
        return msg["result"]
    if msg.get("op") == "task-erred":
        exc = msg.get("actual_exception")
        if _raised_for_want_of_a_worker(exc):
            return NEEDS_WORKER
        try:
            cloudpickle.dumps(exc)
        except Exception:
            msg["actual_exception"] = None
    return ERRED, msg


def _tail(path: Path, lines: int) -> str:
    try:
        with path.open(errors="replace") as fh:
            return "".join(deque(fh, maxlen=lines))
    except OSError:
        return ""


def run_dask_worker(scheduler: str, name: str, *, nthreads: int, memory_limit: str, lifetime: float | None,
                    lifetime_stagger: float, death_timeout: float, nanny: bool,
                    extra_args: list[str]) -> dict[str, Any]:
    """Run ``dask worker`` against ``scheduler`` until it exits; a long-running Tether task.

    The worker runs in a child process of the task (cancelling the task kills it with its
    process group). With ``lifetime`` the worker drains and exits cleanly after that many
    seconds, before the block it runs in reaches its walltime. A worker that cannot reach the
    scheduler gives up after ``death_timeout`` seconds, and this task fails saying so.
    """
    log = Path(os.getcwd(), "dask-worker.log")
    cmd = [sys.executable, "-m", "distributed.cli.dask_worker", scheduler, "--name", str(name),
           "--nthreads", str(nthreads), "--memory-limit", str(memory_limit), "--local-directory", os.getcwd(),
           "--death-timeout", f"{death_timeout}s", "--nanny" if nanny else "--no-nanny"]
    if lifetime:
        cmd += ["--lifetime", f"{lifetime}s", "--lifetime-stagger", f"{lifetime_stagger}s"]
    cmd += list(extra_args)
    with log.open("wb") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    tail = _tail(log, 40)
    if proc.returncode != 0:
        hint = ""
        if "Timed out" in tail or "Failed to connect" in tail or "Unable to connect" in tail:
            hint = (f"\nThe endpoint's node could not reach the scheduler at {scheduler}: worker mode needs the "
                    f"endpoint's nodes to connect to it (scheduler_options={{'host': ..., 'contact_address': ...}}); "
                    f"otherwise use mode='proxy'.")
        raise RuntimeError(f"dask worker {name!r} on {socket.gethostname()} exited with code {proc.returncode}"
                           f"{hint}\n--- last lines of its log ---\n{tail}")
    return {"name": name, "host": socket.gethostname(), "returncode": proc.returncode, "log_tail": tail,
            "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
