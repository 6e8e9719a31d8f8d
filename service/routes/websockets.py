"""The two WebSocket routes of the data plane: one per client process, one per endpoint process.

Thin on purpose: authenticate, send ``welcome``, then decode each frame into its typed record
(:mod:`tether.protocol`) and hand it to the relay, which decides what it does.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from sqlalchemy.exc import DBAPIError

from tether import __version__
from tether.protocol import (
    CLIENT_WS_PATH,
    CLOSE_AUTH_FAILED,
    CLOSE_PROTOCOL,
    CLOSE_TRY_AGAIN,
    ENDPOINT_WS_PATH,
    Error,
    ErrorCode,
    FrameDecoder,
    Hello,
    ProtocolError,
    Welcome,
    encode,
)

from ..context import Services, services_of
from ..guard import bearer
from ..outbound import Outbound
from ..policy import not_admitted_message
from ..sessions import ClientSession, EndpointSession

log = logging.getLogger("tether.service")

router = APIRouter()


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


def _outbound(svc: Services, ws: WebSocket, who: str) -> Outbound:
    return Outbound(ws, svc.settings.max_queued_bytes_per_connection, svc.settings.send_timeout_s, who)


async def _refuse(ws: WebSocket, code: int, error_code: ErrorCode, message: str) -> None:
    await ws.accept()
    await ws.send_bytes(encode(Error(code=error_code, message=message, fatal=True)))
    await ws.close(code=code, reason=message[:120])


@router.websocket(CLIENT_WS_PATH)
async def client_ws(ws: WebSocket) -> None:
    svc = services_of(ws)
    relay, settings = svc.relay, svc.settings
    token = bearer(ws.headers.get("authorization"))
    user = await svc.authenticator.user_for(token) if token else None
    if user is None or token is None:
        await _refuse(ws, CLOSE_AUTH_FAILED, ErrorCode.AUTH_FAILED, "invalid or missing token: authentication failed")
        return
    await ws.accept()
    session = ClientSession(_outbound(svc, ws, f"client of {user}"), user, token)
    await relay.client_connected(session)
    try:
        await session.send(encode(Welcome(user_id=user, max_payload=settings.max_payload_bytes,
                                          max_frame=svc.max_frame, version=__version__,
                                          blob_threshold=svc.blob_threshold)))
        await _serve_frames(ws, session, svc.client_frames, relay.client_message)
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        await relay.client_disconnected(session)


@router.websocket(ENDPOINT_WS_PATH)
async def endpoint_ws(ws: WebSocket) -> None:
    svc = services_of(ws)
    relay, settings, db = svc.relay, svc.settings, svc.db
    secret = bearer(ws.headers.get("authorization"))
    endpoint_id = ws.headers.get("x-tether-endpoint", "")
    ep = await db.endpoint_by_secret(endpoint_id, secret) if secret and endpoint_id else None
    if ep is not None and ep["parent_id"] and not await relay.parent_admits(ep, await db.get_endpoint(
            ep["parent_id"])):
        await _refuse(ws, CLOSE_AUTH_FAILED, ErrorCode.AUTH_FAILED, not_admitted_message(ep["parent_id"]))
        return
    if ep is None:
        await _refuse(ws, CLOSE_AUTH_FAILED, ErrorCode.AUTH_FAILED,
                      f"endpoint {endpoint_id[:64] or '?'}: invalid credential (wrong, rotated, or the endpoint was "
                      "deleted); re-register with 'tether endpoint start'")
        return
    await ws.accept()
    session = EndpointSession(_outbound(svc, ws, f"endpoint {ep['id']}"), ep, settings.prefetch)
    try:
        first = await ws.receive()
        if first["type"] == "websocket.disconnect":
            return
        try:
            hello = svc.endpoint_frames.decode(_frame_bytes(first))
            if not isinstance(hello, Hello):
                raise ProtocolError("the first frame of an endpoint must be 'hello'")
        except ProtocolError as exc:
            await session.send(encode(Error(code=ErrorCode.MALFORMED, message=str(exc), fatal=True)))
            await ws.close(code=CLOSE_PROTOCOL, reason=str(exc)[:120])
            return
        await session.send(encode(Welcome(endpoint_id=ep["id"], version=__version__,
                                          max_payload=settings.max_payload_bytes, max_frame=svc.max_frame,
                                          prefetch=settings.prefetch, blob_threshold=svc.blob_threshold)))
        await relay.endpoint_connected(session, hello)
        await _serve_frames(ws, session, svc.endpoint_frames, relay.endpoint_message)
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        await relay.endpoint_disconnected(session)
