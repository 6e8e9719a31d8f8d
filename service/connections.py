"""Limits at the transport, before any request is parsed: how many connections the service
holds (in all and per address) and how long a connection may take to send its headers.

uvicorn reads headers for as long as a peer cares to trickle them, and accepts connections
until the process runs out of file descriptors: 1,100 half-open connections (slowloris) made
``/healthz`` time out for everyone. Its protocol classes are the one place that sees every
connection from its first byte, so the service runs them through :func:`guarded_protocols`,
which adds three checks and nothing else:

* a connection past ``max_connections`` in all, or ``max_connections_per_address`` from one
  address, is answered ``503`` and closed at once;
* a connection that has not completed a request's headers within ``header_timeout_s`` (since it
  opened or since its previous request) is dropped; an upgraded WebSocket is left alone (its
  pings find dead peers);
* a plain-HTTP request's ASGI scope carries a way to take its connection's socket
  (``scope["extensions"]["tether.raw"]``, see
  :class:`~tether.service.raw_connection.RawConnection`): the blob routes move a
  large body on it in a thread of their own, past uvicorn's per-piece parsing and copies;
* a WebSocket's ASGI scope carries the transport's ``abort`` and its write-buffer size
  (``scope["extensions"]["tether.transport"]``), so a session can drop a peer that stopped
  reading without waiting on it (see ``outbound.py``), and, with uvicorn's sans-I/O
  WebSocket protocol, a way to write several messages in one write (``send_frames``);
* with that protocol, reading pauses only once a received message waits for the app, not
  after each one (see ``send_receive_event_to_app``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import socket
from dataclasses import dataclass, field
from typing import Any

from .raw_connection import RAW_KEY, RawConnection

log = logging.getLogger("tether.service.connections")

#: what a refused connection is told before it is closed
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nConnection: close\r\n"
         b"Retry-After: 5\r\nContent-Length: %d\r\n\r\n%s")
#: the key of the transport's hooks in a WebSocket's ASGI scope
SCOPE_KEY = "tether.transport"
#: file descriptors kept for the database, blob files and logs beyond the connection cap
_RESERVED_FDS = 64


@dataclass
class ConnectionLimits:
    """The caps, and the connections counted against them (one event loop: no locking)."""

    max_connections: int = 2048
    max_per_address: int = 256  # 0: no cap (behind a balancer every peer has its address)
    header_timeout_s: float = 10.0
    _open: dict[int, str] = field(default_factory=dict)  # id(transport) -> peer address
    _per_address: dict[str, int] = field(default_factory=dict)

    def fit_to_descriptors(self) -> None:
        """Raise this process's open-file limit to its hard limit and keep the cap below it, so
        the cap answers before ``accept`` fails with "out of system resource"."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
            except (ValueError, OSError):
                pass
        room = soft - _RESERVED_FDS
        if room < self.max_connections:
            log.warning("max_connections %d lowered to %d: the process may open %d files (ulimit -n)",
                        self.max_connections, max(room, 16), soft)
            self.max_connections = max(room, 16)

    def admit(self, transport: asyncio.BaseTransport) -> str | None:
        """Count a new connection; None if admitted, else why not (in words)."""
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        if len(self._open) >= self.max_connections:
            return f"the service holds its most connections ({self.max_connections}); try again shortly"
        if self.max_per_address and self._per_address.get(address, 0) >= self.max_per_address:
            return f"{address} holds its most connections ({self.max_per_address}); close some and try again"
        self._open[id(transport)] = address
        self._per_address[address] = self._per_address.get(address, 0) + 1
        return None

    def release(self, transport: asyncio.BaseTransport | None) -> None:
        """Uncount a connection (idempotent: its HTTP and WebSocket protocols may both say so)."""
        address = self._open.pop(id(transport), None)
        if address is None:
            return
        left = self._per_address[address] - 1
        if left:
            self._per_address[address] = left
        else:
            del self._per_address[address]


#: the state of uvicorn's sans-I/O WebSocket protocol that ``send_frames`` reads before it
#: writes past ASGI (see ``_tether_send_frames``)
_SANS_IO_STATE = ("handshake_complete", "close_sent", "disconnected", "initial_response", "writable", "transport")


