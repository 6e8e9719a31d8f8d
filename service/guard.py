"""A request is judged before its body is read: who sends it, and how large it says it is.

FastAPI reads a route's JSON body before it resolves the route's dependencies, the
authentication among them, so without this an anonymous peer could make the service read (and
hold) as much as it cared to send before hearing 401. This ASGI middleware answers first:

* no bearer credential: 401, for any request that carries a body;
* a credential that is no user's: 401 (blob routes excepted: endpoints use them with their
  own credentials, and the blob routes authenticate before they read a byte);
* a body that does not announce its size, or announces more than ``max_body`` bytes: 413
  (large data travels as blobs, whose uploads are declared and checked by their own routes).

The body is never read on a refusal; the server then closes the connection.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

#: methods whose requests carry a body
WITH_BODY = frozenset({"POST", "PUT", "PATCH"})
#: routes that authenticate users and endpoints themselves, before reading (service/blobs/routes.py)
BLOB_PREFIX = "/v1/blobs"


def bearer(value: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if value and value.lower().startswith("bearer "):
        return value[7:].strip() or None
    return None


class BodyGuard:
    """ASGI middleware: authenticate and size-check a request before its body is read."""

    def __init__(self, app: ASGIApp, authenticate: Callable[[str], Awaitable[Any]], max_body: int):
        self.app = app
        self.authenticate = authenticate
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in WITH_BODY:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        token = bearer(headers.get("authorization"))
        if token is None:
            await _refuse(send, 401, "missing credentials: send 'Authorization: Bearer <token>'")
            return
        path: str = scope["path"]
        if path.startswith(BLOB_PREFIX + "/"):  # an upload: sized by its declaration, checked by its route
            await self.app(scope, receive, send)
            return
        if not path.startswith(BLOB_PREFIX) and await self.authenticate(token) is None:
            await _refuse(send, 401, "invalid token: it is unknown to this service, was revoked, or has expired")
            return
        length = headers.get("content-length")
        if length is None or not length.isdigit() or int(length) > self.max_body:
            await _refuse(send, 413, f"a request body must announce its size (Content-Length) and be at most "
                                     f"{self.max_body} bytes; larger data travels as blobs (docs/payloads.md)")
            return
        await self.app(scope, receive, send)


async def _refuse(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


__all__ = ["BodyGuard", "bearer"]
