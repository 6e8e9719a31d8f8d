"""The client's side of results kept on endpoints: asking the service for one, and telling it
which ones nobody here holds any more.

A result over the keep threshold stays on its endpoint (``docs/payloads.md``); the future
holds a :class:`tether.RemoteValue`. The first ``result()`` (or ``fetch()``) asks for it with a
``fetch`` frame; every thread that asks meanwhile waits for the same answer (a ``fetched``
frame: the bytes, or the stub of a blob the endpoint uploaded, or why there is none). Handles
that are garbage collected queue a release, sent with the connection's periodic frames.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
from collections.abc import Callable

from .errors import PayloadTooLarge, QuotaExceeded, ResultLost, TetherError
from .protocol import MAX_IDS, ErrorCode, Fetch, Fetched, Release, encode

#: the error a refusal's code stands for (any other: the result is lost, or out of reach)
_ERRORS: dict[str, type[TetherError]] = {ErrorCode.PAYLOAD_TOO_LARGE.value: PayloadTooLarge,
                                         ErrorCode.QUOTA_EXCEEDED.value: QuotaExceeded}


class KeptAsks:
    """Fetches waiting for the service's answer, and releases waiting to be sent.

    ``send(frame)`` queues a frame on the connection (any thread).
    """

    def __init__(self, send: Callable[[bytes], None]):
        self._send = send
        self._waiting: dict[str, concurrent.futures.Future[bytes]] = {}
        self._lock = threading.Lock()
        #: appended by finalizers on any thread; drained, never swapped
        self.released: collections.deque[str] = collections.deque()

    def ask(self, task_id: str) -> concurrent.futures.Future[bytes]:
        """The answer to come for ``task_id`` (asked now unless an ask is already out)."""
        with self._lock:
            waiting = self._waiting.get(task_id)
            if waiting is None:
                waiting = self._waiting[task_id] = concurrent.futures.Future()
                self._send(encode(Fetch(ids=[task_id])))
        return waiting

    def answered(self, msg: Fetched) -> None:
        """The service's answer: the bytes (or a blob's stub), or the reason as its error."""
        with self._lock:
            waiting = {tid: self._waiting.pop(tid, None) for tid in (*msg.data, *msg.errors)}
        for tid, data in msg.data.items():
            fut = waiting.get(tid)
            if fut is not None:
                fut.set_result(data)
        for tid, error in msg.errors.items():
            fut = waiting.get(tid)
            if fut is not None:
                fut.set_exception(_ERRORS.get(error.code or "", ResultLost)(f"task {tid}: {error.message}"))

    def frames_to_resend(self) -> list[bytes]:
        """After a reconnect: the asks that were not answered, again."""
        with self._lock:
            pending = list(self._waiting)
        return [encode(Fetch(ids=pending[i : i + MAX_IDS])) for i in range(0, len(pending), MAX_IDS)]

    def release_frames(self) -> list[bytes]:
        """Releases gathered since the last call, as frames."""
        if not self.released:
            return []
        ids = [self.released.popleft() for _ in range(len(self.released))]
        return [encode(Release(ids=ids[i : i + MAX_IDS])) for i in range(0, len(ids), MAX_IDS)]

    def fail_all(self, exc: BaseException) -> None:
        """The connection is closed for good: every waiting fetch fails with its reason."""
        with self._lock:
            waiting, self._waiting = self._waiting, {}
        for fut in waiting.values():
            fut.set_exception(exc)
