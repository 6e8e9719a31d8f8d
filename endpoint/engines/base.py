"""The engine interface: what the endpoint daemon needs from anything that runs tasks.

Engines are driven from the daemon's asyncio loop and report back through two callbacks,
which they must invoke *on that loop*: ``on_running(task_id, ts)`` when a task starts and
``on_result(result)`` with its :class:`tether.protocol.Result` (built with :mod:`tether.results`)
when it ends, for success, failure and cancellation alike. This module says only what an engine
is; the engines themselves (thread, process, and the Parsl-based htex and mpi) live beside it,
and ``engines/__init__.py`` knows which exist.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tether.endpoint.execute import Allowlist, TaskSpec
from tether.protocol import Result

OnRunning = Callable[[str, float], None]
OnResult = Callable[[Result], None]


class Engine(abc.ABC):
    """Runs tasks. Subclasses must not block the loop in any method."""

    #: whether this engine's workers run beside the daemon, reach the service as it does and
    #: may hold its credential: then they read large arguments from the service themselves
    #: (``tether.transfer.service_stub``) instead of from a file the daemon downloads first
    workers_read_blobs = False

    def __init__(self, config: dict[str, Any], on_running: OnRunning, on_result: OnResult,
                 allowed_methods: Allowlist | frozenset[str] | None = None, retries_on_worker_loss: int = 0,
                 python_sandbox: bool = False, state_dir: Path | None = None):
        self.config = config
        self.state_dir = state_dir  # the endpoint's directory: where workers that outlive the daemon say so
        self.python_sandbox = python_sandbox  # chdir into TaskSpec.sandbox for Python functions
        self.on_running = on_running
        self.on_result = on_result
        self.allowed_methods = allowed_methods
        self.retries_on_worker_loss = retries_on_worker_loss

    @abc.abstractmethod
    async def start(self) -> None: ...

    def engine_info(self) -> dict[str, Any]:
        """Facts handed to every task of this engine (see ``tether.runtime.TaskContext.engine``)."""
        info = {"type": self.config.get("type")}
        if self.config.get("mpi_launcher"):  # for MPIFunction (core/mpi.py)
            info["mpi_launcher"] = self.config["mpi_launcher"]
        return info

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop at once: kill what runs (the service re-dispatches it to the next run)."""

    async def detach(self) -> None:
        """The daemon restarts: leave what runs running for the next daemon to adopt (see
        engines/adoption.py). Engines that cannot stop instead (what runs is sent again)."""
        await self.stop()

    def adopted(self) -> set[str]:
        """Tasks this engine took over from a previous daemon at start (running, or ended with a
        result it will report): the daemon holds them, so the service neither resends them nor
        waits for them."""
        return set()

    def results_kept(self, ids: list[str]) -> None:
        """The daemon has spooled these results (it calls this for every result it spools): an
        engine that keeps results for a later daemon until then may forget them now."""
        return None

    @abc.abstractmethod
    def submit(self, task: TaskSpec) -> None: ...

    @abc.abstractmethod
    def cancel(self, task_id: str) -> None:
        """Cancel: a queued task must never start; a running one is killed. Report a cancelled result."""

    @abc.abstractmethod
    def capacity(self) -> dict[str, Any]:
        """Heartbeat figures: workers_total, workers_idle, tasks_queued, tasks_running (+ engine extras)."""


__all__ = ["Allowlist", "Engine", "OnResult", "OnRunning", "TaskSpec"]
