"""Workers that outlive their daemon, and the next daemon that adopts what they run.

``tether endpoint restart`` (or an upgrade followed by one, or a daemon killed by SIGKILL) must
kill no running task and lose no result. A process-engine worker therefore runs in a session of
its own and, when its daemon goes away, *detaches* (engines/worker.py): it begins nothing more,
and when its task ends writes the result to ``workers/PID.result``, then exits. What it runs is
declared in ``workers/PID.adopt``: by the restarting daemon (ProcessEngine.detach), or by the
worker's watcher when the daemon died. Tasks it held but had not begun are not declared: the
service sends them again (they run once, on the next daemon's workers).

The engine records each worker it starts here (``workers/PID``, whose mtime tells a live worker
from a later process that got its pid). A starting engine collects the workers an earlier daemon
left: it waits (briefly) until each live one has declared, reports their tasks as held (so the
service neither sends them again nor waits for them), watches for their results, and starts
only as many fresh workers as the machine had beside the adopted ones, one more as each ends.

Files, not a socket to a long-lived host process: no hop is added to a task's way while the
daemon runs (a worker writes here only when its daemon is gone), and a file written by an old
version's worker is read by a new version's daemon (the result is a ``tether.results.pack``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from tether.processes import process_command, process_start_time
from tether.protocol import Result
from tether.results import failure, unpack

log = logging.getLogger("tether.endpoint.adoption")

#: seconds a starting engine waits for a live worker of a killed daemon to declare what it runs
#: (its watcher looks every worker.PARENT_CHECK_S)
DECLARE_WAIT_S = 5.0
#: seconds between looks at adopted workers (their results, their ends)
POLL_S = 0.2
#: how much later than its record a worker may seem to have started (boot time is whole seconds)
_START_SLACK_S = 1.0


class AdoptedWorkerLost(RuntimeError):
    """An adopted worker ended without leaving its task's result (killed, out of memory)."""


@dataclass
class Orphan:
    """A worker a previous daemon left, running ``task`` (None: it was idle)."""

    pid: int
    task: str | None


class WorkerRecords:
    """``workers/`` in the endpoint's directory: which workers exist, what the orphans run."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)

    def record(self, pid: int) -> None:
        (self.dir / str(pid)).touch()

    def forget(self, pid: int) -> None:
        for suffix in ("", ".adopt", ".result", ".adopt.tmp", ".result.tmp"):
            (self.dir / f"{pid}{suffix}").unlink(missing_ok=True)

    def alive(self, pid: int) -> bool:
        """Whether the worker recorded as ``pid`` still runs (not a later process with its pid)."""
        started = process_start_time(pid)
        try:
            recorded = (self.dir / str(pid)).stat().st_mtime
        except FileNotFoundError:
            return False
        # (a zombie has no command line: an orphan whose new parent does not reap it has ended)
        return started is not None and started <= recorded + _START_SLACK_S and process_command(pid) is not None

    def recorded(self) -> list[int]:
        return sorted(int(p.name) for p in self.dir.iterdir() if p.name.isdigit())

    def declaration(self, pid: int) -> Orphan | None:
        try:
            data = json.loads((self.dir / f"{pid}.adopt").read_text())
        except (FileNotFoundError, ValueError):
            return None
        return Orphan(pid, data.get("task"))

    def result(self, pid: int) -> Result | None:
        try:
            return unpack((self.dir / f"{pid}.result").read_bytes())
        except FileNotFoundError:
            return None

    async def collect(self) -> tuple[list[Orphan], list[Result]]:
        """The workers an earlier daemon left (once each has declared) and the results of those
        that ended since; records of workers gone without a trace are dropped."""
        deadline = time.monotonic() + DECLARE_WAIT_S
        orphans: list[Orphan] = []
        results: list[Result] = []
        undeclared = self.recorded()
        while undeclared:
            waiting = []
            for pid in undeclared:
                done = self.result(pid)
                if done is not None:
                    results.append(done)
                    self.forget(pid)
                    continue
                if not self.alive(pid):
                    self.forget(pid)  # idle when its daemon went (or a record from before a reboot)
                    continue
                declared = self.declaration(pid)
                if declared is not None:
                    done = self.result(pid)  # (written before a declaration that names no task)
                    if done is not None:
                        results.append(done)
                        self.forget(pid)
                    elif declared.task is None:  # idle: it ends with its pipe
                        self.forget(pid)
                    else:
                        orphans.append(declared)
                    continue
                waiting.append(pid)
            undeclared = waiting
            if undeclared and time.monotonic() > deadline:
                # alive, silent: a worker of a version that does not detach, or hung. Its task (if
                # any) is not adopted: the service sends it again, as before adoption existed
                log.warning("workers %s left by the previous daemon did not say what they run; ending them",
                            undeclared)
                for pid in undeclared:
                    kill_group(pid)
                    self.forget(pid)
                break
            if undeclared:
                await asyncio.sleep(POLL_S)
        return orphans, results

    def ended(self, orphan: Orphan) -> Result | None:
        """``orphan``'s result once it has one; a failure if it ended without; None while it runs."""
        done = self.result(orphan.pid)
        if done is None and self.alive(orphan.pid):
            return None
        self.forget(orphan.pid)
        if done is not None:
            return done
        assert orphan.task is not None
        return failure(orphan.task, AdoptedWorkerLost(
            f"the worker process (pid {orphan.pid}) running this task across an endpoint restart ended "
            "without a result (killed, or out of memory?)"))


def kill_group(pid: int) -> None:
    """Kill a worker and what its task started (it leads its own process group)."""
    for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            kill()
            return
        except (ProcessLookupError, PermissionError, OSError):
            continue


__all__ = ["AdoptedWorkerLost", "Orphan", "WorkerRecords", "kill_group"]
