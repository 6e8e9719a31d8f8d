"""Blobs: arguments, results and function bodies too large for a WebSocket frame.

They are streamed through the service over plain HTTP and kept as files under
``<service home>/blobs/``, never whole in the service's memory: an upload is written to disk
and hashed chunk by chunk as it arrives (``request.stream()``), a download is a file response.
Frames carry only a small reference (:func:`tether.protocol.blob_stub`).

Who may do what (every request authenticated, by a user's token or an endpoint's credential):

* a user declares (``POST /v1/blobs``), uploads, reads and deletes their own blobs only;
* a task names the blobs it uses (``Task.blobs``) and is accepted only if its submitter owns
  each one, complete (:meth:`BlobIndex.owned`, called by the relay);
* an endpoint reads a blob only while an open task dispatched to it names it, and writes a
  result blob only for an open task it holds; that blob belongs to the task's owner.

Limits are checked on the declared size before any byte moves: ``max_blob_bytes`` (413) and a
per-user quota of stored bytes (429), in words. A blob lives as long as the tasks that name it
(the store's purge, with its retention periods, removes the tasks; :meth:`BlobIndex.purge`
then removes blobs no task names any more); an upload that breaks off is deleted at once, and
one declared or stored but never named by a task is deleted after ``orphan_s``.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import errno
import functools
import hashlib
import logging
import mmap
import os
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import FileResponse, Response, StreamingResponse
from sqlalchemy import and_, bindparam, delete, exists, func, select, update
from starlette.requests import ClientDisconnect

from tether.ids import child_path
from tether.protocol import ERROR_HEADER, SHA256_HEADER, ErrorCode, Task
from tether.spill import CHUNK, hash_and_write

from .async_store import AsyncStore
from .connections import RawConnection, take_raw
from .guard import bearer
from .models import BlobCreate, BlobInfo, PathId
from .models import error_responses as _errors
from .store import Store
from .tables import blobs, task_blobs, tasks

log = logging.getLogger("tether.service.blobs")

#: names the refusal of an upload whose bytes are not what was declared (the client raises BlobCorrupt)
_CORRUPT = {ERROR_HEADER: ErrorCode.BLOB_CORRUPT.value}

DEFAULT_MAX_BLOB = 16 * 1024**3
DEFAULT_QUOTA = 100 * 1024**3
DEFAULT_ORPHAN_S = 3600.0
_STORED_BYTES = select(func.coalesce(func.sum(blobs.c.size), 0)).where(blobs.c.owner_id == bindparam("owner"))

RESERVED, UPLOADING, COMPLETE = "reserved", "uploading", "complete"
#: bytes after a blob's own in an upload whose sha256 is declared at its end (its hex digest)
DIGEST_AT_END = 64


@dataclass(frozen=True)
class Principal:
    """Who sent a request: a user, or an endpoint (its store row)."""

    user_id: str | None = None
    endpoint: dict[str, Any] | None = None

    @property
    def uploader(self) -> str:
        return f"user:{self.user_id}" if self.user_id is not None else f"endpoint:{self.endpoint['id']}"  # type: ignore[index]


class _BlobFile(FileResponse):
    """A file response read in 1 MiB pieces (Starlette's 64 KiB costs a thread hop per piece:
    a third of the download rate on a busy host)."""

    chunk_size = 1024 * 1024


#: a reader of a blob still being uploaded gives up after this long without a new byte
FOLLOW_IDLE_S = 60.0
#: a reader of a blob being uploaded through another replica waits at most this long for its end
FOLLOW_ELSEWHERE_S = 1800.0
#: bytes per read while following an upload
FOLLOW_PIECE = 1024 * 1024
#: bytes of an upload's latest pieces kept in memory for its readers (see :class:`Arrival`)
RECENT_BYTES = 8 * 1024 * 1024


class Arrival:
    """An upload under way in this process, for readers that stream it as it arrives.

    A task's arguments reach its endpoint, and a kept result its client, while they are still
    being uploaded: the reader follows the upload's file, never ahead of what is written, and
    receives the last byte only once the whole upload matched its declared sha256: an upload that
    ends in a mismatch or breaks off breaks the readers' streams (they see them short).

    The latest pieces written (:data:`RECENT_BYTES` of them) stay here, as the server received
    them: a reader keeping up with the upload is sent those very objects, instead of bytes read
    back from the file into new ones (a copy, and a thread hop, per mebibyte); one that falls
    behind reads the file."""

    def __init__(self) -> None:
        self.written = 0
        #: bytes in the upload's file (behind ``written`` by what a raw upload has not yet
        #: written past the page cache, see :class:`_DirectFile`; never by more than its batch)
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


class BlobIndex:
    """The blobs' rows (in the service's store) and files (in ``root``)."""

    def __init__(self, store: Store, root: Path, max_blob: int = DEFAULT_MAX_BLOB, quota: int = DEFAULT_QUOTA,
                 orphan_s: float = DEFAULT_ORPHAN_S):
        self.store, self.root = store, root
        self.max_blob, self.quota, self.orphan_s = max_blob, quota, orphan_s
        #: uploads under way in this process (one entry per upload in progress)
        self.arriving: dict[str, Arrival] = {}
        #: blobs whose readers wait for their upload to start here (set when it does)
        self.awaited: dict[str, asyncio.Event] = {}
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._drop_interrupted()

    def path(self, blob_id: str, part: bool = False) -> Path:
        path = child_path(self.root, blob_id, "blob id")
        return path.with_name(blob_id + ".part") if part else path

    def _drop_interrupted(self) -> None:
        """Uploads cut short by a restart of the service can never complete: forget them."""
        with self.store.transaction() as conn:
            ids = [r.id for r in conn.execute(select(blobs.c.id).where(blobs.c.state == UPLOADING))]
            conn.execute(delete(blobs).where(blobs.c.state == UPLOADING))
        for blob_id in ids:
            self.path(blob_id, part=True).unlink(missing_ok=True)

    # --- rows ----------------------------------------------------------------------------------
    def get(self, blob_id: str) -> Any:
        with self.store.transaction() as conn:
            return conn.execute(select(blobs).where(blobs.c.id == blob_id)).first()

    def reserve(self, who: Principal, body: BlobCreate) -> Any:
        """Check the limits on the declared size and record the blob (no bytes yet)."""
        owner = who.user_id
        if who.endpoint is not None:
            if body.task_id is None:
                raise HTTPException(403, "an endpoint stores blobs only as task results: give 'task_id'")
            owner = self._result_owner(who.endpoint["id"], body.task_id)
        elif body.task_id is not None:
            raise HTTPException(403, "'task_id' is for endpoints storing a task's result; omit it")
        assert owner is not None
        if body.size > self.max_blob:
            raise HTTPException(413, f"a blob of {body.size} bytes is over this service's limit of {self.max_blob} "
                                     "bytes per blob (--max-blob-bytes)")
        blob_id = str(uuid.uuid4())
        row = {"id": blob_id, "owner_id": owner, "uploader": who.uploader, "size": body.size,
               "sha256": body.sha256 or "",  # none: declared at the end of the upload ("" until then)
               "state": RESERVED, "created_at": time.time(), "linked": body.task_id is not None}
        with self.store.transaction() as conn:
            # the check and the insert are one step (concurrent uploads cannot all fit one gap)
            self.store.lock_owner(conn, owner, "blobs")
            used = int(conn.execute(_STORED_BYTES, {"owner": owner}).scalar_one())
            if used + body.size > self.quota:
                raise HTTPException(429, f"storing {body.size} more bytes would take you over your quota of "
                                         f"{self.quota} stored bytes ({used} in use); wait for results to be "
                                         "collected and expire, or ask the service's operator for a larger "
                                         "--blob-quota-bytes")
            conn.execute(blobs.insert().values(**row))
            if body.task_id is not None:
                conn.execute(task_blobs.insert().values(task_id=body.task_id, blob_id=blob_id, role="result"))
        return self.get(blob_id)

    def _result_owner(self, endpoint_id: str, task_id: str) -> str:
        """The owner of an open task this endpoint holds (else 404: it is not the endpoint's)."""
        owner = self.store.open_task_owner(endpoint_id, task_id) or self.store.kept_result_owner(endpoint_id, task_id)
        if owner is None:
            raise HTTPException(404, f"unknown task {task_id}: no open task with this id is dispatched to this "
                                     "endpoint")
        return owner

    def may_read(self, who: Principal, row: Any) -> bool:
        """Users read their own blobs; endpoints those named by an open task dispatched to them
        (complete or still being uploaded)."""
        if row is None:
            return False
        if who.user_id is not None:
            return row.owner_id == who.user_id
        assert who.endpoint is not None  # the bytes may still be arriving: the download follows them
        with self.store.transaction() as conn:
            return conn.execute(
                select(task_blobs.c.task_id).join(tasks, tasks.c.id == task_blobs.c.task_id)
                .where(and_(task_blobs.c.blob_id == row.id, task_blobs.c.role == "input",
                            tasks.c.endpoint_id == who.endpoint["id"], tasks.c.t_done.is_(None))).limit(1)
            ).first() is not None

    def set_state(self, blob_id: str, state: str, expected: str, sha256: str | None = None) -> bool:
        """Move a blob from state ``expected`` to ``state`` (and record the sha256 its upload
        declared at its end, if given); False if it was not in ``expected``."""
        values = {"state": state} if sha256 is None else {"state": state, "sha256": sha256}
        with self.store.transaction() as conn:
            res = conn.execute(update(blobs).where(and_(blobs.c.id == blob_id, blobs.c.state == expected))
                               .values(**values))
        return bool(res.rowcount)

    def forget(self, blob_ids: Iterable[str]) -> None:
        """Delete rows, links and files."""
        ids = list(blob_ids)
        if not ids:
            return
        with self.store.transaction() as conn:
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                conn.execute(delete(task_blobs).where(task_blobs.c.blob_id.in_(chunk)))
                conn.execute(delete(blobs).where(blobs.c.id.in_(chunk)))
        for blob_id in ids:
            self.path(blob_id).unlink(missing_ok=True)
            self.path(blob_id, part=True).unlink(missing_ok=True)

    # --- what the relay asks -------------------------------------------------------------------
    def owned(self, owner: str, blob_ids: Iterable[str]) -> set[str]:
        """Which of these blobs ``owner`` owns (declared: a task may be sent while its arguments
        are still being uploaded, and its endpoint's download follows the upload)."""
        wanted = list(set(blob_ids))
        found: set[str] = set()
        with self.store.transaction() as conn:
            for start in range(0, len(wanted), 500):
                found.update(r.id for r in conn.execute(
                    select(blobs.c.id).where(and_(blobs.c.id.in_(wanted[start : start + 500]),
                                                  blobs.c.owner_id == owner))))
        return found

    def link(self, stored: Iterable[Task]) -> None:
        """Record which stored tasks name which blobs (their lifetime is now the tasks')."""
        rows = [{"task_id": t.id, "blob_id": b, "role": "input"} for t in stored for b in set(t.blobs)]
        if not rows:
            return
        with self.store.transaction() as conn:
            conn.execute(task_blobs.insert(), rows)
            conn.execute(update(blobs).where(blobs.c.id.in_({r["blob_id"] for r in rows})).values(linked=True))

    def is_result_of(self, blob_id: str, task_id: str) -> bool:
        """Whether ``blob_id`` was declared as ``task_id``'s result (complete or being uploaded)."""
        with self.store.transaction() as conn:
            return conn.execute(
                select(task_blobs.c.task_id).join(blobs, blobs.c.id == task_blobs.c.blob_id)
                .where(and_(task_blobs.c.blob_id == blob_id, task_blobs.c.task_id == task_id,
                            task_blobs.c.role == "result")).limit(1)
            ).first() is not None

    def link_inputs(self, blob_id: str, task_ids: Iterable[str]) -> None:
        """Tasks that take another task's result (this blob) as input name it: the endpoint they
        are dispatched to may read it (see ``service/fetches.py``), and it lives as long as they do."""
        with self.store.transaction() as conn:
            have = {r.task_id for r in conn.execute(select(task_blobs.c.task_id).where(
                and_(task_blobs.c.blob_id == blob_id, task_blobs.c.role == "input")))}
            rows = [{"task_id": t, "blob_id": blob_id, "role": "input"} for t in set(task_ids) - have]
            if rows:
                conn.execute(task_blobs.insert(), rows)

    # --- lifetime ------------------------------------------------------------------------------
    def purge(self) -> int:
        """Delete blobs whose tasks are all gone (purged after their retention), and blobs never
        named by a task within ``orphan_s`` (abandoned uploads). Returns how many."""
        cutoff = time.time() - self.orphan_s
        task_exists = exists().where(tasks.c.id == task_blobs.c.task_id)
        with self.store.transaction() as conn:
            conn.execute(delete(task_blobs).where(~task_exists))
            named = exists().where(task_blobs.c.blob_id == blobs.c.id)
            ids = [r.id for r in conn.execute(select(blobs.c.id).where(and_(
                ~named, blobs.c.state != UPLOADING, (blobs.c.linked.is_(True)) | (blobs.c.created_at < cutoff))))]
        self.forget(ids)
        return len(ids)


#: bytes gathered before they are hashed and written, off the event loop: few thread hops, and
#: each piece is still in the CPU's cache when the thread hashes then writes it
WRITE_BATCH = 1024 * 1024


def _hash_and_write_all(pieces: list[bytes], digest: Any, out: Any) -> None:
    for piece in pieces:
        hash_and_write(piece, digest, out)
    out.flush()  # readers following the upload read the file


async def _receive(request: Request, out: Any, digest: Any, declared: int, blob_id: str, arrival: Arrival,
                   tail: bytearray | None = None) -> None:
    """Hash and write a request body as it arrives, in batches handed to a thread: the event
    loop (every other client's frames) never waits on the disk or on hashing, and receiving
    the next batch overlaps writing the last. A batch is the server's own pieces, kept as they
    came: the bytes are not copied again on their way to the file (at most two batches, about
    ``2 * WRITE_BATCH`` bytes, are held per upload). ``tail``: the body goes on past the
    declared size with the sha256 declared at the end (:data:`DIGEST_AT_END` bytes), which is
    gathered there instead of written."""
    allowed = declared + (DIGEST_AT_END if tail is not None else 0)
    batch: list[bytes] = []
    batched = received = 0
    pending: Any = None
    written = 0  # bytes in the file once ``pending`` is done

    async def settle() -> None:
        nonlocal pending
        if pending is not None:
            await pending
            pending = None

    def written_to(upto: int, pieces: list[bytes]) -> Callable[[Any], None]:
        def advance(done: Any) -> None:
            if not done.cancelled() and done.exception() is None:
                arrival.advance(upto, pieces)  # readers may have these bytes now, while the next batch arrives
        return advance

    async def flush() -> None:
        nonlocal pending, batch, batched, written
        await settle()  # one batch in the thread at a time, in order
        pending = asyncio.ensure_future(asyncio.to_thread(_hash_and_write_all, batch, digest, out))
        written += batched
        pending.add_done_callback(written_to(written, batch))
        batch, batched = [], 0

    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > allowed:
                raise HTTPException(409, f"more bytes than the {declared} declared for blob {blob_id}")
            if tail is not None and received > declared:  # past the blob's bytes: its sha256
                mine = max(0, len(chunk) - (received - declared))
                tail += chunk[mine:]
                chunk = chunk[:mine]
            if chunk:
                batch.append(chunk)
                batched += len(chunk)
                if batched >= WRITE_BATCH:
                    await flush()
    except BaseException:
        if pending is not None:  # never leave a write running on a file about to be closed
            await asyncio.gather(pending, return_exceptions=True)
        raise
    if batch:
        await flush()
    await settle()


#: uploads at least this large are received on their connection's socket, in a thread
#: (:class:`~tether.service.connections.RawConnection`); smaller ones through ASGI
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
_raw_uploads = concurrent.futures.ThreadPoolExecutor(RAW_THREADS, thread_name_prefix="tether-blob-in")
_raw_downloads = concurrent.futures.ThreadPoolExecutor(RAW_THREADS, thread_name_prefix="tether-blob-out")
#: raw transfers under way per pool (on the event loop: no lock)
_raw_busy: dict[Any, int] = {_raw_uploads: 0, _raw_downloads: 0}


def _take_raw_for(pool: Any, scope: dict, timeout: float) -> RawConnection | None:
    """:func:`take_raw` while ``pool`` has a thread free for the transfer (else None: ASGI)."""
    if _raw_busy[pool] >= RAW_THREADS:
        return None
    raw = take_raw(scope, timeout)
    if raw is not None:
        _raw_busy[pool] += 1
        raw.on_done(lambda: _raw_busy.__setitem__(pool, _raw_busy[pool] - 1))
    return raw


class _BrokeOff(Exception):
    """A raw upload's connection ended (or stalled) before its body did."""


#: the alignment O_DIRECT asks of a write's buffer, offset and length (the page size, and a
#: multiple of the usual logical block sizes)
DIRECT_ALIGN = 4096
#: bytes gathered before one write past the page cache
DIRECT_BATCH = 1024 * 1024


#: batches a raw upload may have on their way to the disk at once (memory: this many times
#: :data:`DIRECT_BATCH` per upload), so receiving and hashing never wait on one write
DIRECT_DEPTH = 4


class _DirectFile:
    """A blob's file written past the page cache (``O_DIRECT``) where the system allows it, in
    aligned batches of :data:`DIRECT_BATCH` written by a thread of its own (up to
    :data:`DIRECT_DEPTH` on their way); the last unaligned bytes go through the cache.

    Through the page cache each byte of an upload is copied once more by the CPU, takes a page
    the kernel must find (on a virtual machine, first touches of memory the host had taken
    back cost ~2.5 s per GiB: measured on the project's machine, against 0.25 s for pages
    just freed), and is written back later by the kernel's flusher, on the service's CPUs. A
    write past the cache is the disk's DMA: 0.06 CPU seconds per GiB (1.3-1.6 GB/s on the
    project's disk). Readers of the blob read the file as they did (the kernel keeps direct
    writes and cached reads of one file consistent); those following the upload are sent
    its pieces from memory. A file system that refuses ``O_DIRECT`` (tmpfs) gets buffered
    writes, in the caller's thread."""

    def __init__(self, path: Path):
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        direct = getattr(os, "O_DIRECT", 0)
        self.fd = -1
        if direct:
            with contextlib.suppress(OSError):
                self.fd = os.open(path, flags | direct, 0o600)
        self.direct = self.fd >= 0
        if not self.direct:
            self.fd = os.open(path, flags, 0o600)
        #: bytes in the file
        self.offset = 0
        self._queued = 0  # bytes handed to the writer (the file's size once it is done)
        self._stage: mmap.mmap | None = None
        self.staged = 0
        self._error: BaseException | None = None
        if self.direct:
            self._free: queue.Queue[mmap.mmap] = queue.Queue()
            for _ in range(DIRECT_DEPTH):
                self._free.put(mmap.mmap(-1, DIRECT_BATCH))  # page-aligned
            self._todo: queue.Queue[tuple[mmap.mmap, int, int] | None] = queue.Queue()
            self._writer = threading.Thread(target=self._write_batches, name="tether-blob-writer", daemon=True)
            self._writer.start()
            self._stage = self._free.get()

    def write(self, data: memoryview) -> None:
        if self._stage is None:
            self._pwrite(data, self._queued)
            self._queued += len(data)
            self.offset = self._queued
            return
        while len(data):
            n = min(len(data), DIRECT_BATCH - self.staged)
            self._stage[self.staged : self.staged + n] = data[:n]
            self.staged += n
            data = data[n:]
            if self.staged == DIRECT_BATCH:
                self._hand_over()
                self._stage = self._free.get()  # waits while DIRECT_DEPTH batches are on their way

    def _hand_over(self) -> None:
        if self._error is not None:
            raise self._error
        assert self._stage is not None
        self._todo.put((self._stage, self.staged, self._queued))
        self._queued += self.staged
        self.staged = 0

    def _write_batches(self) -> None:
        while (job := self._todo.get()) is not None:
            buffer, length, offset = job
            try:
                if self._error is None:
                    self._pwrite(memoryview(buffer)[:length], offset)
                    self.offset = offset + length
            except BaseException as exc:  # noqa: BLE001 - raised in the receiving thread
                self._error = exc
            finally:
                self._free.put(buffer)

    def _pwrite(self, data: memoryview, offset: int) -> None:
        done = 0
        while done < len(data):
            try:
                done += os.pwrite(self.fd, data[done:], offset + done)
            except OSError as exc:  # a file system that took O_DIRECT at open but wants another alignment
                if exc.errno != errno.EINVAL or not self._buffered():
                    raise

    def _buffered(self) -> bool:
        """Write through the page cache from now on; False if the file already does."""
        if not self.direct:
            return False
        import fcntl  # (Linux only, as O_DIRECT)

        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self.direct = False
        return True

    def close(self) -> None:
        """Wait for the batches on their way, write what is left (through the cache: it need not
        be aligned) and close; again: nothing."""
        if self.fd < 0:
            return
        try:
            if self._stage is not None:
                self._todo.put(None)
                self._writer.join()
                if self._error is not None:
                    raise self._error
                if self.staged:
                    self._buffered()
                    self._pwrite(memoryview(self._stage)[: self.staged], self._queued)
                    self._queued += self.staged
                    self.staged = 0
                self.offset = self._queued
        finally:
            os.close(self.fd)
            self.fd = -1
            if self._stage is not None:
                self._stage.close()
                self._stage = None
                while not self._free.empty():
                    self._free.get().close()


def _receive_raw(raw: RawConnection, path: Path, digest: Any, declared: int, tail: bytearray | None,
                 advance: Callable[[int, list[Any], int], None], wait_for_readers: Callable[[int], None]) -> int:
    """Receive a body on a taken connection (in a thread of :data:`_raw_uploads`) into ``path``;
    returns the blob bytes received. Each piece of ``CHUNK`` bytes is received into a buffer
    of its own, hashed, staged for the file (:class:`_DirectFile`) while it is in the CPU's
    cache, and handed to ``advance`` (readers following the upload, every mebibyte): one
    copy out of the socket, against four through the HTTP stack, and no event loop in the way.
    The receives, the hashing and the writes release the GIL."""
    assert raw.length is not None
    blob_left = declared
    body_left = raw.length
    early = memoryview(raw.early)
    batch: list[Any] = []
    batched = received = 0
    out = _DirectFile(path)
    try:
        while body_left:
            piece = bytearray(min(CHUNK, body_left))
            view = memoryview(piece)
            filled = min(len(early), len(piece))
            view[:filled] = early[:filled]
            early = early[filled:]
            while filled < len(piece):
                try:
                    n = raw.sock.recv_into(view[filled:])
                except OSError as exc:  # (a timeout too)
                    raise _BrokeOff(str(exc)) from exc
                if not n:
                    raise _BrokeOff("the connection ended")
                filled += n
            body_left -= len(piece)
            mine = min(len(piece), blob_left)
            if mine < len(piece):  # past the blob's bytes: its sha256 (DIGEST_AT_END bytes)
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


async def _in_raw_thread(raw: RawConnection, path: Path, digest: Any, declared: int, tail: bytearray | None,
                         arrival: Arrival) -> int:
    """:func:`_receive_raw` in a thread of :data:`_raw_uploads`; readers following the upload are
    told on the event loop. Cancelled (the service stopping): the connection is dropped and
    the thread waited for, so it never writes to a file about to be deleted."""
    loop = asyncio.get_running_loop()

    def advance(written: int, pieces: list[Any], on_file: int) -> None:
        loop.call_soon_threadsafe(arrival.advance, written, pieces, on_file)

    def wait_for_readers(upto: int) -> None:
        arrival.wait_for_readers(upto, READER_STALL_S)

    moving = loop.run_in_executor(_raw_uploads, _receive_raw, raw, path, digest, declared, tail, advance,
                                  wait_for_readers)
    try:
        return await asyncio.shield(moving)
    except asyncio.CancelledError:
        raw.abort()
        await asyncio.gather(moving, return_exceptions=True)
        raise


def _send_following(raw: RawConnection, fh: Any, arrival: Arrival, size: int, blob_id: str) -> None:
    """:func:`_follow` in a thread, onto a taken connection: the pieces kept in memory with
    ``sendall``, the file (a reader fallen behind) with ``sendfile``; the same rules (never past
    what arrived, the last byte once the upload verified, broken off with the upload)."""
    sent = 0
    me = id(raw)
    arrival.reader_at(me, 0)
    try:
        while sent < size:
            seen = arrival.version
            readable = arrival.written if arrival.ended and arrival.ok else min(arrival.written, size - 1)
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
                if not arrival.ok or arrival.written <= sent:
                    raise _BrokeOff(f"blob {blob_id}: its upload broke off at {arrival.written} of {size} bytes")
                continue
            if not arrival.wait_changed(seen, FOLLOW_IDLE_S):
                raise _BrokeOff(f"blob {blob_id}: no bytes arrived for {FOLLOW_IDLE_S:g} s")
    finally:
        arrival.reader_at(me, None)


def _send_file(raw: RawConnection, fh: Any, size: int) -> None:
    """A complete blob onto a taken connection, from the page cache to the socket (``sendfile``)."""
    sent = 0
    while sent < size:
        n = raw.sock.sendfile(fh, sent, size - sent)
        if not n:
            raise _BrokeOff(f"the file ended at {sent} of {size} bytes")
        sent += n


async def _send_raw(raw: RawConnection, headers: dict[str, str], body: Callable[[], None]) -> None:
    """Answer a download on a taken connection: the head, then ``body()``, in a thread of
    :data:`_raw_downloads`, then close it; a body that fails breaks the connection off (the reader
    sees it short, as through ASGI). Cancelled: the connection is dropped and the thread awaited."""
    head = ["HTTP/1.1 200 OK", "content-type: application/octet-stream", "connection: close",
            *(f"{name.lower()}: {value}" for name, value in headers.items())]

    def send() -> None:
        raw.sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        body()

    loop = asyncio.get_running_loop()
    moving = loop.run_in_executor(_raw_downloads, send)
    try:
        await asyncio.shield(moving)
    except asyncio.CancelledError:
        raw.abort()
        await asyncio.gather(moving, return_exceptions=True)
        raise
    except (OSError, _BrokeOff) as exc:
        log.info("download broke off: %s", exc)
        raw.abort()
        return
    raw.finish()


async def _follow(fh: Any, arrival: Arrival, size: int, blob_id: str) -> AsyncIterator[bytes | memoryview]:
    """A blob's bytes read from its upload's file as they are written: never past what the
    upload has written, ending with it (the last byte only once the upload's bytes matched their
    declared sha256); an upload that breaks off, fails that check or stalls for ``FOLLOW_IDLE_S``
    breaks this stream off too, and the reader sees it short."""
    sent = 0
    me = id(fh)
    arrival.reader_at(me, 0)
    try:
        while sent < size:
            # the last byte waits for the upload's sha256 check: a reader never receives a whole
            # body that did not verify (readers check the size only; see tether.transfer.BlobReader)
            readable = arrival.written if arrival.ended and arrival.ok else min(arrival.written, size - 1)
            if readable > sent:
                piece = arrival.piece_at(sent, readable)  # kept up: the server's own piece
                if piece is None and arrival.on_file <= sent:  # (not possible: the file lags less than
                    await arrival.changed(FOLLOW_IDLE_S)            # the pieces kept; but never read past it)
                    continue
                if piece is None:  # fell behind: from the file
                    piece = await asyncio.to_thread(os.pread, fh.fileno(),
                                                    min(FOLLOW_PIECE, readable - sent, arrival.on_file - sent), sent)
                if not piece:
                    raise OSError(f"blob {blob_id}: its file ended at {sent} bytes")
                sent += len(piece)
                yield piece
                arrival.reader_at(me, sent)
            elif arrival.ended:
                if not arrival.ok or arrival.written <= sent:
                    raise OSError(f"blob {blob_id}: its upload broke off at {arrival.written} of {size} bytes")
            elif not await arrival.changed(FOLLOW_IDLE_S):
                raise OSError(f"blob {blob_id}: no bytes arrived for {FOLLOW_IDLE_S:g} s")
    finally:
        arrival.reader_at(me, None)
        fh.close()


def blob_routes(index: BlobIndex, authenticator: Any, db: AsyncStore) -> APIRouter:
    """The ``/v1/blobs`` routes. ``rows`` is the index with its queries awaited (off the event loop
    on PostgreSQL, see :mod:`tether.service.async_store`); file paths come from ``index``."""
    router = APIRouter(tags=["blobs"])
    rows = db.offload(index)

    async def principal(request: Request) -> Principal:
        """A user's token, or an endpoint's credential with ``X-Tether-Endpoint``."""
        secret = bearer(request.headers.get("authorization")) or ""
        if not secret:
            raise HTTPException(401, "missing credentials: send 'Authorization: Bearer <token>'")
        endpoint_id = request.headers.get("x-tether-endpoint")
        if endpoint_id:
            ep = await db.endpoint_by_secret(endpoint_id, secret)
            if ep is None:
                raise HTTPException(401, "invalid endpoint credential (wrong, rotated, or the endpoint was deleted)")
            return Principal(endpoint=ep)
        user = await authenticator.user_for(secret)
        if user is None:
            raise HTTPException(401, "invalid token: it is unknown to this service, was revoked, or has expired")
        return Principal(user_id=user)

    def info(row: Any) -> BlobInfo:
        return BlobInfo(blob_id=row.id, size=row.size, sha256=row.sha256, state=row.state)

    # the document states the service's own limit, so what it calls valid is what it accepts
    create_schema = BlobCreate.model_json_schema()
    create_schema["properties"]["size"]["maximum"] = index.max_blob

    @router.post("/v1/blobs", response_model=BlobInfo, status_code=201, responses=_errors(400, 403, 404, 413, 429),
                 openapi_extra={"requestBody": {"content": {"application/json": {"schema": create_schema}}}})
    async def create_blob(body: BlobCreate, who: Principal = Depends(principal)) -> BlobInfo:
        """Declare a blob (size, sha256); then send its bytes with ``PUT /v1/blobs/{blob_id}``.
        Limits are checked here, before any byte moves."""
        return info(await rows.reserve(who, body))

    @router.put("/v1/blobs/{blob_id}", response_model=BlobInfo, responses=_errors(400, 404, 409),
                openapi_extra={"requestBody": {"required": True, "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
    async def upload_blob(blob_id: PathId, request: Request, who: Principal = Depends(principal)) -> BlobInfo:
        """Stream a declared blob's bytes. Written to disk and hashed as they arrive; refused (and
        deleted) if they are not exactly the declared size and sha256, or if the upload breaks off.
        A blob declared without its sha256 has it at the end of the body: its bytes, then their hex
        sha256 (64 bytes; the body is that much longer than the declared size)."""
        row = await rows.get(blob_id)
        if row is None or row.uploader != who.uploader:
            raise HTTPException(404, f"unknown blob {blob_id}")
        if not await rows.set_state(blob_id, UPLOADING, RESERVED):
            raise HTTPException(409, f"blob {blob_id} is already uploaded, or being uploaded")
        part = index.path(blob_id, part=True)
        digest, size, done = hashlib.sha256(), 0, False
        tail = bytearray() if not row.sha256 else None  # the sha256 comes after the bytes
        arrival = index.arriving[blob_id] = Arrival()
        started = index.awaited.pop(blob_id, None)
        if started is not None:
            started.set()
        # a large body is received on the connection's socket, in a thread (see RawConnection)
        raw = _take_raw_for(_raw_uploads, request.scope, RAW_IDLE_S) if row.size >= RAW_MIN_BYTES else None
        allowed = row.size + (DIGEST_AT_END if tail is not None else 0)
        refusal: HTTPException | None = None
        try:
            if raw is not None and (raw.length is None or raw.length > allowed):
                raise HTTPException(409, f"more bytes than the {row.size} declared for blob {blob_id}"
                                    if raw.length else "send the upload's Content-Length")
            if raw is not None:
                size = await _in_raw_thread(raw, part, digest, row.size, tail, arrival)
            else:
                with open(part, "wb") as out:
                    await _receive(request, out, digest, row.size, blob_id, arrival, tail)
                    size = out.tell()
            if size != row.size or (tail is not None and len(tail) != DIGEST_AT_END):
                raise HTTPException(409, f"the upload ended after {size} of the {row.size} bytes declared"
                                    + (" (and before their sha256)" if size == row.size else ""), headers=_CORRUPT)
            declared = row.sha256 if tail is None else tail.decode("ascii", "replace")
            if digest.hexdigest() != declared:
                raise HTTPException(409, f"the bytes received hash to sha256 {digest.hexdigest()}, not to the "
                                         f"{declared[:64]!r} declared; the blob was not stored", headers=_CORRUPT)
            os.replace(part, index.path(blob_id))
            await rows.set_state(blob_id, COMPLETE, UPLOADING, digest.hexdigest() if tail is not None else None)
            done = True
        except (ClientDisconnect, _BrokeOff):
            log.info("upload of blob %s broke off before its %d bytes; its bytes are deleted", blob_id, row.size)
            if raw is not None:
                raw.abort()
            raise HTTPException(400, "the upload broke off") from None
        except HTTPException as exc:
            refusal = exc
            raise
        finally:
            index.arriving.pop(blob_id, None)
            arrival.end(done)  # readers following the upload finish, or break off
            if not done:  # the bytes go at once; the declaration may be uploaded again (or expires, orphan_s)
                part.unlink(missing_ok=True)
                await rows.set_state(blob_id, RESERVED, UPLOADING)
            if raw is not None and not done:  # answered once the bytes are gone (an error of ours: 500)
                raw.reply_json(refusal.status_code, {"detail": refusal.detail}, refusal.headers) if refusal \
                    else raw.reply_json(500, {"detail": "Internal Server Error"})
        try:
            stored = info(await rows.get(blob_id))
        except BaseException:
            if raw is not None:  # (never left open)
                raw.reply_json(500, {"detail": "Internal Server Error"})
            raise
        if raw is not None:
            raw.reply(200, stored.model_dump_json().encode())  # (closes the duplicate socket too)
        return stored

    @router.get("/v1/blobs/{blob_id}", response_class=FileResponse, responses={
        200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
              "description": "the blob's bytes"}, **_errors(404, 409)})
    async def download_blob(blob_id: PathId, request: Request, who: Principal = Depends(principal)) -> Response:
        """A blob's bytes, streamed from disk. Yours, or (endpoints) named by a task dispatched to you.
        A blob still being uploaded is streamed as its bytes arrive (its last byte once they
        matched their sha256); one declared but not yet sent is waited for."""
        row = await rows.get(blob_id)
        if not await rows.may_read(who, row):
            raise HTTPException(404, f"unknown blob {blob_id}")
        # (a blob whose sha256 comes at the end of its upload has none to name while it arrives)
        headers = {SHA256_HEADER: row.sha256} if row.sha256 else {}
        if row.state == RESERVED and not row.linked:  # nothing names it: nobody is about to send it
            raise HTTPException(409, f"blob {blob_id} is declared but its bytes have not been sent")
        def take_raw_download(size: int) -> RawConnection | None:
            """A large download is sent on the connection's socket from a thread (see
            RawConnection); a ranged request is left to Starlette's file response."""
            if size < RAW_MIN_BYTES or "range" in request.headers:
                return None
            return _take_raw_for(_raw_downloads, request.scope, DOWNLOAD_SEND_TIMEOUT_S)

        # the task or the answer naming it went ahead of its bytes: follow the upload when it starts
        # (here: in ``arriving``; on another replica: its row), giving up if it does not
        started = time.monotonic()
        while row.state != COMPLETE:
            arrival = index.arriving.get(blob_id)
            if arrival is not None:
                try:
                    fh = open(index.path(blob_id, part=True), "rb")  # noqa: SIM115 - closed by _follow
                except FileNotFoundError:  # it ended just now (renamed to its final name): read the row again
                    row = await rows.get(blob_id)
                    if row is None:
                        raise HTTPException(404, f"unknown blob {blob_id}") from None
                    continue
                headers["Content-Length"] = str(row.size)
                raw = take_raw_download(row.size)
                if raw is not None:
                    try:
                        await _send_raw(raw, headers,
                                        functools.partial(_send_following, raw, fh, arrival, row.size, blob_id))
                    finally:
                        fh.close()
                    return Response()  # (not sent: the connection was answered and closed)
                return StreamingResponse(_follow(fh, arrival, row.size, blob_id),
                                         media_type="application/octet-stream", headers=headers)
            waited = time.monotonic() - started
            if waited > (FOLLOW_ELSEWHERE_S if row.state == UPLOADING else FOLLOW_IDLE_S):
                index.awaited.pop(blob_id, None)  # (readers still waiting make a new one)
                raise HTTPException(409, f"blob {blob_id}: its bytes did not arrive within {waited:.0f} s "
                                         "(the upload has not started, or stopped); ask again later")
            # woken when the upload starts here; its row is read again each second (another replica's)
            event = index.awaited.setdefault(blob_id, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), 1.0)
            row = await rows.get(blob_id)
            if row is None:
                raise HTTPException(404, f"unknown blob {blob_id}")
        raw = take_raw_download(row.size)
        if raw is not None:
            try:
                fh = open(index.path(blob_id), "rb")  # noqa: SIM115 - closed below
            except FileNotFoundError:  # deleted just now
                raw.reply_json(404, {"detail": f"unknown blob {blob_id}"})
                raise HTTPException(404, f"unknown blob {blob_id}") from None
            try:
                await _send_raw(raw, {**headers, "Content-Length": str(row.size)},
                                functools.partial(_send_file, raw, fh, row.size))
            finally:
                fh.close()
            return Response()  # (not sent: the connection was answered and closed)
        return _BlobFile(index.path(blob_id), media_type="application/octet-stream", headers=headers)

    @router.delete("/v1/blobs/{blob_id}", status_code=204, response_class=Response, responses=_errors(404, 409))
    async def delete_blob(blob_id: PathId, who: Principal = Depends(principal)) -> Response:
        """Delete a blob of yours that no task names (an upload you gave up on)."""
        row = await rows.get(blob_id)
        if row is None or who.user_id is None or row.owner_id != who.user_id:
            raise HTTPException(404, f"unknown blob {blob_id}")
        if row.linked or row.state == UPLOADING:
            raise HTTPException(409, f"blob {blob_id} is named by a task (or being uploaded): it is deleted with "
                                     "its tasks")
        await rows.forget([blob_id])
        return Response(status_code=204)

    return router
