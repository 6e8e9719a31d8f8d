"""The WebSocket transport the client and the endpoint share: one way to open a connection,
one reconnect policy. Both only ever connect *outbound*, so a site firewall needs nothing open."""

from __future__ import annotations

import asyncio
import os
import random
import ssl
import threading
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.frames import Frame, Opcode
from websockets.protocol import Side, State

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


def _line_clear(ws: Any) -> bool:
    """Whether a whole message may be written to ``ws`` now, past its ``send``: the connection
    has websockets' sans-I/O ``protocol`` and ``send_data`` (14-17), is open, sends no fragmented
    message, and its socket took everything written so far (no flow-control wait is due)."""
    protocol, transport = getattr(ws, "protocol", None), getattr(ws, "transport", None)
    return not (protocol is None or transport is None or not hasattr(ws, "send_data")
                or getattr(ws, "send_in_progress", True) is not None
                or protocol.state is not State.OPEN or transport.get_write_buffer_size())


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
    if not _line_clear(ws):
        return False
    protocol, transport = ws.protocol, ws.transport
    protocol.send_binary(frame)
    try:
        ws.send_data()
    except Exception:  # noqa: BLE001 - the socket failed: the connection is lost (as ws.send would find)
        transport.abort()
    return True


class ThreadSender:
    """Lets a thread other than the event loop's write a whole binary message to a plain (not
    TLS) WebSocket at once, when nothing stands before it; installed on a connection that is open.

    Why: the client's loop runs in a thread of its own, and a task handed to it costs a wake-up
    of that thread and a hand-over of the GIL before the submission is written (~25-40 us of a
    ~1 ms round trip, measured with benchmarks/bench_hops.py). A lone task's submission is
    written by the submitting thread instead.

    How it stays in order: every write to the socket, the loop's and the other threads', is made
    under one lock. The loop's go through the connection's ``send_data`` (websockets writes
    nothing any other way), which this wraps; another thread writes the serialized frame to a
    duplicate of the socket's descriptor (so the number never names another file, however the
    loop closes its own). It does so only while the transport holds nothing unwritten; what the
    socket does not take at once is handed to the loop, which writes it before anything else.
    Data frames do not change websockets' protocol state, so the frame is serialized here as
    ``protocol.send_binary`` would (masked on a client's side; no extensions: compression is off,
    see open_ws).
    """

    def __init__(self, ws: Any, fd: int, loop: asyncio.AbstractEventLoop):
        self._ws = ws
        self._fd = fd
        self._loop = loop
        self._lock = threading.Lock()
        self._rest = b""  # what the socket did not take of a frame written here: the loop writes it first
        transport, original = ws.transport, ws.send_data

        def send_data() -> None:
            with self._lock:
                if self._rest:
                    rest, self._rest = self._rest, b""
                    transport.write(rest)
                original()

        ws.send_data = send_data

    @classmethod
    def install(cls, ws: Any, loop: asyncio.AbstractEventLoop) -> ThreadSender | None:
        """A sender for ``ws`` (call on its loop), or None where writing past the loop is not
        possible: TLS (the bytes on the wire are the TLS layer's), extensions on, or a
        connection without websockets' sans-I/O ``protocol`` and ``send_data``."""
        protocol, transport = getattr(ws, "protocol", None), getattr(ws, "transport", None)
        if protocol is None or transport is None or not hasattr(ws, "send_data") or protocol.extensions \
                or transport.get_extra_info("sslcontext") is not None:
            return None
        sock = transport.get_extra_info("socket")
        if sock is None:
            return None
        try:
            fd = os.dup(sock.fileno())
        except (OSError, ValueError):
            return None
        return cls(ws, fd, loop)

    def send(self, frame: bytes) -> bool:
        """Write ``frame`` as one binary message now, from any thread; False, having written
        nothing, when something stands before it (the caller hands it to the loop then): the
        connection is not open, a fragmented message or unwritten bytes wait, or this sender
        was closed. True once written, or handed to the loop; or if the socket failed (the
        connection is lost: as for a frame the loop wrote, the caller's resend covers it)."""
        ws = self._ws
        with self._lock:
            if (self._fd < 0 or self._rest or not _line_clear(ws) or ws.protocol.expect_continuation_frame
                    or ws.transport.is_closing()):
                return False
            data = Frame(Opcode.BINARY, frame).serialize(mask=ws.protocol.side is Side.CLIENT)
            try:
                written = os.write(self._fd, data)
            except BlockingIOError:
                written = 0
            except OSError:
                return True
            if written < len(data):
                self._rest = data[written:]
                self._loop.call_soon_threadsafe(ws.send_data)  # (the wrapper above writes the rest first)
        return True

    def close(self) -> None:
        """Stop writing past the loop (the connection ended); idempotent."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


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
