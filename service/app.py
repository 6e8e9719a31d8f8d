"""The service's HTTP surface: REST control plane (OpenAPI at /openapi.json, docs at /docs),
the two WebSocket data-plane routes, /healthz and Prometheus /metrics.

Routes stay thin: authentication and input validation here (every id checked against the one
definition in :mod:`tether.ids`, every frame decoded into a typed record by
:mod:`tether.protocol`), everything durable and every ownership rule in
:mod:`tether.service.relay`. Every answer a route can give is in the OpenAPI document.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import HTMLResponse, JSONResponse, Response
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from tether import __version__
from tether.home import tether_home
from tether.protocol import (
    CLIENT_FRAMES,
    CLIENT_WS_PATH,
    CLOSE_AUTH_FAILED,
    CLOSE_CREDENTIAL_ROTATED,
    CLOSE_PROTOCOL,
    CLOSE_TRY_AGAIN,
    DEFAULT_BLOB_THRESHOLD,
    DEFAULT_PREFETCH,
    ENDPOINT_FRAMES,
    ENDPOINT_WS_PATH,
    PROTOCOL_VERSION,
    Error,
    ErrorCode,
    FrameDecoder,
    Hello,
    ProtocolError,
    Submit,
    Task,
    Welcome,
    encode,
    service_max_frame,
    to_builtins,
)
from tether.serialize import function_id

from . import dashboard
from .async_store import DEFAULT_DB_THREADS, AsyncStore
from .auth import Authenticator, GlobusSettings
from .blobs import DEFAULT_MAX_BLOB, DEFAULT_ORPHAN_S, DEFAULT_QUOTA, BlobIndex, blob_routes
from .bus import make_bus
from .guard import BodyGuard, bearer
from .metrics import make_registry, render
from .models import (
    BatchAck,
    DashboardInfo,
    EndpointAction,
    EndpointCredential,
    EndpointInfo,
    EndpointPolicy,
    EndpointRegistration,
    FunctionInfo,
    FunctionRegistration,
    GroupInfo,
    GroupTask,
    Health,
    PathFunctionId,
    PathId,
    RestBatch,
    RestRefusal,
    TaskCancelResult,
    TaskIds,
    TaskInfo,
    UserEndpointInfo,
    WhoAmI,
)
from .models import error_responses as _errors
from .outbound import DEFAULT_MAX_QUEUED, DEFAULT_SEND_TIMEOUT, Outbound
from .policy import not_admitted_message
from .relay import Relay
from .sessions import ClientSession, EndpointSession
from .store import EndpointIdTaken, Store, row_to_result, transitions
from .submission import function_quota_message

log = logging.getLogger("tether.service")


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
    #: large payloads (service/blobs.py): where blob files live, what travels as a blob, the limits
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
    #: threads (database connections) per process for a database other than SQLite
    db_threads: int = DEFAULT_DB_THREADS
    #: bytes that may wait for one peer that reads slowly, and how long it may take one frame,
    #: before it is dropped (service/outbound.py)
    max_queued_bytes_per_connection: int = DEFAULT_MAX_QUEUED
    send_timeout_s: float = DEFAULT_SEND_TIMEOUT


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(400, f"'{what}' must be base64") from None


def _frame_bytes(message: dict[str, Any]) -> bytes | str | None:
    return message.get("bytes") if message.get("bytes") is not None else message.get("text")


async def _serve_frames(ws: WebSocket, session: Any, decoder: FrameDecoder,
                        handle: Callable[[Any, Any], Awaitable[None]]) -> None:
    """Receive, validate and handle frames until the peer goes. A malformed frame gets an error
    frame in words and the session goes on; so does a frame the service fails to handle."""
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return
        try:
            msg = decoder.decode(_frame_bytes(message))
        except ProtocolError as exc:
            await session.send(encode(Error(code=ErrorCode.MALFORMED, ref=exc.ref, message=f"malformed frame: {exc}")))
            continue
        try:
            await handle(session, msg)
        except DBAPIError as exc:
            # the database is unavailable (restarting, failing over): nothing of this frame was
            # acknowledged, and a peer resends what is unacknowledged when it reconnects
            log.warning("database error while handling a '%s' frame (%s); asking the peer to reconnect and resend",
                        msg.__struct_config__.tag, str(exc).splitlines()[0][:200])
            await session.sender.close(CLOSE_TRY_AGAIN, "the service's database is unavailable; reconnect and resend")
            return
        except Exception:  # noqa: BLE001 - one frame's failure must not end the session
            tag = msg.__struct_config__.tag
            log.exception("handling a '%s' frame failed", tag)
            await session.send(encode(Error(code=ErrorCode.INTERNAL, ref=getattr(msg, "ref", None),
                                            message=f"the service failed to handle this '{tag}' frame (logged "
                                                    "there); nothing of it was applied unless acknowledged")))


def create_app(settings: Settings) -> FastAPI:
    store = Store(settings.db_url)
    db = AsyncStore(store, settings.db_threads)
    authenticator = Authenticator(db, settings.globus)
    relay = Relay(db, settings.max_payload_bytes, settings.prefetch, authenticator,
                  make_bus(settings.broker_url, settings.replica_id), settings.max_open_tasks_per_user,
                  settings.function_quota_bytes)
    blob_dir = Path(settings.blob_dir) if settings.blob_dir else tether_home() / "service" / "blobs"
    blob_index = BlobIndex(store, blob_dir, settings.max_blob_bytes, settings.blob_quota_bytes,
                           settings.blob_orphan_s)
    relay.blobs = db.offload(blob_index)  # its queries run where the store's do (off the loop on PostgreSQL)
    max_frame = service_max_frame(settings.max_payload_bytes)
    # what peers send as blobs: never more than an inline payload may be
    blob_threshold = min(settings.blob_threshold_bytes, settings.max_payload_bytes)
    started = time.time()
    client_frames = FrameDecoder(CLIENT_FRAMES, "a client")
    endpoint_frames = FrameDecoder(ENDPOINT_FRAMES, "an endpoint")

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
    app.state.settings = settings
    app.state.store = store
    app.state.relay = relay
    app.state.blobs = blob_index
    app.include_router(blob_routes(blob_index, authenticator, db))
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

    async def current_user(request: Request) -> str:
        """Authenticate. Async on purpose: sync dependencies run in a thread pool, and the store's
        single connection must only be used from the event loop."""
        token = bearer(request.headers.get("authorization"))
        if not token:
            raise HTTPException(401, "missing credentials: send 'Authorization: Bearer <token>'")
        user = await authenticator.user_for(token)
        if user is None:
            raise HTTPException(401, "invalid token: it is unknown to this service, was revoked, or has expired")
        return user

    async def own_endpoint(endpoint_id: str, user: str, admitted: bool = False) -> dict[str, Any]:
        """The endpoint if ``user`` owns it (or, with ``admitted``, may send it tasks); else 404."""
        ep = await db.get_endpoint(endpoint_id)
        if ep is None or not (ep["owner_id"] == user or (admitted and await relay.admits(user, ep))):
            raise HTTPException(404, f"unknown endpoint {endpoint_id}")
        if ep["deleted_at"] is not None:
            raise HTTPException(404, f"unknown endpoint {endpoint_id}: it was deleted")
        return ep

    def endpoint_info(ep: dict[str, Any]) -> EndpointInfo:
        session = relay.endpoints.get(ep["id"])
        status = session.status if session else (json.loads(ep["status"]) if ep.get("status") else {})
        return EndpointInfo(
            endpoint_id=ep["id"], name=ep["name"], online=relay.is_online(ep), last_seen=ep.get("last_seen"),
            status={k: v for k, v in status.items() if k not in ("online", "replica")},
        )

    def task_info(row: Any) -> TaskInfo:  # callers flush deferred states first
        res = row_to_result(row)
        return TaskInfo(
            task_id=row.id, state=row.state, endpoint_id=row.endpoint_id, group_id=row.group_id,
            transitions=transitions(row),
            result=base64.b64encode(row.result).decode() if row.result else None,
            error=to_builtins(res.error) if res.error else None,
            resource_specification=json.loads(row.spec) if row.spec else None,
            user_endpoint_config=json.loads(row.uec) if row.uec else None,
        )

    @app.get("/healthz", response_model=Health, tags=["operations"])
    async def healthz() -> Health:
        return Health(status="ok", version=__version__, protocol=PROTOCOL_VERSION, uptime_s=time.time() - started)

    registry = make_registry(relay)

    @app.get("/metrics", tags=["operations"], response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus exposition format"}})
    async def metrics() -> Response:
        """Prometheus exposition: endpoints online, their workers, task events."""
        body, headers = render(registry)
        return Response(body, headers=headers)

    @app.get("/v1/whoami", response_model=WhoAmI, tags=["auth"], responses=_errors())
    async def whoami(user: str = Depends(current_user)) -> WhoAmI:
        return WhoAmI(user_id=user, name=await db.user_name(user))

    @app.post("/v1/endpoints", response_model=EndpointCredential, tags=["endpoints"], responses=_errors(400, 404, 409))
    async def register_endpoint(body: EndpointRegistration, user: str = Depends(current_user)) -> EndpointCredential:
        """Register a new endpoint, or rotate the credential of one of yours (``endpoint_id``):
        the old credential stops working and its connection is closed at once."""
        try:
            eid, secret = await db.register_endpoint(user, body.name, body.endpoint_id, body.multi_user)
        except KeyError:
            raise HTTPException(404, f"unknown endpoint {body.endpoint_id}; omit endpoint_id to register a new "
                                     "endpoint") from None
        except EndpointIdTaken:
            raise HTTPException(409, f"endpoint id {body.endpoint_id} is not yours to use (another user's, or "
                                     "deleted); omit endpoint_id to register a new endpoint") from None
        if body.endpoint_id:
            await relay.disconnect_endpoint(eid, CLOSE_CREDENTIAL_ROTATED, "this endpoint's credential was rotated")
        return EndpointCredential(endpoint_id=eid, secret=secret)

    @app.get("/v1/endpoints", response_model=list[EndpointInfo], tags=["endpoints"], responses=_errors())
    async def list_endpoints(user: str = Depends(current_user)) -> list[EndpointInfo]:
        return [endpoint_info(ep) for ep in await db.list_endpoints(user)]

    @app.get("/v1/endpoints/{endpoint_id}", response_model=EndpointInfo, tags=["endpoints"], responses=_errors(404))
    async def get_endpoint(endpoint_id: PathId, user: str = Depends(current_user)) -> EndpointInfo:
        return endpoint_info(await own_endpoint(endpoint_id, user, admitted=True))

    @app.get("/v1/endpoints/{endpoint_id}/status", response_model=EndpointInfo, tags=["endpoints"],
             responses=_errors(404))
    async def endpoint_status(endpoint_id: PathId, user: str = Depends(current_user)) -> EndpointInfo:
        return endpoint_info(await own_endpoint(endpoint_id, user, admitted=True))

    @app.put("/v1/endpoints/{endpoint_id}/policy", response_model=EndpointPolicy, tags=["endpoints"],
             responses=_errors(400, 404, 409))
    async def set_policy(endpoint_id: PathId, body: EndpointPolicy,
                         user: str = Depends(current_user)) -> EndpointPolicy:
        """Who may send tasks to your multi-user endpoint."""
        ep = await own_endpoint(endpoint_id, user)
        if not ep.get("multi_user"):
            raise HTTPException(409, f"endpoint {endpoint_id} is not a multi-user endpoint; only those have a policy")
        await db.set_policy(endpoint_id, body.model_dump())
        await relay.enforce_policy(endpoint_id)
        return body

    @app.get("/v1/endpoints/{endpoint_id}/user_endpoints", response_model=list[UserEndpointInfo],
             tags=["endpoints"], responses=_errors(404))
    async def user_endpoints(endpoint_id: PathId, user: str = Depends(current_user)) -> list[UserEndpointInfo]:
        """The user endpoint processes of a multi-user endpoint: all of them for its owner, your own
        for anyone else it admits."""
        ep = await own_endpoint(endpoint_id, user, admitted=True)
        owner_view = ep["owner_id"] == user
        rows = await db.user_endpoints(endpoint_id, None if owner_view else user)
        return [UserEndpointInfo(endpoint_id=r["id"], user=await db.user_name(r["owner_id"]) if owner_view else None,
                                 local_user=r["local_user"] if owner_view or r["owner_id"] == user else None,
                                 online=relay.is_online(r), config=json.loads(r["user_config"] or "{}"))
                for r in rows]

    @app.post("/v1/endpoints/{endpoint_id}/stop", response_model=EndpointAction, tags=["endpoints"],
              responses=_errors(404))
    async def stop_endpoint(endpoint_id: PathId, user: str = Depends(current_user)) -> EndpointAction:
        await own_endpoint(endpoint_id, user)
        return EndpointAction(endpoint_id=endpoint_id, stop_sent=await relay.stop_endpoint(endpoint_id))

    @app.delete("/v1/endpoints/{endpoint_id}", response_model=EndpointAction, tags=["endpoints"],
                responses=_errors(404))
    async def delete_endpoint(endpoint_id: PathId, user: str = Depends(current_user)) -> EndpointAction:
        """Delete an endpoint for good: it is stopped, its id is never issued again, and its
        open tasks fail with an error that says the endpoint was deleted."""
        await own_endpoint(endpoint_id, user)
        failed = await relay.delete_endpoint(endpoint_id)
        return EndpointAction(endpoint_id=endpoint_id, deleted=True, tasks_failed=failed)

    @app.post("/v1/functions", response_model=FunctionInfo, tags=["functions"], responses=_errors(400, 429))
    async def register_function(body: FunctionRegistration, user: str = Depends(current_user)) -> FunctionInfo:
        raw = _b64(body.function, "function")
        fid = function_id(raw)  # the id is the hash of the body, computed here, never taken from the caller
        if await db.add_functions(user, {fid: raw}, settings.function_quota_bytes):
            raise HTTPException(429, function_quota_message(fid, len(raw), settings.function_quota_bytes))
        return FunctionInfo(function_id=fid)

    @app.get("/v1/functions/{function_id}", response_model=FunctionInfo, tags=["functions"], responses=_errors(404))
    async def get_function(function_id: PathFunctionId, user: str = Depends(current_user)) -> FunctionInfo:
        if await db.get_function(user, function_id) is None:
            raise HTTPException(404, f"unknown function {function_id}")
        return FunctionInfo(function_id=function_id)

    @app.post("/v1/tasks", response_model=BatchAck, tags=["tasks"], responses=_errors(400, 429))
    async def submit_batch(body: RestBatch, user: str = Depends(current_user)) -> BatchAck:
        tasks = [Task(id=t.task_id, endpoint=t.endpoint_id, function=t.function_id, payload=_b64(t.payload, "payload"),
                      group=t.group_id, spec=t.resource_specification) for t in body.tasks]
        ack = await relay.submit(None, user, Submit(ref=0, tasks=tasks))
        quota = [v.message for v in ack.rejected.values() if v.code == ErrorCode.QUOTA_EXCEEDED]
        if quota and not ack.accepted:  # nothing taken, for a per-user limit: a 429 the caller can back off on
            raise HTTPException(429, quota[0])
        rejected = {k: RestRefusal(code=v.code.value, message=v.message) for k, v in ack.rejected.items()}
        return BatchAck(accepted=ack.accepted, rejected=rejected)

    @app.get("/v1/tasks/{task_id}", response_model=TaskInfo, tags=["tasks"], responses=_errors(404))
    async def get_task(task_id: PathId, user: str = Depends(current_user)) -> TaskInfo:
        await relay.flush_deferred()
        rows = await db.get_tasks(user, [task_id])
        if not rows:
            raise HTTPException(404, f"unknown task {task_id}")
        return task_info(rows[0])

    @app.post("/v1/batch_status", response_model=dict[str, TaskInfo], tags=["tasks"], responses=_errors(400))
    async def batch_status(body: TaskIds, user: str = Depends(current_user)) -> dict[str, TaskInfo]:
        await relay.flush_deferred()
        return {r.id: task_info(r) for r in await db.get_tasks(user, body.task_ids)}

    @app.post("/v1/tasks/{task_id}/cancel", response_model=TaskCancelResult, tags=["tasks"], responses=_errors(404))
    async def cancel_task(task_id: PathId, user: str = Depends(current_user)) -> TaskCancelResult:
        if not await db.get_tasks(user, [task_id]):
            raise HTTPException(404, f"unknown task {task_id}")
        return TaskCancelResult(task_id=task_id, cancelled=bool(await relay.cancel(user, [task_id])))

    @app.get("/v1/task_groups/{group_id}", response_model=GroupInfo, tags=["tasks"], responses=_errors())
    async def get_group(group_id: PathId, user: str = Depends(current_user)) -> GroupInfo:
        await relay.flush_deferred()
        rows = await db.group_task_ids(user, group_id)
        return GroupInfo(group_id=group_id, tasks=[GroupTask(task_id=r.id, state=r.state) for r in rows])

    views: dict[str, tuple[float, DashboardInfo]] = {}  # user -> (when, view): one read per user per second

    @app.get("/v1/dashboard", response_model=DashboardInfo, tags=["operations"], responses=_errors())
    async def dashboard_data(user: str = Depends(current_user)) -> DashboardInfo:
        """What the dashboard shows: your endpoints with their workers, your open tasks, and
        from your most recent tasks (at most ``window``) their states over time, throughput,
        task groups and failures."""
        now = time.time()
        cached = views.get(user)
        if cached is not None and now - cached[0] < 1.0:
            return cached[1]
        await relay.flush_deferred()
        rows = await db.recent_tasks(user, dashboard.WINDOW)
        failed = sorted((r for r in rows if r.state == "failed"), key=lambda r: r.t_done or 0, reverse=True)[:20]
        failures = []
        for r in sorted(await db.get_tasks(user, [r.id for r in failed]), key=lambda r: r.t_done or 0, reverse=True):
            error = json.loads(r.error) if r.error else {}
            failures.append({"task_id": r.id, "endpoint_id": r.endpoint_id, "group_id": r.group_id, "ts": r.t_done,
                             "error": f"{error.get('type', '?')}: {str(error.get('message', ''))[:300]}"})
        view = DashboardInfo(
            user=await db.user_name(user) or user, user_id=user, now=now,
            endpoints=[endpoint_info(ep) for ep in await db.list_endpoints(user)],
            open_counts=await db.open_by_state(user), task_counts=dict(Counter(r.state for r in rows)),
            window={"tasks": len(rows), "limit": dashboard.WINDOW,
                    "since": rows[-1].t_received if rows else None},
            activity=dashboard.activity(rows, now), groups=dashboard.groups(rows), recent_failures=failures)
        if len(views) > 1000:
            views.clear()
        views[user] = (now, view)
        return view

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    @app.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
    async def dashboard_page() -> str:
        return dashboard.page()

    # --- WebSockets ----------------------------------------------------------------------------
    def outbound(ws: WebSocket, who: str) -> Outbound:
        return Outbound(ws, settings.max_queued_bytes_per_connection, settings.send_timeout_s, who)

    async def refuse(ws: WebSocket, code: int, error_code: ErrorCode, message: str) -> None:
        await ws.accept()
        await ws.send_bytes(encode(Error(code=error_code, message=message, fatal=True)))
        await ws.close(code=code, reason=message[:120])

    @app.websocket(CLIENT_WS_PATH)
    async def client_ws(ws: WebSocket) -> None:
        token = bearer(ws.headers.get("authorization"))
        user = await authenticator.user_for(token) if token else None
        if user is None or token is None:
            await refuse(ws, CLOSE_AUTH_FAILED, ErrorCode.AUTH_FAILED,
                         "invalid or missing token: authentication failed")
            return
        await ws.accept()
        session = ClientSession(outbound(ws, f"client of {user}"), user, token)
        await relay.client_connected(session)
        try:
            await session.send(encode(Welcome(user_id=user, max_payload=settings.max_payload_bytes,
                                              max_frame=max_frame, version=__version__,
                                              blob_threshold=blob_threshold)))
            await _serve_frames(ws, session, client_frames, relay.client_message)
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            await relay.client_disconnected(session)

    @app.websocket(ENDPOINT_WS_PATH)
    async def endpoint_ws(ws: WebSocket) -> None:
        secret = bearer(ws.headers.get("authorization"))
        endpoint_id = ws.headers.get("x-tether-endpoint", "")
        ep = await db.endpoint_by_secret(endpoint_id, secret) if secret and endpoint_id else None
        if ep is not None and ep["parent_id"] and not await relay.parent_admits(ep, await db.get_endpoint(
                ep["parent_id"])):
            await refuse(ws, CLOSE_AUTH_FAILED, ErrorCode.AUTH_FAILED, not_admitted_message(ep["parent_id"]))
            return
        if ep is None:
            await refuse(ws, CLOSE_AUTH_FAILED, ErrorCode.AUTH_FAILED,
                         f"endpoint {endpoint_id[:64] or '?'}: invalid credential (wrong, rotated, or the endpoint was "
                         "deleted); re-register with 'tether endpoint start'")
            return
        await ws.accept()
        session = EndpointSession(outbound(ws, f"endpoint {ep['id']}"), ep, settings.prefetch)
        try:
            first = await ws.receive()
            if first["type"] == "websocket.disconnect":
                return
            try:
                hello = endpoint_frames.decode(_frame_bytes(first))
                if not isinstance(hello, Hello):
                    raise ProtocolError("the first frame of an endpoint must be 'hello'")
            except ProtocolError as exc:
                await session.send(encode(Error(code=ErrorCode.MALFORMED, message=str(exc), fatal=True)))
                await ws.close(code=CLOSE_PROTOCOL, reason=str(exc)[:120])
                return
            await session.send(encode(Welcome(endpoint_id=ep["id"], version=__version__,
                                              max_payload=settings.max_payload_bytes, max_frame=max_frame,
                                              prefetch=settings.prefetch,
                                              blob_threshold=blob_threshold)))
            await relay.endpoint_connected(session, hello)
            await _serve_frames(ws, session, endpoint_frames, relay.endpoint_message)
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            await relay.endpoint_disconnected(session)

    return app
