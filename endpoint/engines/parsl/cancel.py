"""How the engine reaches a task on a Parsl worker, which HTEX itself cannot: a RUNNING report
and a cancel.

HTEX never says when a task starts, and cannot withdraw a task once handed over. So each task's
wrapper (``worker.py``) sends a signed datagram when it starts, received here, and claims the
task with a locked file ``control/TASK.ATTEMPT.run`` (``host pid``) while it runs. To cancel,
the engine writes ``control/TASK.cancel`` *first* and looks at the claims *after*; the wrapper
claims first and looks for the marker after. So either the task never starts, or the engine
finds the claim locked and kills that worker and all it started, when it runs on this host
(a worker elsewhere runs to completion; its result is dropped). The same kill ends the worker
of an attempt Parsl lost, which lives on, orphaned, until its task ends.
"""

from __future__ import annotations

import asyncio
import fcntl
import hmac
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .worker import control_file, signature

log = logging.getLogger("tether.endpoint.parsl")

#: (task id, pid, host, unix time) of a task that started on a worker
OnStarted = Callable[[str, int, str, float], None]


class RunningChannel(asyncio.DatagramProtocol):
    """Receives the workers' RUNNING datagrams; drops any whose HMAC under ``key`` is wrong."""

    def __init__(self, key: bytes, on_started: OnStarted):
        self.key = key
        self.on_started = on_started

    def datagram_received(self, data: bytes, addr: Any) -> None:
        mac, msg = data[:16], data[16:]
        if not hmac.compare_digest(mac, signature(self.key, msg)):
            return
        try:
            task_id, pid, host, ts = msg.decode().split("|")
            pid_i, ts_f = int(pid), float(ts)
        except ValueError:
            return
        self.on_started(task_id, pid_i, host, ts_f)


class ControlFiles:
    """The engine's half of the cancel protocol, in one run's ``control`` directory."""

    def __init__(self, directory: Path, host: str):
        self.dir = directory
        self.host = host
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        for stale in directory.iterdir():  # markers of a previous run
            stale.unlink(missing_ok=True)

    def check(self, task_id: str) -> None:
        """Raise InvalidIdentifier for an id that could name a file outside the directory."""
        control_file(self.dir, task_id, "")

    def withdraw(self, task_id: str, attempts: int) -> None:
        """Cancel a task handed to Parsl: the marker first, then kill a worker that claimed it."""
        try:
            control_file(self.dir, task_id, ".cancel").write_text("")
        except OSError as exc:
            log.warning("cannot write cancel marker for %s: %s", task_id, exc)
        self.kill_attempts(task_id, attempts)

    def forget(self, task_id: str) -> None:
        """Parsl let go of a withdrawn task: its marker goes."""
        control_file(self.dir, task_id, ".cancel").unlink(missing_ok=True)

    def kill_attempts(self, task_id: str, attempts: int) -> None:
        """Kill the workers on this host running any of the task's first ``attempts`` attempts
        (an earlier, lost attempt may still run too)."""
        for attempt in range(attempts):
            self._kill_claimed(control_file(self.dir, task_id, f".{attempt}.run"))

    def _kill_claimed(self, claim: Path) -> None:
        """Kill the worker that holds ``claim`` locked (it runs the task right now), if it is on this host."""
        try:
            fh = open(claim)  # noqa: SIM115
        except OSError:
            return  # not started (it will see the marker), or finished
        with fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return  # not locked: finished, or between open and lock (it will see the marker)
            except OSError:
                pass
            host, _, pid = fh.read().partition(" ")
            if host != self.host:
                log.warning(
                    "task on host %s cannot be killed from here; it runs to completion, its result is dropped", host
                )
                return
            try:
                _kill_worker(int(pid), claim)
            except ValueError:
                pass


def _kill_worker(pid: int, claim: Path | None = None) -> None:
    """Kill a Parsl worker process of this host and everything it started: a child of a
    worker pool, or (its pool lost) an orphan that still holds the task's ``claim`` lock."""
    try:
        import psutil

        proc = psutil.Process(pid)
        parent = proc.parent()
        in_pool = parent is not None and "process_worker_pool" in " ".join(parent.cmdline())
        if proc.uids().real != os.getuid() or not (in_pool or (claim is not None and _holds_flock(pid, claim))):
            log.warning("pid %s is not a Parsl worker of ours; not killing it", pid)
            return
        victims = [proc, *proc.children(recursive=True)]
    except Exception as exc:  # noqa: BLE001 - gone already
        log.info("worker %s not killed: %s", pid, exc)
        return
    own_group = os.getpgid(pid)
    for p in victims:
        try:
            if p.pid != pid and p.pid != own_group and os.getpgid(p.pid) == p.pid:
                os.killpg(p.pid, signal.SIGKILL)  # a group it started (a shell command and its children)
            p.kill()
        except Exception:  # noqa: BLE001 - already gone
            pass


def _holds_flock(pid: int, path: Path) -> bool:
    """Whether process ``pid`` holds a flock on ``path`` (Linux ``/proc/locks``; False elsewhere):
    proof that an orphaned process is the worker that claimed a task, not a reused pid."""
    try:
        inode = os.stat(path).st_ino
        with open("/proc/locks") as fh:
            for line in fh:
                fields = line.split()
                # "1: FLOCK  ADVISORY  WRITE 1234 00:2a:5678 0 EOF" ("->" marks a waiter)
                if len(fields) < 6 or fields[1] != "FLOCK" or "->" in fields:
                    continue
                if int(fields[4]) == pid and int(fields[5].rsplit(":", 1)[1]) == inode:
                    return True
    except (OSError, ValueError, IndexError):
        return False
    return False
