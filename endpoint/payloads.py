"""The endpoint's side of large payloads: fetching a task's blobs before it runs, storing a large
result as a blob before it is reported.

The daemon's event loop never touches the bytes: transfers run in threads
(:class:`tether.transfer.BlobClient`), downloads land in ``<endpoint dir>/blobs/`` and reach
the worker as file stubs (it maps the file and unpickles from it), and workers write large
results there too (:func:`tether.endpoint.execute.serialize_result`), so a gibibyte never
crosses the worker's pipe or sits in the daemon's memory.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from tether.digest import digest_of
from tether.errors import PayloadTooLarge, QuotaExceeded, TetherError
from tether.ids import child_path
from tether.protocol import BlobRef, ErrorCode, Result, blob_stub
from tether.results import failure
from tether.transfer import BlobClient, file_of, file_stub, service_stub
from tether.transport import Backoff

from .execute import SPILL_DIR_ENV

log = logging.getLogger("tether.endpoint.payloads")

#: attempts at storing a result blob when the network fails (a refusal is never retried)
UPLOAD_ATTEMPTS = 6


class EndpointPayloads:
    """Blob transfers of one endpoint, with its credential (``headers()`` gives the current one,
    so a rotated credential is picked up) and its limits."""

    def __init__(self, directory: Path, service_url: str, headers: Callable[[], dict[str, str]],
                 ssl_context: ssl.SSLContext | None, max_payload: int | None, max_result: int | None,
                 ca_file: str | None = None):
        self.dir = directory
        self.ca_file = ca_file  # for workers that read arguments from the service (service_stub)
        shutil.rmtree(directory, ignore_errors=True)  # what a previous run left is of no use now
        directory.mkdir(parents=True, mode=0o700)
        os.environ[SPILL_DIR_ENV] = str(directory)  # workers inherit it (see execute.serialize_result)
        self.service_url, self.headers, self.ssl_context = service_url, headers, ssl_context
        self.max_payload, self.max_result = max_payload, max_result
        self._client: BlobClient | None = None
        self._client_headers: dict[str, str] = {}
        self._functions: dict[str, asyncio.Future[bytes]] = {}
        self._downloaded: set[str] = set()  # tasks whose arguments were downloaded to args_path

    def client(self) -> BlobClient:
        headers = self.headers()
        if self._client is None or headers != self._client_headers:
            if self._client is not None:
                self._client.close()
            self._client_headers = headers
            # progress of long transfers: INFO lines in the endpoint's log (a bar if run on a terminal)
            self._client = BlobClient(self.service_url, headers, self.ssl_context)
        return self._client

    def args_path(self, task_id: str) -> Path:
        path = child_path(self.dir, task_id, "task id")  # the id is checked; the suffix adds no separator
        return path.with_name(path.name + ".args")

    def discard(self, task_id: str) -> None:
        """The task is done: its downloaded arguments go (a set lookup for the many tasks that had
        none: no file-system call on the task path)."""
        if task_id in self._downloaded:
            self._downloaded.discard(task_id)
            self.args_path(task_id).unlink(missing_ok=True)

    async def fetch(self, task: Any, body: bytes | None, args_ref: BlobRef | None,
                    body_ref: BlobRef | None, workers_read_blobs: bool = False) -> tuple[bytes | None, bytes]:
        """(function body, payload) for the engine, with file stubs in place of the blobs, each
        downloaded here; raises PayloadTooLarge over ``max_payload_bytes`` (before any byte
        moves), or what the transfer raised. ``workers_read_blobs`` (workers on this host): the
        arguments stay on the service and the payload is a service stub instead, which the worker
        reads from the service as the bytes arrive (no file written here and read again there,
        and the worker's unpickling overlaps the upload)."""
        payload = task.payload
        size = (args_ref.size if args_ref else len(payload)) + (body_ref.size if body_ref else 0)
        if self.max_payload is not None and size > self.max_payload:
            raise PayloadTooLarge(f"arguments and function of task {task.id} are {size} bytes, over this endpoint's "
                                  f"max_payload_bytes ({self.max_payload})")
        if body_ref is not None:
            body = await self._fetch_function(task.function, body_ref)
        if args_ref is not None and workers_read_blobs:
            payload = service_stub(self.service_url, self.headers(), self.ca_file, args_ref)
        elif args_ref is not None:
            path = self.args_path(task.id)
            self._downloaded.add(task.id)  # before the download: a part left by a failure goes too
            await asyncio.to_thread(self.client().download_to, args_ref, path, f"arguments of task {task.id}")
            payload = file_stub(path, args_ref.digest)
        return body, payload

    async def _fetch_function(self, fid: str, ref: BlobRef) -> bytes:
        """A large function body, downloaded once however many tasks use it: its file stub."""
        fetch = self._functions.get(fid)
        if fetch is None or (fetch.done() and fetch.exception() is not None):
            path = self.dir / f"function-{fid}"

            async def download() -> bytes:
                await asyncio.to_thread(self.client().download_to, ref, path, f"function {fid}")
                return file_stub(path, ref.digest)

            fetch = self._functions[fid] = asyncio.ensure_future(download())
        return await asyncio.shield(fetch)

    @staticmethod
    def is_large(data: bytes | None, threshold: int | None) -> bool:
        """Whether a result must go as a blob: the worker spilled it, or it is over the threshold."""
        return data is not None and (file_of(data) is not None or (threshold is not None and len(data) > threshold))

    async def store_result(self, result: Result) -> Result:
        """The result with its data stored as a blob of the task's owner (a stub in its place);
        network failures are retried, a refusal (too large, over quota) fails the task in words."""
        tid, data = result.id, result.data
        local = file_of(data)
        try:
            if local is not None:
                path, known = local
                source: Any = path
                size = path.stat().st_size
                digest = known or None  # the worker did not hash it: the upload does, as it sends
            else:
                source, size, digest = data, len(data), digest_of(data)
            if self.max_result is not None and size > self.max_result:
                raise PayloadTooLarge(f"result is {size} bytes, over this endpoint's max_result_bytes "
                                      f"({self.max_result})")
            ref = await self.upload_result(tid, source, size, digest)
            return msgspec.structs.replace(result, data=blob_stub(ref))
        except Exception as exc:  # noqa: BLE001 - the task fails with the reason, in words
            return blob_failure(tid, exc, "its result could not be stored on the service")
        finally:
            if local is not None:
                local[0].unlink(missing_ok=True)


    async def upload_result(self, tid: str, source: Path | bytes, size: int, digest: str | None) -> BlobRef:
        """Store a task's result as a blob of its owner: network failures are retried a few times,
        a refusal (too large, over quota) is raised at once. No ``digest``: hashed as it is sent."""
        return await self._retried(tid, self.client().upload, source, size, digest, task_id=tid,
                                   what=f"result of task {tid}")

    async def declare_result(self, tid: str, size: int, digest: str | None) -> BlobRef:
        """Declare a task's result as a blob of its owner (no byte moves yet: see :meth:`send_result`),
        retried like :meth:`upload_result`."""
        return await self._retried(tid, self.client().declare, size, digest, task_id=tid, what=f"result of task {tid}")

    async def send_result(self, ref: BlobRef, source: Path) -> None:
        """Send a declared result's bytes (readers of the blob follow them as they arrive)."""
        await asyncio.to_thread(self.client().send, ref, source, what=f"result {ref.id}", attempts=UPLOAD_ATTEMPTS)

    async def _retried(self, tid: str, call: Any, *args: Any, **kwargs: Any) -> Any:
        backoff = Backoff(initial=0.5, maximum=10.0)
        for attempt in range(UPLOAD_ATTEMPTS):
            try:
                return await asyncio.to_thread(call, *args, **kwargs)
            except TetherError:
                raise
            except Exception as exc:  # noqa: BLE001 - the network: try again a few times
                if attempt == UPLOAD_ATTEMPTS - 1:
                    raise
                log.warning("storing the result of task %s failed (%s); retrying", tid, exc)
                await asyncio.sleep(backoff.next())
        raise AssertionError("unreachable")


def blob_failure(task_id: str, exc: BaseException, context: str = "") -> Result:
    """A failed result for a payload that could not be fetched, stored or accepted; a size or
    quota refusal keeps its code, so the client raises PayloadTooLarge or QuotaExceeded."""
    code = (ErrorCode.PAYLOAD_TOO_LARGE if isinstance(exc, PayloadTooLarge)
            else ErrorCode.QUOTA_EXCEEDED if isinstance(exc, QuotaExceeded) else None)
    return failure(task_id, exc, message=f"{context}: {exc}" if context else None, code=code)
