"""Engines run tasks for the endpoint daemon: ``thread`` and ``process`` on one host, ``htex`` and
``mpi`` through Parsl. ``base`` says what an engine is; this package knows which exist."""

from __future__ import annotations

from typing import Any

from .base import Engine, OnResult, OnRunning, TaskSpec


def make_engine(config: dict[str, Any], on_running: OnRunning, on_result: OnResult, **kwargs: Any) -> Engine:
    """Build the engine named by ``config['type']``."""
    kind = config.get("type", "process")
    if kind == "thread":
        from .thread import ThreadEngine

        return ThreadEngine(config, on_running, on_result, **kwargs)
    if kind == "process":
        from .process import ProcessEngine

        return ProcessEngine(config, on_running, on_result, **kwargs)
    if kind in ("htex", "mpi"):
        if kwargs.get("state_dir") is not None and config.get("outlive_daemon", True):
            from .parsl.hosted import HostedParslEngine  # Parsl runs in the engine host (parsl/host.py)

            return HostedParslEngine(config, on_running, on_result, **kwargs)
        from .parsl.engine import HtexEngine, MPIEngine  # on demand: Parsl is an optional extra

        return (HtexEngine if kind == "htex" else MPIEngine)(config, on_running, on_result, **kwargs)
    raise ValueError(f"unknown engine type {kind!r}")


__all__ = ["Engine", "TaskSpec", "make_engine"]