def guarded_protocols(limits: ConnectionLimits, http_base: type, ws_base: type) -> tuple[type, type]:
    """uvicorn's HTTP and WebSocket protocol classes with the limits above (see the docstring)."""

    class GuardedHTTP(http_base):  # type: ignore[misc, valid-type]
        _tether_timer: asyncio.TimerHandle | None = None
        _tether_seen: Any = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            refusal = limits.admit(transport)
            if refusal is not None:
                body = refusal.encode()
                transport.write(_BUSY % (len(body), body))  # type: ignore[attr-defined]
                transport.close()
                return
            self._tether_arm()

        def _tether_arm(self) -> None:
            self._tether_seen = self.cycle
            self._tether_timer = self.loop.call_later(limits.header_timeout_s, self._tether_check)

        def _tether_check(self) -> None:
            """Drop the connection unless a request's headers arrived since the timer was set
            (or one is still being answered); re-arm otherwise."""
            self._tether_timer = None
            transport = self.transport
            if transport.is_closing() or transport.get_protocol() is not self:  # closed, or upgraded
                return
            busy = self.cycle is not None and not self.cycle.response_complete
            if not busy and self.cycle is self._tether_seen:
                log.info("dropping a connection from %s: no complete request headers in %.0f s",
                         (self.client or ("?",))[0], limits.header_timeout_s)
                transport.abort()
                return
            self._tether_arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self.scheme == "http" and isinstance(getattr(self, "scope", None), dict):
                self.scope.setdefault("extensions", {})[RAW_KEY] = self._tether_take_raw

        def _tether_take_raw(self, timeout: float) -> RawConnection | None:
            """See :class:`RawConnection` (uvicorn's httptools protocol, checked with 0.55: its
            ``cycle``, ``flow``, ``pipeline``; a protocol without them is never taken)."""
            cycle, flow = getattr(self, "cycle", None), getattr(self, "flow", None)
            if (cycle is None or flow is None or getattr(self, "pipeline", None) or cycle.response_started
                    or getattr(cycle, "waiting_for_100_continue", False) or cycle.disconnected
                    or not hasattr(cycle, "body") or not hasattr(cycle, "more_body")):
                return None
            headers = dict(cycle.scope.get("headers") or [])
            if b"transfer-encoding" in headers:
                return None
            length = headers.get(b"content-length")
            sock = self.transport.get_extra_info("socket")
            if sock is None:
                return None
            flow.pause_reading()
            early = bytes(cycle.body)
            cycle.body = bytearray()
            cycle.disconnected = True  # the route answers with RawConnection.reply; ASGI's sends go nowhere
            raw = socket.socket(fileno=os.dup(sock.fileno()))
            raw.settimeout(timeout)
            return RawConnection(raw, early, int(length) if length and length.isdigit() else None, self.transport)

        def connection_lost(self, exc: Exception | None) -> None:
            if self._tether_timer is not None:
                self._tether_timer.cancel()
            limits.release(getattr(self, "transport", None))
            super().connection_lost(exc)

    class GuardedWebSocket(ws_base):  # type: ignore[misc, valid-type]
        async def run_asgi(self) -> None:
            transport = self.transport
            hooks = self.scope.setdefault("extensions", {})[SCOPE_KEY] = {
                "abort": transport.abort, "buffered": transport.get_write_buffer_size}
            conn = getattr(self, "conn", None)  # uvicorn's sans-I/O implementation: a websockets protocol
            if (hasattr(conn, "send_binary") and hasattr(conn, "data_to_send")
                    and all(hasattr(self, name) for name in _SANS_IO_STATE)):
                hooks["send_frames"] = self._tether_send_frames
            await super().run_asgi()

        def send_receive_event_to_app(self) -> None:
            """uvicorn's sans-I/O protocol pauses reading after every message it queues for the
            app and resumes once the app takes it: two epoll changes (libuv submits them through
            io_uring, a syscall each turn of the loop) per frame, on every task's path. Here
            reading pauses only once a message already waits (the app is behind): the queue
            still holds at most what one read brought in besides the one the app has yet to
            take, as it did (what one read delivers was queued whole before, too). A uvicorn
            without that state (``queue``, ``read_paused``) is left as it is."""
            queue = getattr(self, "queue", None)
            if queue is None or not hasattr(self, "read_paused") or self.read_paused or queue.qsize():
                super().send_receive_event_to_app()
                return
            self.read_paused = True  # (so the method below queues the message without pausing)
            try:
                super().send_receive_event_to_app()
            finally:
                self.read_paused = False

        def _tether_send_frames(self, frames: list[bytes]) -> bool:
            """Write binary messages in one write to the socket (one syscall here, one wake-up of
            the peer), as uvicorn's ``websocket.send`` writes each; False, having written
            nothing, where that would refuse (not open, closing, paused): the caller sends them
            one by one through ASGI, which says why. It reads the protocol's state
            (:data:`_SANS_IO_STATE`, checked with uvicorn 0.55 and websockets 17.4); a uvicorn
            without those attributes never gets this hook, and sends through ASGI."""
            if (not self.handshake_complete or self.close_sent or self.disconnected
                    or self.initial_response is not None or not self.writable.is_set()):
                return False
            try:
                for frame in frames:
                    self.conn.send_binary(frame)
            except Exception:  # noqa: BLE001 - InvalidState: the connection is closing
                return False
            self.transport.write(b"".join(self.conn.data_to_send()))
            return True

        def connection_lost(self, exc: Exception | None) -> None:
            limits.release(getattr(self, "transport", None))
            super().connection_lost(exc)

    return GuardedHTTP, GuardedWebSocket
