"""Raw protocol peers for the security tests: a client or an endpoint that sends whatever frame
the test shapes, over a real WebSocket, and reads what the service answers."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any

import msgpack
from websockets.exceptions import ConnectionClosed

from tether.protocol import (
    CLIENT_WS_PATH,
    ENDPOINT_WS_PATH,
    PROTOCOL_VERSION,
    TO_CLIENT_FRAMES,
    TO_ENDPOINT_FRAMES,
    Error,
    Frame,
    FrameDecoder,
    Subscribe,
    encode,
)
from tether.transport import open_ws

_to_client = FrameDecoder(TO_CLIENT_FRAMES, "the service")
_to_endpoint = FrameDecoder(TO_ENDPOINT_FRAMES, "the service")


def raw(t: str, **fields: Any) -> bytes:
    """A frame as a peer could shape it, typed or not."""
    return msgpack.packb({"v": PROTOCOL_VERSION, "t": t, **fields}, use_bin_type=True)


class RawPeer:
    """One WebSocket to the service, driven from a test's thread through a private loop."""

    def __init__(self, url: str, headers: dict[str, str], decoder: FrameDecoder):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._decoder = decoder
        self.headers = headers  # what it authenticated with (for HTTP requests as the same peer)
        self.ws = self._run(open_ws(url, headers))

    def _run(self, coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def send(self, frame: Frame | bytes) -> None:
        self._run(self.ws.send(frame if isinstance(frame, bytes) else encode(frame)))

    def recv(self, timeout: float = 30) -> Any:
        return self._decoder.decode(self._run(asyncio.wait_for(self.ws.recv(), timeout), timeout + 5))

    def recv_until(self, predicate: Any, timeout: float = 30) -> tuple[Any, list[Any]]:
        """Frames up to the first one that ``predicate`` accepts: (that frame, the ones before it)."""
        before = []
        while True:
            msg = self.recv(timeout)
            if predicate(msg):
                return msg, before
            before.append(msg)

    def barrier(self, tag: str) -> list[Any]:
        """Every frame the service sent before it answered a subscribe for an unknown id: frames
        arrive in order, so this says what (else) a previous frame caused, with no sleeping."""
        marker = f"barrier-{tag}"
        self.send(Subscribe(ids=[marker]))
        _, before = self.recv_until(lambda m: isinstance(m, Error) and marker in (m.ids or []))
        return before

    def stop_reading(self) -> None:
        """Leave what the service sends in the socket, as a peer that stopped reading does."""
        self._loop.call_soon_threadsafe(self.ws.transport.pause_reading)

    def closed(self, timeout: float = 30) -> ConnectionClosed:
        """Wait until the service closes the connection (reading what it sent before); return how."""
        self._loop.call_soon_threadsafe(self.ws.transport.resume_reading)
        try:
            while True:
                self._run(asyncio.wait_for(self.ws.recv(), timeout), timeout + 5)
        except ConnectionClosed as exc:
            return exc

    def close(self) -> None:
        try:
            self._run(self.ws.close(), 10)
        except Exception:  # noqa: BLE001 - already closed
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def raw_client(service_url: str, token: str) -> RawPeer:
    peer = RawPeer(service_url.replace("http", "ws", 1) + CLIENT_WS_PATH, {"Authorization": f"Bearer {token}"},
                   _to_client)
    peer.recv()  # welcome
    return peer


def raw_endpoint(service_url: str, endpoint_id: str, secret: str) -> RawPeer:
    """An endpoint connection that has not said hello yet."""
    return RawPeer(service_url.replace("http", "ws", 1) + ENDPOINT_WS_PATH,
                   {"Authorization": f"Bearer {secret}", "X-Tether-Endpoint": endpoint_id}, _to_endpoint)
