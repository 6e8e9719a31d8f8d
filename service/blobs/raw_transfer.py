"""Large blobs moved on their request's own socket, in a thread, past uvicorn and Starlette.

A body of a mebibyte or more is received (or a download sent) on the connection taken from
uvicorn (:class:`~tether.service.raw_connection.RawConnection`), with blocking calls in a
thread of a pool of its own: one copy out of the socket, no event loop in the way, ``sendfile``
for what is on disk. The routes (:mod:`tether.service.blobs.routes`) decide what moves; this
module moves it, with the same rules for readers following an upload as through ASGI
(:class:`~tether.service.blobs.arrival.Arrival`). Beyond :data:`RAW_THREADS` transfers at
once, and where a connection cannot be taken (TLS), the routes move the bytes through ASGI.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tether.spill import PIECE

from ..raw_connection import RawConnection, take_raw
from .arrival import FOLLOW_IDLE_S, FOLLOW_PIECE, WRITE_BATCH, Arrival
from .direct_file import DirectFile

log = logging.getLogger("tether.service.blobs")

#: uploads at least this large are received on their connection's socket, in a thread
#: (:class:`~tether.service.raw_connection.RawConnection`); smaller ones through ASGI
RAW_MIN_BYTES = 1024 * 1024
#: threads moving raw uploads at once, and as many for raw downloads (each holds one for its
#: whole transfer); a transfer beyond them goes through ASGI, as a small one does, rather than
#: wait (a download following an upload that waits for a thread would wait for nothing)
RAW_THREADS = 64
#: seconds a raw upload waits for its next bytes before it is dropped as broken off
RAW_IDLE_S = 60.0
#: seconds without progress after which a raw upload stops waiting for a reader that fell behind
#: the pieces kept in memory (it reads the file instead; see Arrival.wait_for_readers)
READER_STALL_S = 2.0
#: seconds a raw download waits for its reader to take more bytes before it is dropped
DOWNLOAD_SEND_TIMEOUT_S = 300.0
#: of those, the most the blobs of one user may hold at once, per direction: a user moving many
#: large blobs leaves the rest of the pool to the others (their own transfers beyond it go
#: through ASGI, slower, as every transfer beyond the pool does)
RAW_PER_USER = RAW_THREADS // 4
raw_uploads = concurrent.futures.ThreadPoolExecutor(RAW_THREADS, thread_name_prefix="tether-blob-in")
raw_downloads = concurrent.futures.ThreadPoolExecutor(RAW_THREADS, thread_name_prefix="tether-blob-out")
#: raw transfers under way per pool, in all and per owner of the blob (on the event loop: no lock)
_raw_busy: dict[Any, int] = {raw_uploads: 0, raw_downloads: 0}
_raw_owned: dict[tuple[Any, str], int] = {}


def take_raw_for(pool: Any, scope: dict, timeout: float, owner: str) -> RawConnection | None:
    """:func:`take_raw` while ``pool`` has a thread free for the transfer and the blob's
    ``owner`` holds fewer than :data:`RAW_PER_USER` of them (else None: ASGI)."""
    key = (pool, owner)
    if _raw_busy[pool] >= RAW_THREADS or _raw_owned.get(key, 0) >= RAW_PER_USER:
        return None
    raw = take_raw(scope, timeout)
    if raw is not None:
        _raw_busy[pool] += 1
        _raw_owned[key] = _raw_owned.get(key, 0) + 1

        def done() -> None:
            _raw_busy[pool] -= 1
            left = _raw_owned[key] - 1
            if left:
                _raw_owned[key] = left
            else:
                del _raw_owned[key]

        raw.on_done(done)
    return raw


def raw_in_use() -> dict[str, int]:
    """Raw transfers under way, by direction (for the service's metrics)."""
    return {"upload": _raw_busy[raw_uploads], "download": _raw_busy[raw_downloads]}


class BrokeOff(Exception):
    """A raw upload's connection ended (or stalled) before its body did."""


def _receive_raw(raw: RawConnection, path: Path, digest: Any, declared: int, tail: bytearray | None,
                 advance: Callable[[int, list[Any], int], None], wait_for_readers: Callable[[int], None]) -> int:
    """Receive a body on a taken connection (in a thread of :data:`raw_uploads`) into ``path``;
    returns the blob bytes received. Each piece of ``PIECE`` bytes is received into a buffer
    of its own, hashed, staged for the file (:class:`DirectFile`) while it is in the CPU's
    cache, and handed to ``advance`` (readers following the upload, every mebibyte): one
    copy out of the socket, against four through the HTTP stack, and no event loop in the way.
    The receives, the hashing and the writes release the GIL. (The socket's low-water mark is
    left alone: set to a piece, it let a fresh connection's window stay below it, and the
    upload stalled with the piece unfinished.)"""
    assert raw.length is not None
    blob_left = declared
    body_left = raw.length
    early = memoryview(raw.early)
    batch: list[Any] = []
    batched = received = 0
    out = DirectFile(path)
    try:
        while body_left:
            piece = bytearray(min(PIECE, body_left))
            view = memoryview(piece)
            filled = min(len(early), len(piece))
            view[:filled] = early[:filled]
            early = early[filled:]
            while filled < len(piece):
                try:
                    n = raw.sock.recv_into(view[filled:])
                except OSError as exc:  # (a timeout too)
                    raise BrokeOff(str(exc)) from exc
                if not n:
                    raise BrokeOff("the connection ended")
                filled += n
            body_left -= len(piece)
            mine = min(len(piece), blob_left)
            if mine < len(piece):  # past the blob's bytes: its digest (DIGEST_AT_END bytes)
                if tail is not None:
                    tail += view[mine:]
                view = view[:mine]
            if mine:
                digest.update(view)
                out.write(view)
                blob_left -= mine
                received += mine
                batch.append(view)
                batched += mine
            if batched >= WRITE_BATCH:
                wait_for_readers(received)
                advance(received, batch, out.offset)
                batch, batched = [], 0
        out.close()
        advance(received, batch, out.offset)  # the last pieces, with the file whole
        received = out.offset  # (what the size check sees: the file)
    finally:
        with contextlib.suppress(Exception):  # broken off: that is what the caller hears, not this
            out.close()
    return received


async def in_raw_thread(raw: RawConnection, path: Path, digest: Any, declared: int, tail: bytearray | None,
                         arrival: Arrival) -> int:
    """:func:`_receive_raw` in a thread of :data:`raw_uploads`; readers following the upload are
    told on the event loop. Cancelled (the service stopping): the connection is dropped and
    the thread waited for, so it never writes to a file about to be deleted."""
    loop = asyncio.get_running_loop()

    def advance(written: int, pieces: list[Any], on_file: int) -> None:
        loop.call_soon_threadsafe(arrival.advance, written, pieces, on_file)

    def wait_for_readers(upto: int) -> None:
        arrival.wait_for_readers(upto, READER_STALL_S)

    return await _in_pool(raw, raw_uploads, _receive_raw, raw, path, digest, declared, tail, advance,
                          wait_for_readers)


async def _in_pool(raw: RawConnection, pool: concurrent.futures.ThreadPoolExecutor, fn: Callable[..., Any],
                   *args: Any) -> Any:
    """``fn(*args)`` in a thread of ``pool``, moving ``raw``'s bytes. Cancelled (the service
    stopping): the connection is dropped, so a thread blocked on it wakes, and the thread is
    waited for (it never touches a file or a socket about to go)."""
    moving = asyncio.get_running_loop().run_in_executor(pool, fn, *args)
    try:
        return await asyncio.shield(moving)
    except asyncio.CancelledError:
        raw.abort()
        await asyncio.gather(moving, return_exceptions=True)
        raise


def send_following(raw: RawConnection, fh: Any, arrival: Arrival, size: int, blob_id: str) -> None:
    """What the routes' ``_follow`` does through ASGI, in a thread, onto a taken connection: the
    pieces kept in memory with ``sendall``, the file (a reader fallen behind) with ``sendfile``;
    the same rules (never past what arrived, the last byte once the upload verified, broken off
    with the upload)."""
    sent = 0
    me = id(raw)
    arrival.reader_at(me, 0)
    try:
        while sent < size:
            seen = arrival.version
            readable = arrival.readable(size)
            if readable > sent:
                piece = arrival.piece_at(sent, readable)
                if piece is not None:
                    raw.sock.sendall(piece)
                    sent += len(piece)
                    arrival.reader_at(me, sent)
                    continue
                if arrival.on_file > sent:
                    sent += raw.sock.sendfile(fh, sent, min(FOLLOW_PIECE, min(readable, arrival.on_file) - sent)) or 0
                    arrival.reader_at(me, sent)
                    continue
            elif arrival.ended:
                if arrival.broke_off(sent):
                    raise BrokeOff(f"blob {blob_id}: its upload broke off at {arrival.written} of {size} bytes")
                continue
            if not arrival.wait_changed(seen, FOLLOW_IDLE_S):
                raise BrokeOff(f"blob {blob_id}: no bytes arrived for {FOLLOW_IDLE_S:g} s")
    finally:
        arrival.reader_at(me, None)


def send_file(raw: RawConnection, fh: Any, size: int) -> None:
    """A complete blob onto a taken connection, from the page cache to the socket (``sendfile``)."""
    sent = 0
    while sent < size:
        n = raw.sock.sendfile(fh, sent, size - sent)
        if not n:
            raise BrokeOff(f"the file ended at {sent} of {size} bytes")
        sent += n


async def send_raw(raw: RawConnection, headers: dict[str, str], body: Callable[[], None]) -> None:
    """Answer a download on a taken connection: the head, then ``body()``, in a thread of
    :data:`raw_downloads`, then close it; a body that fails breaks the connection off (the reader
    sees it short, as through ASGI). Cancelled: the connection is dropped and the thread awaited."""
    head = ["HTTP/1.1 200 OK", "content-type: application/octet-stream", "connection: close",
            *(f"{name.lower()}: {value}" for name, value in headers.items())]

    def send() -> None:
        raw.sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        body()

    try:
        await _in_pool(raw, raw_downloads, send)
    except (OSError, BrokeOff) as exc:
        log.info("download broke off: %s", exc)
        raw.abort()
        return
    raw.finish()
