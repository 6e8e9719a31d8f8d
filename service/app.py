"""The service's HTTP application: REST control plane (OpenAPI at /openapi.json, docs at /docs),
the two WebSocket data-plane routes, /healthz and Prometheus /metrics.

:func:`create_app` builds one service process (store, relay, authenticator, blob index: a
:class:`~tether.service.context.Services`), assembles the routes (``service/routes/``, one
module per resource, plus the blob routes of ``blobs/routes.py``), and runs the background loops.
Routes stay thin: authentication and input validation there (every id checked against the one
definition in :mod:`tether.ids`, every frame decoded into a typed record by
:mod:`tether.protocol`), everything durable and every ownership rule in the relay
(:mod:`tether.service.relay`). Every answer a route can give is in the OpenAPI document.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from tether import __version__
from tether.home import tether_home
from tether.protocol import CLIENT_FRAMES, ENDPOINT_FRAMES, FrameDecoder, service_max_frame

from .async_store import AsyncStore
from .auth import Authenticator
from .blobs.index import BlobIndex
from .blobs.routes import blob_routes
from .bus import make_bus
from .context import Services, Settings
from .guard import BodyGuard
from .metrics import make_registry
from .relay import Relay
from .routes import auth, dashboard, endpoints, functions, operations, tasks, websockets
from .store import Store

log = logging.getLogger("tether.service")

__all__ = ["Settings", "create_app"]


def create_app(settings: Settings) -> FastAPI:
    store = Store(settings.db_url)
    db = AsyncStore(store, settings.db_threads)
    authenticator = Authenticator(db, settings.globus)
    relay = Relay(db, settings.max_payload_bytes, settings.prefetch, authenticator,
                  make_bus(settings.broker_url, settings.replica_id), settings.max_open_tasks_per_user,
                  settings.function_quota_bytes)
    relay.advertise_url = settings.advertise_url if relay.replicated else None
    blob_dir = Path(settings.blob_dir) if settings.blob_dir else tether_home() / "service" / "blobs"
    blob_index = BlobIndex(store, blob_dir, settings.max_blob_bytes, settings.blob_quota_bytes,
                           settings.blob_orphan_s)
    relay.blobs = db.offload(blob_index)
    relay.fetches.blobs = relay.blobs  # its queries run where the store's do (off the loop on PostgreSQL)
    max_frame = service_max_frame(settings.max_payload_bytes)
    services = Services(
        settings=settings, store=store, db=db, relay=relay, authenticator=authenticator, blob_index=blob_index,
        metrics=make_registry(relay), max_frame=max_frame,
        # what peers send as blobs: never more than an inline payload may be
        blob_threshold=min(settings.blob_threshold_bytes, settings.max_payload_bytes),
        client_frames=FrameDecoder(CLIENT_FRAMES, "a client"),
        endpoint_frames=FrameDecoder(ENDPOINT_FRAMES, "an endpoint"))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await relay.start()  # with a broker_url: connected to the other replicas before serving
        background = [asyncio.create_task(_purge_loop()), asyncio.create_task(relay.flush_loop()),
                      asyncio.create_task(relay.credential_loop(settings.credential_check_s)),
                      asyncio.create_task(relay.reconcile_loop())]
        yield
        for task in background:
            task.cancel()
        await relay.flush_deferred()
        await relay.bus.close()
        db.close()

    async def _purge_loop() -> None:
        while True:
            await asyncio.sleep(settings.purge_interval_s)
            try:
                n = await db.purge(settings.result_retention_s, settings.uncollected_retention_s)
                if n:
                    log.info("purged %d collected tasks past retention", n)
                n = await relay.blobs.purge()
                if n:
                    log.info("deleted %d blobs (their tasks were purged, or no task named them)", n)
                n = await db.purge_functions(settings.function_retention_s)
                if n:
                    log.info("deleted %d function bodies no stored task names, past their retention", n)
            except Exception:  # noqa: BLE001
                log.exception("purge failed")

    app = FastAPI(
        title="Tether service",
        version=__version__,
        description="Federated function execution: register endpoints and functions, submit and track tasks.",
        lifespan=lifespan,
    )
    app.state.services = services
    app.state.settings = settings  # read by tests and the command line, as is the store
    app.state.store = store
    app.include_router(blob_routes(blob_index, authenticator, db))
    for routes in (operations, auth, endpoints, functions, tasks, dashboard, websockets):
        app.include_router(routes.router)
    # a body is read only from an authenticated peer that said how large it is (a REST batch may
    # carry what a frame does, base64 and all)
    app.add_middleware(BodyGuard, authenticate=authenticator.user_for, max_body=2 * max_frame)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        """Errors as ``{"detail": text}``; a 405 names every method the path has (Starlette's
        own answer names only the first route that matched the path)."""
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            methods: set[str] = set()
            for route in app.router.routes:
                match, _ = route.matches({**request.scope, "method": "GET"})
                if match != Match.NONE:
                    methods.update(getattr(route, "methods", None) or ())
            methods.discard("HEAD")
            headers["Allow"] = ", ".join(sorted(methods))
        return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code, headers=headers)

    return app
