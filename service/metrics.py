"""Prometheus metrics, read from the relay at scrape time (nothing is counted twice on the hot path)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .relay import Relay


class RelayCollector:
    """Endpoints online, their workers, and task events handled by this replica."""

    def __init__(self, relay: Relay):
        self.relay = relay

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("tether_endpoints_online", "Endpoints connected to this service replica.",
                                value=len(self.relay.endpoints))
        workers = GaugeMetricFamily("tether_endpoint_workers", "Workers of connected endpoints (last heartbeat).",
                                    labels=["endpoint", "kind"])
        for endpoint_id, session in self.relay.endpoints.items():
            capacity = session.status.get("capacity") or {}
            for kind in ("workers_total", "workers_idle", "tasks_queued", "tasks_running"):
                if isinstance(capacity.get(kind), int):
                    workers.add_metric([endpoint_id, kind], capacity[kind])
        yield workers
        events = CounterMetricFamily("tether_task_events", "Task events handled by this replica since it started.",
                                     labels=["event"])
        for name, value in sorted(self.relay.counters.items()):
            events.add_metric([name], value)
        yield events
        yield GaugeMetricFamily("tether_tasks_watched", "Tasks whose results connected clients are waiting for.",
                                value=len(self.relay.watchers))


def make_registry(relay: Relay) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RelayCollector(relay))  # type: ignore[arg-type]
    return registry


def render(registry: CollectorRegistry) -> tuple[bytes, dict[str, Any]]:
    return generate_latest(registry), {"Content-Type": CONTENT_TYPE_LATEST}
