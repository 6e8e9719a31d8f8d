"""Prometheus metrics, read from the relay at scrape time (nothing is counted twice on the hot path)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .blobs.raw_transfer import raw_in_use
from .relay import Relay


class RelayCollector:
    """Endpoints online, their workers, and task events handled by this replica."""

    def __init__(self, relay: Relay):
        self.relay = relay

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("tether_endpoints_online", "Endpoints connected to this service replica.",
                                value=len(self.relay.endpoints))
        # summed over endpoints: /metrics is unauthenticated, so it names no endpoint or user
        workers = GaugeMetricFamily("tether_endpoint_workers", "Workers and tasks of connected endpoints "
                                    "(last heartbeats, summed).", labels=["kind"])
        kinds = ("workers_total", "workers_idle", "tasks_queued", "tasks_running")
        totals = dict.fromkeys(kinds, 0)
        for session in self.relay.endpoints.values():
            capacity = session.status.get("capacity") or {}
            for kind in kinds:
                if isinstance(capacity.get(kind), int):
                    totals[kind] += capacity[kind]
        for kind, value in totals.items():
            workers.add_metric([kind], value)
        yield workers
        events = CounterMetricFamily("tether_task_events", "Task events handled by this replica since it started.",
                                     labels=["event"])
        for name, value in sorted(self.relay.counters.items()):
            events.add_metric([name], value)
        yield events
        yield GaugeMetricFamily("tether_tasks_watched", "Tasks whose results connected clients are waiting for.",
                                value=len(self.relay.watchers))
        raw = GaugeMetricFamily("tether_blob_raw_transfers", "Large blob transfers moving on their own socket in a "
                                "thread of this replica (RAW_THREADS per direction; more go through ASGI).",
                                labels=["direction"])
        for direction, busy in raw_in_use().items():
            raw.add_metric([direction], busy)
        yield raw
        bus = self.relay.bus
        if bus.remote:  # several replicas: is the broker keeping up?
            messages = CounterMetricFamily("tether_bus_messages", "Events between replicas (RabbitMQ) since this "
                                           "replica started.", labels=["direction"])
            messages.add_metric(["published"], bus.published)
            messages.add_metric(["publish_failed"], bus.publish_failures)
            messages.add_metric(["received"], bus.received)
            yield messages


def make_registry(relay: Relay) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RelayCollector(relay))  # type: ignore[arg-type]
    return registry


def render(registry: CollectorRegistry) -> tuple[bytes, dict[str, Any]]:
    return generate_latest(registry), {"Content-Type": CONTENT_TYPE_LATEST}
