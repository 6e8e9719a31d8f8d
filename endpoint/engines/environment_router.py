"""Tasks that ask for an environment go to a pool of workers running in it; the rest to the
endpoint's engine.

The router wraps whatever engine the endpoint runs (thread, process, htex, mpi). A task whose
resource specification carries an environment request (:mod:`tether.environment`) waits while
the environment is built (once, see :mod:`tether.endpoint.environments`), then runs in that
environment's :class:`~.environment_pool.EnvironmentPool`, started on its first task and stopped
when it has been idle for ``idle_timeout_s``. Where the administrator has not enabled
environments, such a task fails at once, in words saying how to enable them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from tether.environment import ENVIRONMENT_KEY, EnvironmentRequest, parse_environment
from tether.errors import EnvironmentUnavailable, TetherError
from tether.protocol import Result
from tether.results import cancelled, failure

from ..config import EndpointConfig
from ..environments import EnvironmentCache, EnvironmentSettings, cache_for
from .base import Engine, TaskSpec
from .environment_pool import EnvironmentPool

log = logging.getLogger("tether.endpoint.environments")

#: seconds between checks for idle pools
IDLE_CHECK_S = 5.0


class EnvironmentRouter(Engine):
    def __init__(self, inner: Engine, settings: EnvironmentSettings, cache: EnvironmentCache,
                 config_path: str = "config.yaml"):
        super().__init__(inner.config, inner.on_running, inner.on_result, inner.allowed_methods,
                         inner.retries_on_worker_loss, inner.python_sandbox)
        self.inner = inner
        self.settings = settings
        self.cache = cache
        self.config_path = config_path
        self.pools: dict[str, EnvironmentPool] = {}
        self.last_used: dict[str, float] = {}  # environment key -> when a task last came or went
        self.touched: dict[str, float] = {}  # environment key -> when its directory was last touched
        self.waiting: dict[str, list[TaskSpec]] = {}  # environment key -> tasks waiting for its build
        self.placed: dict[str, str] = {}  # task id -> environment key, while it runs in a pool
        self._watcher: asyncio.Task[None] | None = None
        self._preparing: set[asyncio.Future[None]] = set()

    async def start(self) -> None:
        await self.inner.start()
        self._watcher = asyncio.ensure_future(self._stop_idle_pools())

    async def stop(self) -> None:
        await self._stop_pools()
        await self.inner.stop()

    async def _stop_pools(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        for job in list(self._preparing):
            job.cancel()
        self.cache.cancel_builds()
        for pool in list(self.pools.values()):
            await pool.stop()
        self.pools.clear()

    async def detach(self) -> None:
        """Environment pools stop (what they run is sent again); the engine's workers stay."""
        await self._stop_pools()
        await self.inner.detach()

    def adopted(self) -> set[str]:
        return self.inner.adopted()

    def results_kept(self, ids: list[str]) -> None:
        self.inner.results_kept(ids)

    def engine_info(self) -> dict[str, Any]:
        return self.inner.engine_info()

    @property  # type: ignore[override]
    def workers_read_blobs(self) -> bool:
        """As the wrapped engine's workers (an environment's pool runs on this host too)."""
        return self.inner.workers_read_blobs

    # --- dispatch -----------------------------------------------------------------------------
    def submit(self, task: TaskSpec) -> None:
        wanted = task.spec.get(ENVIRONMENT_KEY) if task.spec else None
        if wanted is None:
            self.inner.submit(task)
            return
        if not self.settings.enabled:
            self._fail(task.id, EnvironmentUnavailable(
                "this task asks for an environment (Python and packages of its own), but this endpoint does "
                "not build environments; its administrator can enable that with 'environments: {enabled: "
                f"true}}' in {self.config_path} (docs/endpoint-admin.md), or submit without environment="))
            return
        try:
            request = parse_environment(wanted)
        except TetherError as exc:
            self._fail(task.id, exc)
            return
        key = request.key()
        pool = self.pools.get(key)
        if pool is not None:
            self._run_in(key, pool, task)
            return
        first = key not in self.waiting
        self.waiting.setdefault(key, []).append(task)
        if first:
            job = asyncio.ensure_future(self._prepare(key, request))
            self._preparing.add(job)  # the loop holds tasks weakly: this keeps it alive until done
            job.add_done_callback(self._preparing.discard)

    async def _prepare(self, key: str, request: EnvironmentRequest) -> None:
        """Build (or find) the environment, start its pool, hand it the tasks that waited."""
        try:
            python = await self.cache.ensure(request)
            config = {"type": "process", "workers": self.settings.workers, "prefetch": 0}
            if self.inner.config.get("mpi_launcher"):  # an MPIFunction launches its ranks as the endpoint's would
                config["mpi_launcher"] = self.inner.config["mpi_launcher"]
            pool = EnvironmentPool(python, config,
                                   self.on_running, self._on_pool_result, self.allowed_methods,
                                   self.retries_on_worker_loss, self.python_sandbox)
            await pool.start()
        except Exception as exc:  # noqa: BLE001 - every waiting task fails with the reason
            if not isinstance(exc, TetherError):
                log.exception("preparing environment %s failed", key)
            for task in self.waiting.pop(key, []):
                self._fail(task.id, exc)
            return
        self.pools[key] = pool
        for task in self.waiting.pop(key, []):
            self._run_in(key, pool, task)
        await asyncio.to_thread(self.cache.evict, set(self.pools))

    def _run_in(self, key: str, pool: EnvironmentPool, task: TaskSpec) -> None:
        self.placed[task.id] = key
        self.last_used[key] = time.monotonic()
        pool.submit(task)

    def _on_pool_result(self, result: Result) -> None:
        key = self.placed.pop(result.id, None)
        if key is not None:
            now = self.last_used[key] = time.monotonic()
            if now - self.touched.get(key, 0.0) >= 1.0:  # the disk's record of use, once a second at most
                self.touched[key] = now
                self.cache.touch(key)
        self.on_result(result)

    def _fail(self, task_id: str, exc: BaseException) -> None:
        self.on_result(failure(task_id, exc))

    async def _stop_idle_pools(self) -> None:
        while True:
            await asyncio.sleep(min(IDLE_CHECK_S, self.settings.idle_timeout_s / 2))
            now = time.monotonic()
            for key, pool in list(self.pools.items()):
                if pool.idle() and now - self.last_used.get(key, now) >= self.settings.idle_timeout_s:
                    del self.pools[key]
                    log.info("stopping the workers of environment %s (idle for %.0f s)", key,
                             now - self.last_used[key])
                    await pool.stop()

    # --- cancellation and capacity ------------------------------------------------------------
    def cancel(self, task_id: str) -> None:
        for tasks in self.waiting.values():
            for task in tasks:
                if task.id == task_id:
                    tasks.remove(task)
                    self.on_result(cancelled(task_id, time.time()))
                    return
        key = self.placed.get(task_id)
        if key is not None and key in self.pools:
            self.pools[key].cancel(task_id)
            return
        self.inner.cancel(task_id)

    def capacity(self) -> dict[str, Any]:
        figures = dict(self.inner.capacity())
        if self.pools or self.waiting:
            running = sum(p.capacity()["tasks_running"] for p in self.pools.values())
            figures["tasks_running"] = figures.get("tasks_running", 0) + running
            figures["tasks_queued"] = (figures.get("tasks_queued", 0) + sum(len(t) for t in self.waiting.values())
                                       + sum(p.capacity()["tasks_queued"] for p in self.pools.values()))
            figures["environment_workers"] = sum(p.n_workers for p in self.pools.values())
        return figures


def with_environments(engine: Engine, config: EndpointConfig) -> Engine:
    """The endpoint's engine, with tasks that ask for an environment routed to one."""
    cache = cache_for(config)
    return EnvironmentRouter(engine, cache.settings, cache, cache.config_path)
