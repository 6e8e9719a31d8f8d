"""A request's connection taken from uvicorn, so a large body moves on its socket in a thread.

The blob routes (:mod:`tether.service.blobs.raw_transfer`) use it through :func:`take_raw`; the
service's uvicorn protocol (:func:`tether.service.connections.guarded_protocols`) puts the way
to take it in each plain-HTTP request's ASGI scope (under :data:`RAW_KEY`). This module is what
both sides share: the key, the taken connection, and the answers it can give.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from typing import Any

#: the key of a plain-HTTP request's :class:`RawConnection` taker in its ASGI scope
RAW_KEY = "tether.raw"


class RawConnection:
    """A request's connection taken from uvicorn, after its headers, to move its body (or its
    response's) with blocking calls in a thread: ``recv_into`` a buffer that is then hashed
    and written, ``sendfile`` from a blob's file. Through uvicorn and Starlette each mebibyte of
    a body was copied three times more (the loop's read, ``cycle.body +=``, ``bytes(body)``)
    and cost a wake-up of the event loop per read; here the loop is not involved at all.

    ``sock`` is a duplicate of the connection's descriptor (with a timeout: the description
    stays non-blocking for the transport); the transport no longer reads, and the request's
    ASGI cycle is marked disconnected, so what the route returns is not sent: the route answers
    with :meth:`reply`, which closes the connection (it was not read to a known end otherwise)."""

    def __init__(self, sock: socket.socket, early: bytes, length: int | None, transport: asyncio.Transport):
        self.sock = sock
        #: body bytes uvicorn had already read when the connection was taken
        self.early = early
        #: the request's Content-Length (None: none was given)
        self.length = length
        self._transport = transport
        self.replied = False
        self._done: list[Any] = []

    def on_done(self, callback: Any) -> None:
        """Call ``callback()`` once, when the connection is answered, finished or dropped."""
        self._done.append(callback)

    def _ended(self) -> None:
        done, self._done = self._done, []
        for callback in done:
            callback()

    def reply(self, status: int, body: bytes, headers: dict[str, str] | None = None,
              reason: str = "") -> None:
        """Answer the request and close the connection (on the event loop)."""
        if self.replied:
            return
        self.replied = True
        head = [f"HTTP/1.1 {status} {reason or _REASONS.get(status, 'Response')}",
                "content-type: application/json", f"content-length: {len(body)}", "connection: close"]
        head += [f"{name}: {value}" for name, value in (headers or {}).items()]
        self.close_socket()
        if not self._transport.is_closing():
            self._transport.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        self._transport.close()
        self._ended()

    def reply_json(self, status: int, value: object, headers: dict[str, str] | None = None) -> None:
        self.reply(status, json.dumps(value).encode(), headers)

    def close_socket(self) -> None:
        """Close the duplicate descriptor (the transport keeps the connection until :meth:`reply`)."""
        self.sock.close()

    def finish(self) -> None:
        """Close the connection after a response sent on :attr:`sock` (the bytes written are
        delivered before the close)."""
        self.replied = True
        self.close_socket()
        self._transport.close()
        self._ended()

    def abort(self) -> None:
        """Drop the connection without an answer (the peer went away, or the service stops): a
        thread blocked on the socket wakes up (shutdown, then close)."""
        self.replied = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.close_socket()
        self._transport.abort()
        self._ended()


_REASONS = {200: "OK", 201: "Created", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            409: "Conflict", 413: "Content Too Large", 429: "Too Many Requests", 500: "Internal Server Error"}


def take_raw(scope: dict, timeout: float) -> RawConnection | None:
    """The request's connection as a :class:`RawConnection`, or None where it cannot be taken
    (TLS: the bytes are the transport's to decrypt; a pipelined request behind this one; an
    ``Expect: 100-continue``; a chunked body): the caller then moves the body through ASGI."""
    taker = scope.get("extensions", {}).get(RAW_KEY)
    return taker(timeout) if taker is not None else None
