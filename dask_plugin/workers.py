"""Worker mode: real ``dask worker`` processes, started as long-running tasks on the endpoint.

Each worker of the cluster's spec is an :class:`EndpointWorker` (a ``ProcessInterface``, like
dask-jobqueue's ``Job``): ``start`` submits :func:`tether.dask.remote.run_dask_worker`, ``close``
cancels that task, which kills the worker process on the endpoint. The endpoint's engine decides
where it runs (a local process, a Slurm block through the ``htex`` engine). The workers connect to
the scheduler directly, so the endpoint's nodes must be able to reach it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from distributed.core import Status
from distributed.deploy.spec import ProcessInterface

from tether import Executor, TaskCancelled, TetherFuture

from . import remote

logger = logging.getLogger("tether.dask")


class EndpointWorker(ProcessInterface):
    """One Dask worker, kept running on the endpoint.

    With ``lifetime`` set the worker drains and exits before its block's walltime; with
    ``lifetime_restart`` a fresh one is started on the endpoint right away, so the cluster keeps
    its size across walltimes (dask-jobqueue users get this only with ``adapt``).
    """

    def __init__(self, scheduler: str, name: str, *, tether_executor: Executor, nthreads: int = 1,
                 memory_limit: str = "auto", lifetime: float | None = None, lifetime_stagger: float = 0.0,
                 lifetime_restart: bool = True, death_timeout: float = 120.0, nanny: bool = False,
                 extra_args: tuple[str, ...] = (), log: Callable[[str], None] | None = None):
        super().__init__(scheduler=scheduler, name=name)
        self.scheduler = scheduler
        self.name = name
        self.tether = tether_executor
        self.options: dict[str, Any] = {
            "nthreads": nthreads, "memory_limit": memory_limit, "lifetime": lifetime,
            "lifetime_stagger": lifetime_stagger, "death_timeout": death_timeout, "nanny": nanny,
            "extra_args": list(extra_args),
        }
        self.lifetime_restart = lifetime_restart
        self.task: TetherFuture | None = None
        self.runs: list[dict[str, Any]] = []  # what each finished run reported (host, log tail)
        self.error: BaseException | None = None  # why the last run failed, if it did
        self._log = log or logger.info
        self._supervisor: asyncio.Task | None = None

    def __repr__(self) -> str:
        task = self.task.task_id if self.task is not None else None
        return f"<EndpointWorker {self.name!r}: status={self.status.name}, task={task}>"

    def _submit(self) -> TetherFuture:
        return self.tether.submit_task(remote.run_dask_worker, (self.scheduler, self.name), self.options)

    async def start(self) -> None:
        self.task = self._submit()
        self._supervisor = asyncio.create_task(self._supervise())
        await super().start()

    async def _supervise(self) -> None:
        """Follow the worker's task; after a clean exit (its lifetime) start the next one."""
        while True:
            task = self.task
            assert task is not None
            try:
                info = await asyncio.wrap_future(task)
            except (TaskCancelled, asyncio.CancelledError):
                return
            except Exception as exc:  # the worker process failed (cannot reach the scheduler, crashed)
                self.error = exc
                self._log(f"Dask worker {self.name} failed on the endpoint (task {task.task_id}): {exc}")
                break
            self.runs.append(info)
            if not self.lifetime_restart or self.status != Status.running:
                self._log(f"Dask worker {self.name} finished on {info['host']} (task {task.task_id})")
                break
            self._log(f"Dask worker {self.name} reached its lifetime on {info['host']}; starting its successor")
            self.task = self._submit()
        self.status = Status.closed
        self._event_finished.set()

    async def close(self) -> None:
        """Kill the worker on the endpoint (the cluster retired it gracefully before, if it could)."""
        self.status = Status.closing
        if self.task is not None and not self.task.done():
            self.task.cancel()
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        await super().close()
