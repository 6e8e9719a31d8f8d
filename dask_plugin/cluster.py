"""``TetherCluster``: a Dask cluster whose computation runs on a Tether endpoint.

Two modes (see ``docs/dask.md``):

``mode="proxy"`` (default)
    Scheduler and one proxy worker run in this process; every task goes through the Tether
    service to the endpoint and its result comes back the same way. Needs no inbound
    connectivity to anything: a laptop can drive a firewalled cluster. Concurrency follows the
    endpoint's capacity.
``mode="workers"``
    Scheduler here, real ``dask worker`` processes started as long-running tasks on the
    endpoint (``scale``/``adapt``); they connect to the scheduler, so the endpoint's nodes must
    reach it. Data moves worker to worker, as in any Dask cluster.
"""

from __future__ import annotations

import asyncio
import datetime
import html
import logging
import math
import warnings
from typing import Any

import dask
import distributed
from distributed import Scheduler
from distributed.core import Status
from distributed.deploy.spec import SpecCluster
from tornado.ioloop import PeriodicCallback

from tether import Client, EndpointOffline, Executor, VersionMismatch
from tether.ids import check_id
from tether.versions import Needed, differences

from .proxy import ProxyWorker
from .workers import EndpointWorker

MODES = ("proxy", "workers")
#: what must agree between this side and the endpoint: Dask's task objects are pickled on one side
#: and unpickled on the other (the endpoint must have dask and distributed at all)
NEEDED = (Needed("python", required=False), Needed("dask"), Needed("distributed"),
          Needed("cloudpickle", required=False))
#: proxy-mode concurrency when the endpoint reports no workers yet (elastic blocks not started)
DEFAULT_CONCURRENCY = 8


def check_versions(endpoint_versions: dict[str, str], endpoint_name: str) -> None:
    """Raise :class:`VersionMismatch` naming every difference that breaks Dask's task objects."""
    found = differences(NEEDED, endpoint_versions)
    missing = [d.package for d in found if d.there is None]
    if missing:
        raise VersionMismatch(
            f"endpoint {endpoint_name!r} has no {' or '.join(missing)} installed; the Dask plugin runs Dask's "
            f"task objects there: install dask=={dask.__version__} distributed=={distributed.__version__} in "
            f"the endpoint's environment (pip install 'tether[endpoint,dask]') and restart it")
    diffs = [f"{d.package} {d.here} here, {d.there} on the endpoint" for d in found]
    if diffs:
        raise VersionMismatch(
            f"endpoint {endpoint_name!r} runs different versions: {'; '.join(diffs)}. Dask task objects are "
            f"pickled between the two sides and need the same versions: install matching ones on either side")


def _seconds(value: float | str | None, what: str, zero_ok: bool = False) -> float | None:
    if value is None:
        return None
    try:
        seconds = dask.utils.parse_timedelta(value, default="s")
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{what} must be seconds or a duration like '55m', not {value!r}") from None
    if seconds is None or seconds < 0 or (seconds == 0 and not zero_ok):
        raise ValueError(f"{what} must be positive, not {value!r}")
    return float(seconds)


