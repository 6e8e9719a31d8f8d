"""What the service sends one peer: bounded, in order, and never waited on by anyone else.

A peer that stops reading its socket used to hold every frame meant for it (each in a task of
its own, +200 MiB in one run), and closing that connection waited behind the stuck send, so
revoking another user's token waited too. Here a frame is written at once while the
connection's buffer is empty (the common case: no task, no wake-up), and otherwise queued for
one writer task. The queue is bounded in bytes (``max_queued_bytes``); a frame the peer has not
taken within ``send_timeout_s`` or a queue past its bound drops the connection, with its
reason in the log. :meth:`Outbound.close` never waits on the peer: what is queued is dropped,
and a connection whose buffer is not empty is aborted rather than closed politely (its state
is durable; a client or endpoint catches up when it reconnects).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from typing import Any

from .connections import SCOPE_KEY

log = logging.getLogger("tether.service.outbound")

#: bytes queued for one peer beyond what its socket took, before it is dropped as too slow
DEFAULT_MAX_QUEUED = 64 * 1024 * 1024
#: seconds a peer may take to accept one frame
DEFAULT_SEND_TIMEOUT = 30.0
#: seconds a polite close may take where the transport cannot be aborted (other servers)
_CLOSE_TIMEOUT = 2.0


class Outbound:
    """The frames to one WebSocket peer (a ``Sender`` for ``sessions.py``)."""

    def __init__(self, ws: Any, max_queued: int = DEFAULT_MAX_QUEUED,
                 send_timeout: float = DEFAULT_SEND_TIMEOUT, who: str = "peer"):
        self.ws = ws
        self.max_queued = max_queued
        self.send_timeout = send_timeout
        self.who = who
        hooks = ws.scope.get("extensions", {}).get(SCOPE_KEY) or {}
        self._abort = hooks.get("abort")
        self._buffered = hooks.get("buffered")
        self._send_frames = hooks.get("send_frames")
        self._frames: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._writer: asyncio.Task[None] | None = None
        self.closed: str | None = None  # why, once closed

    def _line_free(self) -> bool:
        """The socket took everything so far: a write now completes without waiting."""
        return (not self._frames and self._writer is None and self._buffered is not None
                and self._buffered() == 0)

    async def send(self, frame: bytes) -> None:
        """Send ``frame`` now or queue it; never wait on the peer. After a close it is dropped
        (the peer is gone; what it missed is in the store)."""
        if self.closed is not None:
            return
        if self._line_free():
            # one write past ASGI's layers where uvicorn's protocol allows it (send_frames)
            if self._send_frames is None or not self._send_frames([frame]):
                await self.ws.send_bytes(frame)
            return
        if self._queued + len(frame) > self.max_queued and self._frames:
            self._drop(f"it stopped reading: {self._queued + len(frame)} bytes waited for it "
                       f"(max_queued_bytes_per_connection = {self.max_queued})")
            return
        self._frames.append(frame)
        self._queued += len(frame)
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write())

    async def send_frames(self, frames: list[bytes]) -> None:
        """Send ``frames`` in order; while the line is free, in one write to the socket (a
        submission's acknowledgement and its task's result wake the peer once, not twice)."""
        if self._send_frames is not None and self.closed is None and self._line_free() and self._send_frames(frames):
            return
        for frame in frames:
            await self.send(frame)

    async def _write(self) -> None:
        try:
            while self._frames and self.closed is None:
                frame = self._frames[0]
                try:
                    await asyncio.wait_for(self.ws.send_bytes(frame), self.send_timeout)
                except TimeoutError:
                    self._drop(f"it took no frame in {self.send_timeout:.0f} s (send_timeout_s)")
                    return
                except Exception as exc:  # noqa: BLE001 - the transport is gone: so is the peer
                    self._drop(f"sending failed: {exc!r}", quiet=True)
                    return
                self._frames.popleft()
                self._queued -= len(frame)
        finally:
            self._writer = None

    def _drop(self, why: str, quiet: bool = False) -> None:
        """End the connection at once: queued frames are discarded, the transport aborted."""
        if self.closed is None:
            self.closed = why
            if not quiet:
                log.warning("dropping %s: %s", self.who, why)
        self._frames.clear()
        self._queued = 0
        writer, self._writer = self._writer, None
        if writer is not None and writer is not asyncio.current_task():
            writer.cancel()
        if self._abort is not None:
            self._abort()
        else:  # no transport to abort: close through ASGI, in the background, bounded
            asyncio.get_running_loop().create_task(self._close_politely(1008, why))

    async def close(self, code: int, reason: str) -> None:
        """Close with ``code`` and ``reason`` if the peer is keeping up; otherwise abort. Never
        waits on the peer."""
        if self.closed is not None:
            return
        if self._line_free():
            self.closed = reason
            await self.ws.close(code=code, reason=reason[:120])
            return
        self._drop(f"closed ({code}: {reason}) while behind", quiet=True)

    async def _close_politely(self, code: int, reason: str) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(code=code, reason=reason[:120]), _CLOSE_TIMEOUT)
