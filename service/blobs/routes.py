"""The ``/v1/blobs`` routes: declare, upload, download and delete a blob, and the ASGI paths
their bytes take when they are small (or cannot take their own socket).

A route authenticates the caller (a user or an endpoint: :class:`~.index.Principal`), asks the
index (:mod:`tether.service.blobs.index`) what it may do, and moves the bytes: through
Starlette's stream and file responses here, or, for large transfers, on the connection's own
socket (:mod:`tether.service.blobs.raw_transfer`). Readers of a blob still being uploaded follow
its :class:`~tether.service.blobs.arrival.Arrival`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import FileResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

from tether.digest import new_digest
from tether.protocol import DIGEST_HEADER, ERROR_HEADER, ErrorCode
from tether.spill import hash_and_write

from ..async_store import AsyncStore
from ..guard import bearer
from ..models import BlobCreate, BlobInfo, PathId
from ..models import error_responses as _errors
from ..raw_connection import RawConnection
from .arrival import FOLLOW_ELSEWHERE_S, FOLLOW_IDLE_S, FOLLOW_PIECE, WRITE_BATCH, Arrival
from .index import COMPLETE, RESERVED, UPLOADING, BlobIndex, Principal
from .raw_transfer import (
    DOWNLOAD_SEND_TIMEOUT_S,
    RAW_IDLE_S,
    RAW_MIN_BYTES,
    BrokeOff,
    in_raw_thread,
    raw_downloads,
    raw_uploads,
    send_file,
    send_following,
    send_raw,
    take_raw_for,
)

log = logging.getLogger("tether.service.blobs")

#: names the refusal of an upload whose bytes are not what was declared (the client raises BlobCorrupt)
_CORRUPT = {ERROR_HEADER: ErrorCode.BLOB_CORRUPT.value}

#: bytes after a blob's own in an upload whose digest is declared at its end (its hex digest)
DIGEST_AT_END = 64


class _BlobFile(FileResponse):
    """A file response read in 1 MiB pieces (Starlette's 64 KiB costs a thread hop per piece:
    a third of the download rate on a busy host)."""

    chunk_size = 1024 * 1024


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
    declared size with the digest declared at the end (:data:`DIGEST_AT_END` bytes), which is
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
            if tail is not None and received > declared:  # past the blob's bytes: its digest
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


async def _follow(fh: Any, arrival: Arrival, size: int, blob_id: str) -> AsyncIterator[bytes | memoryview]:
    """A blob's bytes read from its upload's file as they are written: never past what the
    upload has written, ending with it (the last byte only once the upload's bytes matched their
    declared digest); an upload that breaks off, fails that check or stalls for ``FOLLOW_IDLE_S``
    breaks this stream off too, and the reader sees it short."""
    sent = 0
    me = id(fh)
    arrival.reader_at(me, 0)
    try:
        while sent < size:
            readable = arrival.readable(size)
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
                if arrival.broke_off(sent):
                    raise OSError(f"blob {blob_id}: its upload broke off at {arrival.written} of {size} bytes")
            elif not await arrival.changed(FOLLOW_IDLE_S):
                raise OSError(f"blob {blob_id}: no bytes arrived for {FOLLOW_IDLE_S:g} s")
    finally:
        arrival.reader_at(me, None)
        fh.close()


def _info(row: Any) -> BlobInfo:
    return BlobInfo(blob_id=row.id, size=row.size, digest=row.digest, state=row.state)


async def _receive_upload(index: BlobIndex, rows: Any, row: Any, request: Request) -> BlobInfo:
    """The body of ``PUT /v1/blobs/{id}`` for blob ``row``, just marked uploading: received on the
    connection's socket in a thread when large (see RawConnection), else through ASGI; hashed
    and written as it arrives, followed by readers, then stored, or refused and its bytes
    deleted. ``rows``: the index with its queries awaited."""
    blob_id = row.id
    part = index.path(blob_id, part=True)
    digest, size, done = new_digest(), 0, False
    tail = bytearray() if not row.digest else None  # the digest comes after the bytes
    arrival = index.arriving[blob_id] = Arrival()
    started = index.awaited.pop(blob_id, None)
    if started is not None:
        started.set()
    # a large body is received on the connection's socket, in a thread (see RawConnection)
    raw = take_raw_for(raw_uploads, request.scope, RAW_IDLE_S, row.owner_id) if row.size >= RAW_MIN_BYTES else None
    allowed = row.size + (DIGEST_AT_END if tail is not None else 0)
    refusal: HTTPException | None = None
    try:
        if raw is not None and (raw.length is None or raw.length > allowed):
            raise HTTPException(409, f"more bytes than the {row.size} declared for blob {blob_id}"
                                if raw.length else "send the upload's Content-Length")
        if raw is not None:
            size = await in_raw_thread(raw, part, digest, row.size, tail, arrival)
        else:
            with open(part, "wb") as out:
                await _receive(request, out, digest, row.size, blob_id, arrival, tail)
                size = out.tell()
        if size != row.size or (tail is not None and len(tail) != DIGEST_AT_END):
            raise HTTPException(409, f"the upload ended after {size} of the {row.size} bytes declared"
                                + (" (and before their digest)" if size == row.size else ""), headers=_CORRUPT)
        declared = row.digest if tail is None else tail.decode("ascii", "replace")
        if digest.hexdigest() != declared:
            raise HTTPException(409, f"the bytes received hash to {digest.hexdigest()} (BLAKE3), not to the "
                                     f"{declared[:64]!r} declared; the blob was not stored", headers=_CORRUPT)
        os.replace(part, index.path(blob_id))
        await rows.set_state(blob_id, COMPLETE, UPLOADING, digest.hexdigest() if tail is not None else None)
        done = True
    except (ClientDisconnect, BrokeOff):
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
        stored = _info(await rows.get(blob_id))
    except BaseException:
        if raw is not None:  # (never left open)
            raw.reply_json(500, {"detail": "Internal Server Error"})
        raise
    if raw is not None:
        raw.reply(200, stored.model_dump_json().encode())  # (closes the duplicate socket too)
    return stored


async def _send_blob(index: BlobIndex, rows: Any, row: Any, request: Request) -> Response:
    """The answer to ``GET /v1/blobs/{id}`` for blob ``row``, which the asker may read: the file of
    a complete blob, or the bytes of one still arriving as they arrive (waited for while it is
    declared but not yet sent); sent on the connection's socket in a thread when large."""
    blob_id = row.id
    # (a blob whose digest comes at the end of its upload has none to name while it arrives)
    headers = {DIGEST_HEADER: row.digest} if row.digest else {}
    if row.state == RESERVED and not row.linked:  # nothing names it: nobody is about to send it
        raise HTTPException(409, f"blob {blob_id} is declared but its bytes have not been sent")

    def take_raw_download(size: int) -> RawConnection | None:
        """A large download is sent on the connection's socket from a thread (see
        RawConnection); a ranged request is left to Starlette's file response."""
        if size < RAW_MIN_BYTES or "range" in request.headers:
            return None
        return take_raw_for(raw_downloads, request.scope, DOWNLOAD_SEND_TIMEOUT_S, row.owner_id)

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
                    await send_raw(raw, headers,
                                    functools.partial(send_following, raw, fh, arrival, row.size, blob_id))
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
            await send_raw(raw, {**headers, "Content-Length": str(row.size)},
                            functools.partial(send_file, raw, fh, row.size))
        finally:
            fh.close()
        return Response()  # (not sent: the connection was answered and closed)
    return _BlobFile(index.path(blob_id), media_type="application/octet-stream", headers=headers)


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

    # the document states the service's own limit, so what it calls valid is what it accepts
    create_schema = BlobCreate.model_json_schema()
    create_schema["properties"]["size"]["maximum"] = index.max_blob

    @router.post("/v1/blobs", response_model=BlobInfo, status_code=201, responses=_errors(400, 403, 404, 413, 429),
                 openapi_extra={"requestBody": {"content": {"application/json": {"schema": create_schema}}}})
    async def create_blob(body: BlobCreate, who: Principal = Depends(principal)) -> BlobInfo:
        """Declare a blob (size, digest); then send its bytes with ``PUT /v1/blobs/{blob_id}``.
        Limits are checked here, before any byte moves."""
        return _info(await rows.reserve(who, body))

    @router.put("/v1/blobs/{blob_id}", response_model=BlobInfo, responses=_errors(400, 404, 409),
                openapi_extra={"requestBody": {"required": True, "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
    async def upload_blob(blob_id: PathId, request: Request, who: Principal = Depends(principal)) -> BlobInfo:
        """Stream a declared blob's bytes. Written to disk and hashed as they arrive; refused (and
        deleted) if they are not exactly the declared size and digest, or if the upload breaks off.
        A blob declared without its digest has it at the end of the body: its bytes, then their hex
        digest (64 bytes; the body is that much longer than the declared size)."""
        row = await rows.get(blob_id)
        if row is None or row.uploader != who.uploader:
            raise HTTPException(404, f"unknown blob {blob_id}")
        if not await rows.set_state(blob_id, UPLOADING, RESERVED):
            raise HTTPException(409, f"blob {blob_id} is already uploaded, or being uploaded")
        return await _receive_upload(index, rows, row, request)

    @router.get("/v1/blobs/{blob_id}", response_class=FileResponse, responses={
        200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
              "description": "the blob's bytes"}, **_errors(404, 409)})
    async def download_blob(blob_id: PathId, request: Request, who: Principal = Depends(principal)) -> Response:
        """A blob's bytes, streamed from disk. Yours, or (endpoints) named by a task dispatched to you.
        A blob still being uploaded is streamed as its bytes arrive (its last byte once they
        matched their digest); one declared but not yet sent is waited for."""
        row = await rows.get(blob_id)
        if not await rows.may_read(who, row):
            raise HTTPException(404, f"unknown blob {blob_id}")
        return await _send_blob(index, rows, row, request)

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
