"""An upload under way in this process, and what its readers wait for.

A task's arguments reach its endpoint (and a kept result its client) while they are still being
uploaded: readers follow the upload instead of waiting for its end. :class:`Arrival` is the state
they follow, shared by the two ways bytes move (through ASGI, :mod:`tether.service.blobs.routes`,
and on a taken socket, :mod:`tether.service.blobs.raw_transfer`), so both keep the same rules.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from typing import Any

#: a reader of a blob still being uploaded gives up after this long without a new byte
FOLLOW_IDLE_S = 60.0
#: a reader of a blob being uploaded through another replica waits at most this long for its end
FOLLOW_ELSEWHERE_S = 1800.0
#: bytes per read while following an upload
FOLLOW_PIECE = 1024 * 1024
#: bytes of an upload's latest pieces kept in memory for its readers (see :class:`Arrival`)
RECENT_BYTES = 8 * 1024 * 1024

#: bytes gathered before they are hashed and written, off the event loop: few thread hops, and
#: each piece is still in the CPU's cache when the thread hashes then writes it
WRITE_BATCH = 1024 * 1024


class Arrival:
    """An upload under way in this process, for readers that stream it as it arrives.

    A task's arguments reach its endpoint, and a kept result its client, while they are still
    being uploaded: the reader follows the upload's file, never ahead of what is written, and
    receives the last byte only once the whole upload matched its declared digest: an upload that
    ends in a mismatch or breaks off breaks the readers' streams (they see them short).

    The latest pieces written (:data:`RECENT_BYTES` of them) stay here, as the server received
    them: a reader keeping up with the upload is sent those very objects, instead of bytes read
    back from the file into new ones (a copy, and a thread hop, per mebibyte); one that falls
    behind reads the file."""

    def __init__(self) -> None:
        self.written = 0
        #: bytes in the upload's file (behind ``written`` by what a raw upload has not yet
        #: written past the page cache, see :class:`~.direct_file.DirectFile`; never by more than its batch)
        self.on_file = 0
        self.ended = False
        self.ok = False
        self._changed = asyncio.Event()
        #: guards ``_recent`` and ``version``: raw downloads read them from their threads
        self._lock = threading.Condition()
        #: counts changes, for a thread waiting for the next (:meth:`wait_changed`)
        self.version = 0
        #: where each reader following the upload is (bytes sent), and those it no longer waits for
        self._readers: dict[int, int] = {}
        self._left_behind: set[int] = set()
        self._recent: collections.deque[tuple[int, bytes]] = collections.deque()  # (offset, piece)
        self._recent_bytes = 0

    def advance(self, written: int, pieces: list[Any], on_file: int | None = None) -> None:
        """``pieces`` (ending at offset ``written``) have arrived, and the file holds ``on_file``
        bytes (``written`` if not given)."""
        offset = written - sum(len(piece) for piece in pieces)
        with self._lock:
            for piece in pieces:
                self._recent.append((offset, piece))
                offset += len(piece)
                self._recent_bytes += len(piece)
            while self._recent_bytes > RECENT_BYTES:
                self._recent_bytes -= len(self._recent.popleft()[1])
        self.written = written
        self.on_file = written if on_file is None else on_file
        self._wake()

    def piece_at(self, offset: int, end: int) -> bytes | memoryview | None:
        """The bytes from ``offset`` (up to ``end`` at most) that are still here, without a copy;
        None if they are not (the reader reads the file)."""
        with self._lock:
            for start, piece in self._recent:
                if start <= offset < start + len(piece):
                    if offset == start and start + len(piece) <= end:
                        return piece
                    return memoryview(piece)[offset - start : end - start]
        return None

    def readable(self, size: int) -> int:
        """How far a reader of this ``size``-byte blob may be sent now: what has arrived, but the
        last byte only once the upload's bytes matched their declared digest (a reader never
        receives a whole body that did not verify: readers check the size only, see
        tether.transfer.BlobReader)."""
        return self.written if self.ended and self.ok else min(self.written, size - 1)

    def broke_off(self, sent: int) -> bool:
        """Whether a reader that was sent ``sent`` bytes (and may be sent no more: see
        :meth:`readable`) will never get the rest: the upload ended without them, or failed."""
        return self.ended and (not self.ok or self.written <= sent)

    def end(self, ok: bool) -> None:
        self.ended, self.ok = True, ok
        if ok:
            self.on_file = self.written
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
        with self._lock:
            self.version += 1
            self._lock.notify_all()

    def reader_at(self, reader: int, sent: int | None) -> None:
        """Reader ``reader`` has sent ``sent`` bytes on (None: it is done)."""
        with self._lock:
            if sent is None:
                self._readers.pop(reader, None)
            else:
                self._readers[reader] = sent
            self._lock.notify_all()

    def wait_for_readers(self, upto: int, timeout: float) -> None:
        """(In a raw upload's thread, before the pieces up to ``upto`` are kept) wait until every
        reader following the upload is within the pieces kept in memory, so it is sent those and
        never reads back a file written past the page cache (from the disk). A reader that makes
        no progress for ``timeout`` seconds is left behind: it reads the file, and the upload
        goes on at its own pace. An upload then goes no faster than its readers, as a pipe."""
        floor = upto - RECENT_BYTES
        last: dict[int, int] | None = None
        deadline = 0.0
        with self._lock:
            while True:
                lagging = {k: v for k, v in self._readers.items() if v < floor and k not in self._left_behind}
                if not lagging:
                    return
                if lagging != last:
                    last, deadline = lagging, time.monotonic() + timeout
                left = deadline - time.monotonic()
                if left <= 0:
                    self._left_behind.update(lagging)
                    return
                self._lock.wait(left)

    def wait_changed(self, seen: int, timeout: float) -> bool:
        """(In a thread) wait for a change after version ``seen``; False if none came in ``timeout``."""
        with self._lock:
            return self._lock.wait_for(lambda: self.version != seen, timeout)

    async def changed(self, timeout: float) -> bool:
        """Wait for the next change; False if none came within ``timeout``."""
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            return False
        return True
