"""What one service process is made of: its :class:`Settings` and the parts built from them
(store, relay, authenticator, blob index), held in one :class:`Services` on the application.

The routes (``service/routes/``) are module-level ``APIRouter``\\ s, so several applications can
live in one process (the tests start a few); each request reaches its own application's parts
through the :func:`services` dependency.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from prometheus_client import CollectorRegistry
from starlette.requests import HTTPConnection

from tether.protocol import DEFAULT_BLOB_THRESHOLD, DEFAULT_PREFETCH, FrameDecoder

from .async_store import DEFAULT_DB_THREADS, AsyncStore
from .auth import Authenticator, GlobusSettings
from .blobs.index import DEFAULT_MAX_BLOB, DEFAULT_ORPHAN_S, DEFAULT_QUOTA, BlobIndex
from .models import DashboardInfo
from .outbound import DEFAULT_MAX_QUEUED, DEFAULT_SEND_TIMEOUT
from .relay import Relay
from .store import Store


@dataclass
class Settings:
    """Service configuration; every field has a working embedded default."""

    db_url: str = "sqlite:///tether.db"
    max_payload_bytes: int = 64 * 1024 * 1024
    result_retention_s: float = 7 * 24 * 3600  # kept this long after the client collected them
    uncollected_retention_s: float = 30 * 24 * 3600  # results nobody collects expire this long after the task ends
    purge_interval_s: float = 600
    prefetch: int = DEFAULT_PREFETCH  # tasks an endpoint is sent beyond its workers (flow control)
    #: tasks a user may have without a result (waiting, dispatched, running); more are refused
    max_open_tasks_per_user: int = 2_000_000
    #: bytes of function bodies a user may keep, and how long one no stored task names is kept
    function_quota_bytes: int = 1024 * 1024 * 1024
    function_retention_s: float = 30 * 24 * 3600
    credential_check_s: float = 1.0
    #: Globus Auth: accept Globus access tokens as well as the service's own (None: only its own)
    globus: GlobusSettings | None = None
    #: large payloads (service/blobs/): where blob files live, what travels as a blob, the limits
    blob_dir: str | None = None  # None: $TETHER_HOME/service/blobs (never the working directory)
    blob_threshold_bytes: int = DEFAULT_BLOB_THRESHOLD
    max_blob_bytes: int = DEFAULT_MAX_BLOB
    blob_quota_bytes: int = DEFAULT_QUOTA  # per user: bytes of blobs stored at once
    blob_orphan_s: float = DEFAULT_ORPHAN_S  # a blob no task names is deleted this long after it was declared
    #: RabbitMQ (amqp://...) when several replicas share one database (``broker_url`` in
    #: service.yaml); None: one process
    broker_url: str | None = None
    #: this process's name among the replicas (default: random); shows in logs and queue names
    replica_id: str | None = None
    #: with a broker: the URL at which clients reach this replica itself (clients are told it with
    #: the endpoints held here, and send those endpoints' tasks here directly); None: never told
    advertise_url: str | None = None
    #: threads (database connections) per process for a database other than SQLite
    db_threads: int = DEFAULT_DB_THREADS
    #: bytes that may wait for one peer that reads slowly, and how long it may take one frame,
    #: before it is dropped (service/outbound.py)
    max_queued_bytes_per_connection: int = DEFAULT_MAX_QUEUED
    send_timeout_s: float = DEFAULT_SEND_TIMEOUT


@dataclass
class Services:
    """The parts of one service process that its routes share."""

    settings: Settings
    store: Store
    db: AsyncStore
    relay: Relay
    authenticator: Authenticator
    blob_index: BlobIndex
    metrics: CollectorRegistry
    max_frame: int  # the largest frame accepted (what Welcome announces)
    blob_threshold: int  # what peers send as blobs: never more than an inline payload may be
    client_frames: FrameDecoder
    endpoint_frames: FrameDecoder
    started: float = field(default_factory=time.time)
    #: user -> (when, view): the dashboard reads the store at most once per user per second
    dashboard_views: dict[str, tuple[float, DashboardInfo]] = field(default_factory=dict)


def services_of(connection: HTTPConnection) -> Services:
    """The parts of the application a request or WebSocket arrived at."""
    services: Any = connection.app.state.services
    return services


async def services(request: Request) -> Services:
    """Dependency: this application's :class:`Services`. Async on purpose: sync dependencies
    run in a thread pool, and the store's connection must only be used from the event loop."""
    return services_of(request)
