"""The service's side of each connection: what it holds for a client or an endpoint session.

A session is transport-free (anything with ``async send(bytes)`` and ``async close(code,
reason)``), so the relay (``relay.py``) decides what frames do and the WebSocket routes stay
thin. A client session gathers state updates and results into few frames; an endpoint session
holds what flow control needs (the tasks sent and not yet reported on, a small queue, the
cursor into its backlog).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from typing import Any, Protocol

from tether.bounded import BoundedCache
from tether.linger import Linger
from tether.protocol import (
    DEFAULT_MAX_FRAME,
    DEFAULT_PREFETCH,
    MAX_IDS,
    ErrorCode,
    ErrorInfo,
    Result,
    ResultAck,
    Status,
    Task,
    encode,
)
from tether.results import result_frames

from .database import credential_hash

log = logging.getLogger("tether.service.relay")

#: the largest frame the service sends: what clients and endpoints accept (see open_ws)
PEER_MAX_FRAME = DEFAULT_MAX_FRAME
STATUS_WINDOW = 0.005  # seconds a client's state updates are gathered before they are sent
#: seconds a submission's acknowledgement may wait for the next frame to its client: a quick task's
#: result then carries it (two frames, one wake-up of the client), and acks of a burst travel together
SUBMIT_ACK_WINDOW = 0.005
#: seconds an endpoint's result acknowledgements are gathered: the endpoint keeps those results
#: spooled that much longer, and a frame (a wake-up of the endpoint) serves several results
ACK_WINDOW = 0.01
RESULT_CHUNK = 1000  # results per frame to a client


class Sender(Protocol):
    async def send(self, frame: bytes) -> None: ...

    async def send_frames(self, frames: list[bytes]) -> None: ...

    async def close(self, code: int, reason: str) -> None: ...


class ClientSession:
    """One connected client process of one user.

    State updates and results for it are buffered and sent once per event-loop iteration, as
    at most one STATUS and one RESULT frame: under load, many endpoint frames collapse into a
    few client frames (each frame is a syscall; syscalls, not Python, bound throughput here).
    """

    def __init__(self, sender: Sender, user_id: str, token: str = ""):
        self.sender = sender
        self.user_id = user_id
        self.token = token  # kept to re-check it (revoked, rotated, expired at Globus) while connected
        self.token_hash = credential_hash(token) if token else ""
        self.watching: set[str] = set()
        self._updates: list[Any] = []
        self._results: list[Result] = []
        self._scheduled = False
        self._acks: list[bytes] = []  # encoded SUBMIT_ACK frames held for SUBMIT_ACK_WINDOW
        self._acks_linger = Linger(lambda: asyncio.ensure_future(self.send_held_acks()), SUBMIT_ACK_WINDOW,
                                   eager=False)
        self._updates_linger = Linger(self._flush_updates, STATUS_WINDOW, eager=False)

    async def send(self, frame: bytes | list[bytes]) -> None:
        """Send a frame, or frames in order (in one write to the socket while it takes them)."""
        if isinstance(frame, list):
            await self.sender.send_frames(frame)
        else:
            await self.sender.send(frame)

    def hold_ack(self, frame: bytes) -> None:
        """Send a submission's acknowledgement with the next frame to this client, or after
        SUBMIT_ACK_WINDOW: written back to back, the frames reach the client in one wake-up."""
        self._acks.append(frame)
        self._acks_linger.poke()

    async def send_held_acks(self) -> None:
        """Send the held acknowledgements now (before any frame that may concern their tasks)."""
        while self._acks:
            await send_or_drop(self, self._take_acks())

    def _take_acks(self) -> list[bytes]:
        """The held acknowledgements, now no longer held (their timer is disarmed: nothing is
        left for it, so no wake-up SUBMIT_ACK_WINDOW from now)."""
        acks, self._acks = self._acks, []
        if acks:
            self._acks_linger.cancel()
        return acks

    def push(self, key: str, items: list[Any]) -> None:
        if key == "updates":
            # state changes are not worth a frame each: gathered for STATUS_WINDOW
            self._updates.extend(items)
            self._updates_linger.poke()
            return
        if self._updates:  # a result supersedes the state changes of its task not yet sent
            ended = {r.id for r in items}
            self._updates = [u for u in self._updates if u[0] not in ended]
        self._results.extend(items)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_results)

    def _flush_updates(self) -> None:
        if self._acks:
            asyncio.ensure_future(self.send_held_acks())
        if self._updates:
            updates, self._updates = self._updates, []
            for start in range(0, len(updates), MAX_IDS):  # ~60 bytes each: MAX_IDS fit any frame
                asyncio.ensure_future(send_or_drop(self, encode(Status(updates=updates[start : start + MAX_IDS]))))

    def _flush_results(self) -> None:
        self._scheduled = False
        if self._results:
            asyncio.ensure_future(self.send_results_now())

    async def send_results_now(self) -> None:
        """Send buffered results in this coroutine (the scheduled flush then finds nothing),
        after the held acknowledgements and in the same write: the client wakes once for both."""
        while self._acks or self._results:
            frames = self._take_acks()
            results, self._results = self._results, []
            # a result too large for any frame reaches the client as the failure that says so
            frames.extend(result_frames(results, PEER_MAX_FRAME, RESULT_CHUNK))
            await send_or_drop(self, frames)


class EndpointSession:
    """One connected endpoint process, and what it holds (for flow control)."""

    def __init__(self, sender: Sender, endpoint: dict[str, Any], prefetch: int = DEFAULT_PREFETCH):
        self.sender = sender
        self.endpoint_id: str = endpoint["id"]
        self.owner_id: str = endpoint["owner_id"]
        self.secret_hash: str = endpoint["secret_hash"]
        self.multi_user: bool = bool(endpoint.get("multi_user"))
        self.parent_id: str | None = endpoint.get("parent_id")
        #: its authentication policy (checked on every submission without reading its row)
        self.authentication: dict[str, Any] | None = (json.loads(endpoint["policy"]).get("authentication")
                                                      if endpoint.get("policy") else None)
        self.sent_functions: BoundedCache[str, None] = BoundedCache(max_items=65536)
        self.prefetch = prefetch
        self.workers = 0
        #: tasks this session holds: sent (or held when it connected) and not yet reported finished
        self.sent: set[str] = set()
        #: stored tasks waiting for room, in memory while few (never while ``backlog``)
        self.queue: deque[tuple[str, Task]] = deque()
        self.queue_bytes = 0
        #: the store may hold open tasks for it not yet sent; paged from ``cursor`` = (t_received, id)
        self.backlog = True
        self.cursor: tuple[float, str] | None = None
        self.refilling = False
        #: a refill was asked for while one ran: new work may have been stored after its page was read
        self.refill_again = False
        self.status: dict[str, Any] = {}
        self.connected_at = time.time()
        self.refused_reports = 0
        self._acks: list[str] = []
        self._acks_since = 0.0  # loop time the oldest held acknowledgement was gathered
        self._acks_linger = Linger(self._flush_acks, ACK_WINDOW, eager=False)

    async def send(self, frame: bytes | list[bytes]) -> None:
        """Send a frame, or frames in order (in one write to the socket while it takes them)."""
        if isinstance(frame, list):
            await self.sender.send_frames(frame)
        else:
            await self.sender.send(frame)

    async def send_tasks(self, frame: bytes) -> None:
        """Send a TASKS frame, and behind it, in the same write, the acknowledgements held for
        half of ACK_WINDOW or more: while tasks flow they ride the frames going to the endpoint
        anyway, instead of a write and a wake-up of the endpoint of their own (the ones held
        for less wait on, so a lone task's TASKS frame does not carry an ack frame every time).
        The TASKS frame goes first: the endpoint hands its tasks on before it reads the acks."""
        if self._acks and asyncio.get_running_loop().time() - self._acks_since >= ACK_WINDOW / 2:
            await send_or_drop(self, [frame, *self._take_ack_frames()])
        else:
            await send_or_drop(self, frame)

    def acknowledge(self, ids: list[str]) -> None:
        """Tell the endpoint these results are stored (it drops them from its spool), gathered
        for ACK_WINDOW into one frame, or sooner with the next TASKS frame (``send_tasks``)."""
        if not self._acks:
            self._acks_since = asyncio.get_running_loop().time()
        self._acks.extend(ids)
        self._acks_linger.poke()

    def _take_ack_frames(self) -> list[bytes]:
        """The held acknowledgements as frames, now no longer held (their timer disarmed)."""
        ids, self._acks = self._acks, []
        self._acks_linger.cancel()
        return [encode(ResultAck(ids=ids[start : start + MAX_IDS])) for start in range(0, len(ids), MAX_IDS)]

    def _flush_acks(self) -> None:
        frames = self._take_ack_frames()
        if frames:
            asyncio.ensure_future(send_or_drop(self, frames))

    @property
    def window(self) -> int:
        """How many tasks it may hold: its workers plus the prefetch."""
        return self.workers + self.prefetch

    def set_capacity(self, capacity: dict[str, Any]) -> None:
        workers = capacity.get("workers_total")
        self.workers = workers if isinstance(workers, int) and not isinstance(workers, bool) else 0


def failed_result(task_id: str, code: ErrorCode, message: str) -> Result:
    """A failed RESULT for an error the service raised itself."""
    return Result(id=task_id, state="failed", times={"failed": time.time()},
                  error=ErrorInfo(type="PayloadTooLarge" if code == ErrorCode.PAYLOAD_TOO_LARGE else "TaskRejected",
                                  message=message, code=code.value))


async def send_or_drop(session: Any, frame: bytes | list[bytes]) -> None:
    """Send (a frame, or frames to a client session), tolerating a peer that went away: its state
    is durable, it will catch up on reconnect."""
    try:
        await session.send(frame)
    except Exception as exc:  # noqa: BLE001 - any transport error means the peer is gone
        log.debug("send to %r failed: %s", session, exc)


async def close_quietly(session: Any, code: int, reason: str) -> None:
    try:
        await session.sender.close(code, reason)
    except Exception as exc:  # noqa: BLE001 - already gone
        log.debug("close of %r failed: %s", session, exc)
