"""The WebSocket transport the client and the endpoint share: one way to open a connection,
one reconnect policy. Both only ever connect *outbound*, so a site firewall needs nothing open."""

from __future__ import annotations

import random
import ssl
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.protocol import State

from .protocol import DEFAULT_MAX_FRAME


async def open_ws(url: str, headers: dict[str, str], max_size: int = DEFAULT_MAX_FRAME,
                  ssl_context: ssl.SSLContext | None = None, open_timeout: float | None = None) -> ClientConnection:
    """Open a WebSocket with the settings Tether needs.

    Compression is off (payloads are pickles; deflate costs more than it saves on a LAN),
    proxies from the environment are ignored (the service is addressed directly), and pings
    detect a dead peer in about a minute even when no task is flowing.
    """
    kwargs: dict[str, Any] = {
        "additional_headers": headers,
        "max_size": max_size,
        "compression": None,
        "ping_interval": 20,
        "ping_timeout": 60,
        "open_timeout": open_timeout or 10,
        "close_timeout": 2,
        "max_queue": 256,
    }
    if ssl_context is not None:  # wss://: the certificate is verified against this context's CAs
        kwargs["ssl"] = ssl_context
    try:
        return await connect(url, proxy=None, **kwargs)
    except TypeError:  # websockets < 15 has no proxy support (and so no proxy argument)
        return await connect(url, **kwargs)


def send_now(ws: Any, frame: bytes) -> bool:
    """Write a binary message at once, from the event loop, when nothing stands before it: the
    connection is open, no fragmented message is being sent, and the socket took everything
    written so far (no flow-control wait is due). False, having written nothing, otherwise: the
    caller awaits ``ws.send(frame)``, which waits or raises as it should.

    This is what ``ws.send`` does for bytes, minus a task and a loop iteration to run it in and
    an async context manager per message (the client's submissions and the endpoint's results
    on a quiet line). It uses the connection's sans-I/O ``protocol`` and its ``send_data``
    (websockets 14-17); a connection without them takes the ordinary way. A caller that queues
    sends in tasks must call this only while none is pending, or frames would overtake them.
    """
    protocol, transport = getattr(ws, "protocol", None), getattr(ws, "transport", None)
    if (protocol is None or transport is None or not hasattr(ws, "send_data")
            or getattr(ws, "send_in_progress", True) is not None
            or protocol.state is not State.OPEN or transport.get_write_buffer_size()):
        return False
    protocol.send_binary(frame)
    try:
        ws.send_data()
    except Exception:  # noqa: BLE001 - the socket failed: the connection is lost (as ws.send would find)
        transport.abort()
    return True


class Backoff:
    """Exponential backoff with jitter, so a restarted service is not hit by every peer at once."""

    def __init__(self, initial: float = 0.05, maximum: float = 5.0):
        self.initial = initial
        self.maximum = maximum
        self.current = initial

    def next(self) -> float:
        delay = self.current * (0.5 + random.random())
        self.current = min(self.current * 2, self.maximum)
        return delay

    def reset(self) -> None:
        self.current = self.initial
