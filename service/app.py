"""The service's HTTP surface: REST control plane (OpenAPI at /openapi.json, docs at /docs),
the two WebSocket data-plane routes, /healthz and Prometheus /metrics.

Routes stay thin: authentication here, everything durable in :mod:`tether.service.relay`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, Field

from tether import __version__
from tether.protocol import (
    CLIENT_WS_PATH,
    CLOSE_AUTH_FAILED,
    CLOSE_PROTOCOL,
    ENDPOINT_WS_PATH,
    PROTOCOL_VERSION,
    Msg,
    ProtocolError,
    decode,
    encode,
    require,
)

from .dashboard import DASHBOARD_HTML
from .metrics import make_registry, render
from .relay import ClientSession, EndpointSession, Relay, row_to_result
from .store import Store, transitions

log = logging.getLogger("tether.service")


@dataclass
class Settings:
    """Service configuration; every field has a working embedded default."""

    db_url: str = "sqlite:///tether.db"
    max_payload_bytes: int = 64 * 1024 * 1024
    result_retention_s: float = 7 * 24 * 3600
    purge_interval_s: float = 600


# --- REST models ----------------------------------------------------------------------------------
class WhoAmI(BaseModel):
    user_id: str
    name: str | None


class EndpointRegistration(BaseModel):
    name: str = Field(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9_.-]+$")
    endpoint_id: str | None = Field(default=None, description="re-register (rotate the credential of) this endpoint")


class EndpointCredential(BaseModel):
    endpoint_id: str
    secret: str = Field(description="the endpoint's own credential; keep it in a 0600 file")


class EndpointInfo(BaseModel):
    endpoint_id: str
    name: str
    online: bool
    last_seen: float | None
    status: dict[str, Any]


class FunctionRegistration(BaseModel):
    function: str = Field(description="base64 of the serialized function (tether.serialize)")


class FunctionInfo(BaseModel):
    function_id: str


class TaskInfo(BaseModel):
    task_id: str
    state: str
    endpoint_id: str
    group_id: str | None
    transitions: dict[str, float]
    result: str | None = Field(default=None, description="base64 of the serialized result, when finished")
    error: dict[str, Any] | None = None


class TaskIds(BaseModel):
    task_ids: list[str] = Field(max_length=100_000)


class RestTask(BaseModel):
    task_id: str
    endpoint_id: str
    function_id: str
    payload: str = Field(description="base64 of serialized (args, kwargs)")
    group_id: str | None = None
    resource_specification: dict[str, Any] | None = None


class RestBatch(BaseModel):
    tasks: list[RestTask]


class BatchAck(BaseModel):
    accepted: list[str]
    rejected: dict[str, str]


class GroupInfo(BaseModel):
    group_id: str
    tasks: list[dict[str, str]]


class DashboardInfo(BaseModel):
    endpoints: list[EndpointInfo]
    task_counts: dict[str, int]
    recent_failures: list[dict[str, Any]]


def _bearer(value: str | None) -> str | None:
    if value and value.lower().startswith("bearer "):
        return value[7:].strip()
    return None


class _WSSender:
    """Serialises concurrent sends on one WebSocket."""

    def __init__(self, ws: WebSocket):
        self.ws = ws
        self.lock = asyncio.Lock()

    async def send(self, frame: bytes) -> None:
        async with self.lock:
            await self.ws.send_bytes(frame)


def create_app(settings: Settings) -> FastAPI:
    store = Store(settings.db_url)
    relay = Relay(store, settings.max_payload_bytes)
    started = time.time()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        background = [asyncio.create_task(_purge_loop()), asyncio.create_task(relay.flush_loop())]
        yield
        for task in background:
            task.cancel()
        relay.flush_deferred()
        store.close()

    async def _purge_loop() -> None:
        while True:
            await asyncio.sleep(settings.purge_interval_s)
            try:
                n = store.purge(settings.result_retention_s)
                if n:
                    log.info("purged %d collected tasks past retention", n)
            except Exception:  # noqa: BLE001
                log.exception("purge failed")

    app = FastAPI(
        title="Tether service",
        version=__version__,
        description="Federated function execution: register endpoints and functions, submit and track tasks.",
        lifespan=lifespan,
    )
    app.state.store = store
    app.state.relay = relay

    async def current_user(request: Request) -> str:
        """Authenticate. Async on purpose: sync dependencies run in a thread pool, and the store's
        single connection must only be used from the event loop."""
        token = _bearer(request.headers.get("authorization"))
        if not token:
            raise HTTPException(401, "missing credentials: send 'Authorization: Bearer <token>'")
        user = store.user_by_token(token)
        if user is None:
            raise HTTPException(401, "invalid token: it is unknown to this service or was revoked")
        return user

    def own_endpoint(endpoint_id: str, user: str) -> dict[str, Any]:
        ep = store.get_endpoint(endpoint_id)
        if ep is None or ep["owner_id"] != user:
            raise HTTPException(404, f"unknown endpoint {endpoint_id}")
        return ep

    def endpoint_info(ep: dict[str, Any]) -> EndpointInfo:
        session = relay.endpoints.get(ep["id"])
        status = session.status if session else (json.loads(ep["status"]) if ep.get("status") else {})
        return EndpointInfo(
            endpoint_id=ep["id"], name=ep["name"], online=session is not None, last_seen=ep.get("last_seen"),
            status={k: v for k, v in status.items() if k != "online"},
        )

    def task_info(row: Any) -> TaskInfo:  # callers flush deferred states first
        res = row_to_result(row)
        return TaskInfo(
            task_id=row.id, state=row.state, endpoint_id=row.endpoint_id, group_id=row.group_id,
            transitions=transitions(row),
            result=base64.b64encode(row.result).decode() if row.result else None, error=res["error"],
        )

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "version": __version__, "protocol": PROTOCOL_VERSION, "uptime_s": time.time() - started}

    registry = make_registry(relay)

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def metrics() -> Response:
        """Prometheus exposition: endpoints online, their workers, task events."""
        body, headers = render(registry)
        return Response(body, headers=headers)

    @app.get("/v1/whoami", response_model=WhoAmI, tags=["auth"])
    async def whoami(user: str = Depends(current_user)) -> WhoAmI:
        return WhoAmI(user_id=user, name=store.user_name(user))

    @app.post("/v1/endpoints", response_model=EndpointCredential, tags=["endpoints"])
    async def register_endpoint(body: EndpointRegistration, user: str = Depends(current_user)) -> EndpointCredential:
        if body.endpoint_id:
            ep = store.get_endpoint(body.endpoint_id)
            if ep is not None and ep["owner_id"] != user:
                raise HTTPException(403, f"endpoint {body.endpoint_id} belongs to another user")
        eid, secret = store.register_endpoint(user, body.name, body.endpoint_id)
        return EndpointCredential(endpoint_id=eid, secret=secret)

    @app.get("/v1/endpoints", response_model=list[EndpointInfo], tags=["endpoints"])
    async def list_endpoints(user: str = Depends(current_user)) -> list[EndpointInfo]:
        return [endpoint_info(ep) for ep in store.list_endpoints(user)]

    @app.get("/v1/endpoints/{endpoint_id}", response_model=EndpointInfo, tags=["endpoints"])
    async def get_endpoint(endpoint_id: str, user: str = Depends(current_user)) -> EndpointInfo:
        return endpoint_info(own_endpoint(endpoint_id, user))

    @app.get("/v1/endpoints/{endpoint_id}/status", response_model=EndpointInfo, tags=["endpoints"])
    async def endpoint_status(endpoint_id: str, user: str = Depends(current_user)) -> EndpointInfo:
        return endpoint_info(own_endpoint(endpoint_id, user))

    @app.post("/v1/endpoints/{endpoint_id}/stop", tags=["endpoints"])
    async def stop_endpoint(endpoint_id: str, user: str = Depends(current_user)) -> dict[str, Any]:
        own_endpoint(endpoint_id, user)
        return {"endpoint_id": endpoint_id, "stop_sent": await relay.stop_endpoint(endpoint_id)}

    @app.delete("/v1/endpoints/{endpoint_id}", tags=["endpoints"])
    async def delete_endpoint(endpoint_id: str, user: str = Depends(current_user)) -> dict[str, Any]:
        own_endpoint(endpoint_id, user)
        await relay.stop_endpoint(endpoint_id)
        store.delete_endpoint(endpoint_id)
        return {"endpoint_id": endpoint_id, "deleted": True}

    @app.post("/v1/functions", response_model=FunctionInfo, tags=["functions"])
    async def register_function(body: FunctionRegistration, user: str = Depends(current_user)) -> FunctionInfo:
        from tether.serialize import function_id

        try:
            raw = base64.b64decode(body.function, validate=True)
        except ValueError:
            raise HTTPException(422, "'function' must be base64") from None
        fid = function_id(raw)
        store.add_functions(user, {fid: raw})
        return FunctionInfo(function_id=fid)

    @app.get("/v1/functions/{function_id}", response_model=FunctionInfo, tags=["functions"])
    async def get_function(function_id: str, user: str = Depends(current_user)) -> FunctionInfo:
        if store.get_function(user, function_id) is None:
            raise HTTPException(404, f"unknown function {function_id}")
        return FunctionInfo(function_id=function_id)

    @app.post("/v1/tasks", response_model=BatchAck, tags=["tasks"])
    async def submit_batch(body: RestBatch, user: str = Depends(current_user)) -> BatchAck:
        try:
            tasks = [
                {"id": t.task_id, "endpoint": t.endpoint_id, "function": t.function_id,
                 "payload": base64.b64decode(t.payload, validate=True), "group": t.group_id,
                 "spec": t.resource_specification}
                for t in body.tasks
            ]
        except ValueError:
            raise HTTPException(422, "task payloads must be base64") from None
        ack = await relay.submit(None, user, {"tasks": tasks})
        return BatchAck(accepted=ack["accepted"], rejected=ack["rejected"])

    @app.get("/v1/tasks/{task_id}", response_model=TaskInfo, tags=["tasks"])
    async def get_task(task_id: str, user: str = Depends(current_user)) -> TaskInfo:
        relay.flush_deferred()
        rows = store.get_tasks(user, [task_id])
        if not rows:
            raise HTTPException(404, f"unknown task {task_id}")
        return task_info(rows[0])

    @app.post("/v1/tasks/status", response_model=dict[str, TaskInfo], tags=["tasks"])
    async def batch_status(body: TaskIds, user: str = Depends(current_user)) -> dict[str, TaskInfo]:
        relay.flush_deferred()
        return {r.id: task_info(r) for r in store.get_tasks(user, body.task_ids)}

    @app.post("/v1/tasks/{task_id}/cancel", tags=["tasks"])
    async def cancel_task(task_id: str, user: str = Depends(current_user)) -> dict[str, Any]:
        if not store.get_tasks(user, [task_id]):
            raise HTTPException(404, f"unknown task {task_id}")
        return {"task_id": task_id, "cancelled": bool(await relay.cancel(user, [task_id]))}

    @app.get("/v1/task_groups/{group_id}", response_model=GroupInfo, tags=["tasks"])
    async def get_group(group_id: str, user: str = Depends(current_user)) -> GroupInfo:
        relay.flush_deferred()
        rows = store.group_task_ids(user, group_id)
        return GroupInfo(group_id=group_id, tasks=[{"task_id": r.id, "state": r.state} for r in rows])

    @app.get("/v1/dashboard", response_model=DashboardInfo, tags=["operations"])
    async def dashboard_data(user: str = Depends(current_user)) -> DashboardInfo:
        """What the dashboard shows: your endpoints, your task counts, your recent failures."""
        relay.flush_deferred()
        failures = []
        for r in store.recent_failures(user):
            error = json.loads(r.error) if r.error else {}
            failures.append({"task_id": r.id, "endpoint_id": r.endpoint_id, "ts": r.t_done,
                             "error": f"{error.get('type', '?')}: {error.get('message', '')[:300]}"})
        return DashboardInfo(endpoints=[endpoint_info(ep) for ep in store.list_endpoints(user)],
                             task_counts=store.count_by_state(user), recent_failures=failures)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    @app.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
    async def dashboard() -> str:
        return DASHBOARD_HTML

    # --- WebSockets ----------------------------------------------------------------------------
    async def refuse(ws: WebSocket, code: int, message: str) -> None:
        await ws.accept()
        await ws.send_bytes(encode(Msg.ERROR, message=message, fatal=True))
        await ws.close(code=code, reason=message[:120])

    @app.websocket(CLIENT_WS_PATH)
    async def client_ws(ws: WebSocket) -> None:
        token = _bearer(ws.headers.get("authorization"))
        user = store.user_by_token(token) if token else None
        if user is None:
            await refuse(ws, CLOSE_AUTH_FAILED, "invalid or missing token: authentication failed")
            return
        await ws.accept()
        session = ClientSession(_WSSender(ws), user)
        await session.send(encode(Msg.WELCOME, user_id=user, max_payload=settings.max_payload_bytes,
                                  version=__version__))
        try:
            while True:
                frame = await ws.receive()
                if frame["type"] == "websocket.disconnect":
                    break
                msg: dict[str, Any] | None = None
                try:
                    msg = decode(frame.get("bytes") if frame.get("bytes") is not None else frame.get("text", ""))
                    kind = msg["t"]
                    if kind == Msg.SUBMIT:
                        await relay.submit(session, user, msg)
                    elif kind == Msg.SUBSCRIBE:
                        await relay.subscribe(session, require(msg, "ids", list))
                    elif kind == Msg.CANCEL:
                        await relay.cancel(user, require(msg, "ids", list))
                    elif kind == Msg.COLLECTED:
                        relay.collected(user, require(msg, "ids", list))
                    else:
                        raise ProtocolError(f"'{kind}' is not a message a client may send")
                except ProtocolError as exc:
                    # a bad frame is answered, not fatal: the session (and others) keep working
                    ref = msg.get("ref") if msg else None
                    await session.send(encode(Msg.ERROR, message=f"malformed frame: {exc}", ref=ref))
        except WebSocketDisconnect:
            pass
        finally:
            relay.client_disconnected(session)

    @app.websocket(ENDPOINT_WS_PATH)
    async def endpoint_ws(ws: WebSocket) -> None:
        secret = _bearer(ws.headers.get("authorization"))
        endpoint_id = ws.headers.get("x-tether-endpoint", "")
        ep = store.endpoint_by_secret(endpoint_id, secret) if secret and endpoint_id else None
        if ep is None:
            await refuse(ws, CLOSE_AUTH_FAILED,
                         f"endpoint {endpoint_id or '?'}: invalid credential; re-register with 'tether endpoint start'")
            return
        await ws.accept()
        session = EndpointSession(_WSSender(ws), ep)
        try:
            hello = decode(await ws.receive_bytes())
            if hello["t"] != Msg.HELLO:
                raise ProtocolError("the first frame of an endpoint must be 'hello'")
            await session.send(encode(Msg.WELCOME, endpoint_id=ep["id"], version=__version__))
            await relay.endpoint_connected(session, hello)
            while True:
                data = await ws.receive_bytes()
                try:
                    await relay.endpoint_message(session, decode(data))
                except ProtocolError as exc:
                    await session.send(encode(Msg.ERROR, message=f"malformed frame: {exc}"))
        except ProtocolError as exc:
            await ws.close(code=CLOSE_PROTOCOL, reason=str(exc)[:120])
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            relay.endpoint_disconnected(session)

    return app