class TetherCluster(SpecCluster):
    """A Dask cluster on a Tether endpoint: ``Client(TetherCluster(endpoint_id=EP))``.

    Args:
        endpoint_id: the endpoint that runs the work; it must be online.
        mode: ``"proxy"`` (default, no inbound connectivity) or ``"workers"``.
        service, token: the Tether service (default: the environment / ``$TETHER_HOME``).
        concurrency: proxy mode: tasks in flight on the endpoint. Default: ``oversubscribe``
            times the endpoint's workers, so a worker never waits for the round trip.
        oversubscribe: see ``concurrency``.
        n_workers: worker mode: workers to start now (then ``scale``/``adapt``).
        worker_nthreads, worker_memory_limit: worker mode: each ``dask worker``'s threads and memory.
        lifetime: worker mode: each worker drains and exits after this long (seconds or ``"55m"``);
            set it below the walltime of the blocks the endpoint runs workers in.
        lifetime_stagger: spread of the lifetimes, so workers do not all leave at once.
        lifetime_restart: start a successor when a worker leaves at its lifetime (default True).
        death_timeout: worker mode: a worker that cannot reach the scheduler gives up (and says
            so) after this long.
        worker_extra_args: more ``dask worker`` options.
        scheduler_options: passed to ``distributed.Scheduler`` (``host``, ``port``,
            ``contact_address``, ``dashboard_address``, ...). Proxy mode listens on 127.0.0.1 only.
        worker_options: proxy mode: more ``distributed.Worker`` options for the proxy worker.
        user_endpoint_config, resource_specification: passed with every task (multi-user endpoints).
        asynchronous, loop, name, silence_logs: as for Dask's ``LocalCluster``.
    """

    def __init__(
        self,
        endpoint_id: str,
        *,
        mode: str = "proxy",
        service: str | None = None,
        token: str | None = None,
        concurrency: int | None = None,
        oversubscribe: int = 4,
        n_workers: int = 0,
        worker_nthreads: int = 1,
        worker_memory_limit: str = "auto",
        lifetime: float | str | None = None,
        lifetime_stagger: float | str = 0,
        lifetime_restart: bool = True,
        death_timeout: float | str = 120,
        worker_extra_args: tuple[str, ...] | list[str] = (),
        scheduler_options: dict[str, Any] | None = None,
        worker_options: dict[str, Any] | None = None,
        user_endpoint_config: dict[str, Any] | None = None,
        resource_specification: dict[str, Any] | None = None,
        asynchronous: bool = False,
        loop: Any = None,
        name: str | None = None,
        silence_logs: int | bool = logging.WARN,
        **kwargs: Any,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, not {mode!r}")
        for key, value in (("concurrency", concurrency), ("oversubscribe", oversubscribe),
                           ("worker_nthreads", worker_nthreads)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{key} must be a positive integer, not {value!r}")
        if not isinstance(n_workers, int) or n_workers < 0:
            raise ValueError(f"n_workers must be a non-negative integer, not {n_workers!r}")
        if mode == "proxy" and n_workers:
            raise ValueError("n_workers is for mode='workers'; in proxy mode concurrency follows the endpoint's "
                             "capacity (or pass concurrency=N)")
        self.endpoint_id = check_id(endpoint_id, "endpoint id")
        self.mode = mode
        self._concurrency_arg = concurrency
        self.oversubscribe = oversubscribe
        self._rest = Client(service=service, token=token)
        self.endpoint: dict[str, Any] = self._describe_endpoint()  # unknown/offline/mismatch: fails here, in words
        self.tether = Executor(endpoint_id=self.endpoint_id, service=service, token=token,
                               user_endpoint_config=user_endpoint_config,
                               resource_specification=resource_specification)
        self._early_logs: list[str] = []  # Cluster._log works once the base class is set up
        self.concurrency = concurrency or (self._concurrency_from_capacity() if mode == "proxy" else 0)

        scheduler_options = dict(scheduler_options or {})
        if mode == "proxy":
            scheduler_options.setdefault("host", "127.0.0.1")
        scheduler_options.setdefault("dashboard_address", ":0")
        scheduler = {"cls": Scheduler, "options": scheduler_options}
        if mode == "proxy":
            proxy = {"cls": ProxyWorker, "options": {"tether_executor": self.tether, "nthreads": self.concurrency,
                                                     **(worker_options or {})}}
            workers: dict[str, Any] = {"tether-proxy": proxy}
            new_spec: dict[str, Any] = proxy
        else:
            options = {"tether_executor": self.tether, "nthreads": worker_nthreads,
                       "memory_limit": worker_memory_limit,
                       "lifetime": _seconds(lifetime, "lifetime"),
                       "lifetime_stagger": _seconds(lifetime_stagger, "lifetime_stagger", zero_ok=True) or 0.0,
                       "lifetime_restart": lifetime_restart,
                       "death_timeout": _seconds(death_timeout, "death_timeout"),
                       "extra_args": tuple(worker_extra_args), "log": self._log}
            workers, new_spec = {}, {"cls": EndpointWorker, "options": options}
        try:
            super().__init__(workers=workers, scheduler=scheduler, worker=new_spec, asynchronous=asynchronous,
                             loop=loop, name=name, silence_logs=silence_logs, **kwargs)
        except BaseException:
            self.tether.shutdown(wait=False, cancel_futures=True)
            self._rest.close()
            raise
        # routine facts go to get_logs() only (Cluster._log also prints, which is for problems)
        for message in [*self._early_logs, f"{self._endpoint_summary()}; versions match"
                        + (f"; {self.concurrency} tasks in flight" if mode == "proxy" else "")]:
            self._cluster_manager_logs.append((datetime.datetime.now(), message))
        if mode == "workers" and n_workers:
            self.scale(n_workers)

    # --- the endpoint --------------------------------------------------------------------------
    def _describe_endpoint(self) -> dict[str, Any]:
        info = self._rest.require_online(self.endpoint_id)  # UnknownEndpoint / EndpointOffline, in words
        check_versions(info.get("status", {}).get("versions", {}), info.get("name", self.endpoint_id))
        return info

    @property
    def capacity(self) -> dict[str, Any]:
        """The endpoint's capacity as of its last heartbeat seen here (``refresh_endpoint`` updates it)."""
        return dict(self.endpoint.get("status", {}).get("capacity", {}))

    def refresh_endpoint(self) -> dict[str, Any]:
        """Ask the service for the endpoint's state now (online, capacity, versions)."""
        info = self._rest.get_endpoint(self.endpoint_id)
        if not info["online"]:
            raise EndpointOffline(f"endpoint {self.endpoint_id} ({info['name']}) is offline")
        self.endpoint = info
        return info

    def _concurrency_from_capacity(self) -> int:
        total = int(self.capacity.get("workers_total") or 0)
        if total <= 0:
            self._early_logs.append(f"endpoint reports no workers yet (elastic blocks?): {DEFAULT_CONCURRENCY} "
                                    f"tasks in flight")
            return DEFAULT_CONCURRENCY
        return max(1, math.ceil(total * self.oversubscribe))

    # --- scaling -------------------------------------------------------------------------------
    def scale(self, n: int = 0, memory: str | None = None, cores: int | None = None) -> Any:
        """Worker mode: run ``n`` Dask workers on the endpoint. Proxy mode has one proxy worker whose
        concurrency follows the endpoint: ``scale`` only warns (scale the endpoint instead)."""
        if self.mode == "proxy" and self.status not in (Status.closing, Status.closed):
            warnings.warn(f"TetherCluster(mode='proxy') runs tasks at the endpoint's capacity "
                          f"({self.concurrency} in flight); scale(...) does nothing. Scale the endpoint (its "
                          f"engine's workers or blocks), pass concurrency=N, or use mode='workers'.", stacklevel=2)
            return None
        return super().scale(n, memory=memory, cores=cores)

    def adapt(self, *args: Any, **kwargs: Any) -> Any:
        """Worker mode: Dask's adaptive scaling of the endpoint's workers. Proxy mode: warns, does nothing."""
        if self.mode == "proxy":
            warnings.warn("TetherCluster(mode='proxy') follows the endpoint's capacity; adapt() does nothing "
                          "(an elastic endpoint adapts its own blocks). Use mode='workers' for Dask's adapt.",
                          stacklevel=2)
            return None
        return super().adapt(*args, **kwargs)

    # --- lifecycle -----------------------------------------------------------------------------
    async def _start(self) -> None:
        await super()._start()
        if self.mode == "workers":
            # reconcile: a worker whose task ended cleanly (its lifetime) but has no successor is started again
            self.periodic_callbacks["tether-reconcile"] = pc = PeriodicCallback(self._reconcile, 2000)
            pc.start()

    async def _reconcile(self) -> None:
        if self.status != Status.running:
            return
        # only workers that ended cleanly: one that failed (cannot reach the scheduler) would fail again
        gone = [n for n, w in self.workers.items()
                if isinstance(w, EndpointWorker) and w.status == Status.closed and w.error is None]
        for n in gone:
            del self.workers[n]
        if gone:
            await self._correct_state()

    async def _close(self) -> None:
        try:
            await super()._close()
        finally:
            await asyncio.to_thread(self._release_tether)

    def _release_tether(self) -> None:
        self.tether.shutdown(wait=False, cancel_futures=True)
        self._rest.close()

    # --- what users see ------------------------------------------------------------------------
    @property
    def proxy_worker(self) -> ProxyWorker | None:
        """The proxy worker (proxy mode), for its counters: ``endpoint_executor.counts``."""
        worker = self.workers.get("tether-proxy")
        return worker if isinstance(worker, ProxyWorker) else None

    def _endpoint_summary(self) -> str:
        cap = self.capacity
        return (f"endpoint={self.endpoint.get('name', '?')!r} ({self.endpoint_id}), mode={self.mode!r}, "
                f"endpoint workers={cap.get('workers_total', '?')} (idle {cap.get('workers_idle', '?')})")

    def __repr__(self) -> str:
        base = super().__repr__()
        return f"{base[:-1]}, {self._endpoint_summary()})" if base.endswith(")") else base

    def _repr_html_(self, cluster_status: str | None = None) -> str:
        cap = self.capacity
        rows = [("Endpoint", f"{self.endpoint.get('name', '?')} ({self.endpoint_id})"), ("Mode", self.mode),
                ("Endpoint workers", f"{cap.get('workers_total', '?')} total, {cap.get('workers_idle', '?')} idle"),
                ("Tasks on endpoint", f"{cap.get('tasks_running', '?')} running, {cap.get('tasks_queued', '?')} "
                                      f"queued")]
        if self.mode == "proxy":
            rows.append(("Tasks in flight (max)", str(self.concurrency)))
        table = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th><td style='text-align:left'>"
                        f"{html.escape(str(v))}</td></tr>" for k, v in rows)
        status = f"<table>{table}</table>" + (cluster_status or "")
        return super()._repr_html_(cluster_status=status)
