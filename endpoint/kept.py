"""Results kept where they were computed: the endpoint's store of large results.

A result over the blob threshold is not uploaded when its task ends: it stays here, a file
named by its task id in ``kept_results_dir`` (the OS page cache keeps the recent ones in
memory), and the result frame carries a kept stub (:func:`tether.protocol.kept_stub`). A later
task on this endpoint that takes it as an input maps the file; anyone else asks for it and the
daemon uploads it as a blob then, once per request.

Bounded three ways, each stated in ``docs/payloads.md``: ``kept_results_max_bytes`` (past it a
result goes to the service as a blob, as every result did before, and the service's quota
holds), ``kept_results_retention_s`` (a result nobody released is freed then), and release
(the client's handle was dropped, or a Dask key released). A result a queued task here still
needs is pinned: a release waits for that task to end.

The files survive a restart of the daemon (it reads the directory back), so a result is not
lost with the process that computed it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from tether.digest import digest_of
from tether.errors import PayloadTooLarge, QuotaExceeded
from tether.ids import InvalidIdentifier, check_id, child_path
from tether.protocol import ErrorCode, ErrorInfo, Fetched, KeptRef, Result, blob_stub, kept_stub
from tether.transfer import file_of

if TYPE_CHECKING:
    from .payloads import EndpointPayloads

log = logging.getLogger("tether.endpoint.kept")


class KeptResults:
    """The store: task id -> file, with byte accounting, pins and retention."""

    def __init__(self, directory: Path, max_bytes: int, retention_s: float):
        self.dir = directory
        self.max_bytes = max_bytes
        self.retention_s = retention_s
        self._sizes: dict[str, int] = {}
        self._digests: dict[str, str] = {}
        self._pins: dict[str, int] = {}
        self._released: set[str] = set()  # released while pinned: freed when the last pin goes
        self.bytes = 0
        if max_bytes > 0:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._load()

    def _load(self) -> None:
        """Read back what a previous run kept (retention applies to it as to the rest)."""
        for path in self.dir.iterdir():
            try:
                check_id(path.name, "task id")
                st = path.stat()
            except (InvalidIdentifier, OSError):
                path.unlink(missing_ok=True)  # a part left by a crash mid-move, or not ours
                continue
            self._sizes[path.name] = st.st_size
            self.bytes += st.st_size
        self.expire()

    def __contains__(self, task_id: str) -> bool:
        return task_id in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def path(self, task_id: str) -> Path:
        return child_path(self.dir, task_id, "task id")

    def size(self, task_id: str) -> int | None:
        return self._sizes.get(task_id)

    def digest(self, task_id: str) -> str | None:
        """The digest recorded when it was kept: "" when it was not hashed (a worker's file: its upload
        hashes it), None for one read back after a restart."""
        return self._digests.get(task_id)

    def room_for(self, size: int) -> bool:
        return self.max_bytes > 0 and self.bytes + size <= self.max_bytes

    def keep(self, task_id: str, source: Path | bytes, digest: str) -> bool:
        """Take a result: a file the worker wrote (moved, not copied) or bytes; False when it
        would pass ``kept_results_max_bytes`` (the caller sends it to the service instead)."""
        size = source.stat().st_size if isinstance(source, Path) else len(source)
        if not self.room_for(size) or task_id in self._sizes:
            return False
        dest = self.path(task_id)
        if isinstance(source, Path):
            os.replace(source, dest)  # the same filesystem (the endpoint's directory) by default
        else:
            part = dest.with_name(dest.name + ".part")
            part.write_bytes(source)
            os.replace(part, dest)
        self._sizes[task_id] = size
        self._digests[task_id] = digest
        self.bytes += size
        return True

    def pin(self, task_id: str) -> None:
        """A task here will read it: not freed until :meth:`unpin`."""
        self._pins[task_id] = self._pins.get(task_id, 0) + 1

    def unpin(self, task_id: str) -> None:
        left = self._pins.get(task_id, 0) - 1
        if left > 0:
            self._pins[task_id] = left
            return
        self._pins.pop(task_id, None)
        if task_id in self._released:
            self._released.discard(task_id)
            self._free(task_id)

    def release(self, task_ids: list[str]) -> int:
        """Nobody outside holds these any more: free them (pinned ones when their readers end)."""
        freed = 0
        for tid in task_ids:
            if tid not in self._sizes:
                continue
            if tid in self._pins:
                self._released.add(tid)
            else:
                self._free(tid)
                freed += 1
        return freed

    def expire(self) -> int:
        """Free what outlived ``kept_results_retention_s`` (unless a task here still reads it)."""
        cutoff = time.time() - self.retention_s
        old = []
        for tid in list(self._sizes):
            try:
                if self.path(tid).stat().st_mtime < cutoff:
                    old.append(tid)
            except OSError:
                old.append(tid)
        freed = self.release(old)
        if freed:
            log.info("freed %d kept result(s) older than %.0f s (kept_results_retention_s)", freed, self.retention_s)
        return freed

    def _free(self, task_id: str) -> None:
        size = self._sizes.pop(task_id, 0)
        self._digests.pop(task_id, None)
        self.bytes -= size
        self.path(task_id).unlink(missing_ok=True)


async def keep_result(kept: KeptResults, result: Result, endpoint_id: str, max_result: int | None) -> Result | None:
    """The result with its data kept here (a kept stub in its frame), or None when it cannot be
    kept (the store is full, or it is over ``max_result_bytes``): the caller sends it on as before."""
    data = result.data
    local = file_of(data)
    if local is not None:  # the worker wrote it to a file: moved into the store, not copied
        # nor hashed (the worker did not either): it may never leave the endpoint, and an upload
        # hashes it as it sends it (the digest declared at the end of the upload)
        path, digest = local
        size = path.stat().st_size
        source: Path | bytes = path
    else:
        assert data is not None
        source, size = data, len(data)
        digest = await asyncio.to_thread(lambda: digest_of(data))
    if (max_result is not None and size > max_result) or not kept.room_for(size):
        return None
    if not await asyncio.to_thread(kept.keep, result.id, source, digest):
        return None
    ref = KeptRef(endpoint=endpoint_id, size=size, digest=digest, type=result.kind or "")
    return msgspec.structs.replace(result, kind=None, data=kept_stub(ref))


async def upload_kept(kept: KeptResults, payloads: EndpointPayloads, endpoint_id: str, ids: list[str],
                      answer: Callable[[Fetched], Awaitable[None]]) -> None:
    """Upload kept results as blobs of their owners (someone elsewhere asked for them). Each is
    declared, answered (the answer names the blob, or says in words why there is none), then
    sent: the asker's download follows the upload, so the bytes cross the service once."""
    for tid in ids:
        if tid not in kept:
            await answer(Fetched(errors={tid: ErrorInfo(type="ResultLost", code=ErrorCode.RESULT_LOST.value, message=(
                f"the result of task {tid} is no longer kept on endpoint {endpoint_id} (released, or freed after "
                "kept_results_retention_s, or the endpoint's store was removed)"))}))
            continue
        kept.pin(tid)  # not freed while it is read
        try:
            path = kept.path(tid)
            size = path.stat().st_size
            # not hashed yet (the usual case): hashed as it is sent, the digest declared at the end
            ref = await payloads.declare_result(tid, size, kept.digest(tid) or None)
        except Exception as exc:  # noqa: BLE001 - the asker gets the reason in words
            kept.unpin(tid)
            code = (ErrorCode.QUOTA_EXCEEDED if isinstance(exc, QuotaExceeded) else ErrorCode.PAYLOAD_TOO_LARGE
                    if isinstance(exc, PayloadTooLarge) else ErrorCode.RESULT_LOST)
            await answer(Fetched(errors={tid: ErrorInfo(
                type=type(exc).__name__, code=code.value,
                message=f"endpoint {endpoint_id} could not upload the result of task {tid}: {exc}")}))
            continue
        try:
            await answer(Fetched(data={tid: blob_stub(ref)}))
            await payloads.send_result(ref, path)
        except Exception as exc:  # noqa: BLE001 - the asker's download breaks off and says so
            log.warning("sending the result of task %s failed: %s", tid, exc)
        finally:
            kept.unpin(tid)
