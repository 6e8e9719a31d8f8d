"""What runs inside a Parsl worker: :func:`run_in_worker`, the wrapper the engine submits for
every task, and the worker's half of the control files and the RUNNING datagram.

Parsl pickles :func:`run_in_worker` by reference, so every worker imports this module under
this name (``tether.endpoint.engines.parsl.worker``); it must stay cheap to import there:
no Parsl, no asyncio, nothing of the engine's. The engine's half of the same protocol is in
``cancel.py``: the engine writes ``TASK.cancel`` *before* it looks at a task's claim, the
worker looks for ``TASK.cancel`` *after* it made its claim, so one side always sees the other.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tether.endpoint.execute import Allowlist, TaskSpec, run_task
from tether.ids import child_path
from tether.protocol import Result

#: where the engine listens for RUNNING datagrams: (addresses to try, port, HMAC key)
Notify = tuple[list[str], int, bytes]


@dataclass(frozen=True)
class WorkerRun:
    """What every task of one engine run carries to its worker besides the task itself (built
    once at start: the engine's facts, its control directory, where RUNNING goes)."""

    engine: dict[str, Any]
    control_dir: str | None
    notify: Notify | None
    allowed_methods: Allowlist | frozenset[str] | None = None
    python_sandbox: bool = False


def control_file(control_dir: str | Path, task_id: str, suffix: str) -> Path:
    """``control_dir/TASK<suffix>`` (a cancel marker or a claim). Task ids arrive from the service:
    one like ``../../x`` must never name a file outside ``control_dir``, so it is checked here."""
    base = child_path(Path(control_dir), task_id, "task id")
    return base.with_name(base.name + suffix)


def run_in_worker(task: TaskSpec, run: WorkerRun, attempt: int = 0) -> Result | None:
    """Runs on a Parsl worker: claim the task, honour a cancel that came first, run, report RUNNING.

    The claim is ``control_dir/TASK.ATTEMPT.run`` (``host pid``), flock-ed while the task runs (one
    file per attempt: the worker of a lost attempt may still be running somewhere). Seeing the
    claim locked, the engine kills this worker; outside the lock (between tasks, when the worker
    may hold Parsl's own locks) it is never killed. None: cancelled before it started.
    """
    claim = None
    path = ""
    if run.control_dir:
        path = str(control_file(run.control_dir, task.id, f".{attempt}.run"))
        try:
            import fcntl

            claim = open(path, "w")  # noqa: SIM115 - held for the task's duration
            fcntl.flock(claim, fcntl.LOCK_EX | fcntl.LOCK_NB)
            claim.write(f"{socket.gethostname()} {os.getpid()}")
            claim.flush()
        except OSError:
            if claim is not None:
                claim.close()
            claim = None  # no (lockable) shared filesystem here: cancel cannot reach this worker
        if control_file(run.control_dir, task.id, ".cancel").exists():
            _release(claim, path)
            return None  # cancelled before it started: never run it
    _notify(run.notify, task.id)
    if not run.python_sandbox and task.sandbox:
        try:  # as on the local engines: Python functions start in the endpoint's tasks/ directory
            os.chdir(os.path.dirname(task.sandbox))
        except OSError:
            pass  # not shared with this node: stay where the worker pool started
    try:
        return run_task(task, run.allowed_methods, chdir=run.python_sandbox, engine=run.engine)
    finally:
        _release(claim, path)


def _notify(notify: Notify | None, task_id: str) -> None:
    """Send the RUNNING datagram (task id, pid, host, time; HMAC-signed); lost ones cost only detail."""
    if not notify:
        return
    addresses, port, key = notify
    msg = f"{task_id}|{os.getpid()}|{socket.gethostname()}|{time.time():.6f}".encode()
    packet = signature(key, msg) + msg
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for addr in addresses:
                try:
                    s.sendto(packet, (addr, port))
                except OSError:
                    pass
    except OSError:
        pass


def signature(key: bytes, msg: bytes) -> bytes:
    """The 16-byte HMAC that precedes a RUNNING datagram (the key travels inside the task)."""
    return hmac.new(key, msg, hashlib.sha256).digest()[:16]


def _release(claim: IO[str] | None, path: str) -> None:
    if claim is None:
        return
    try:
        os.unlink(path)
    except OSError:
        pass
    claim.close()  # drops the lock
