"""Results kept on endpoints, brought to whoever asks: a client's ``fetch`` (a user wants a
value), an endpoint's ``fetch`` (a task it holds takes another task's result as input), a
client's ``release`` (nobody holds a kept result any more).

The service never holds the bytes of a kept result in memory: it asks the endpoint that keeps
it to upload it as a blob (once; the stub is remembered, and the blob lives as long as its
task), then answers with the stub, which the asker downloads. A result the service stores
itself (inline, or a blob) is answered from the store. An endpoint may read only the inputs of
open tasks dispatched to it, and they must be their owners' own tasks
(:meth:`Store.input_readers`); a client only its own tasks.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

from tether.bounded import BoundedCache
from tether.protocol import (
    MAX_IDS,
    ErrorCode,
    ErrorInfo,
    Fetch,
    Fetched,
    Release,
    TaskState,
    blob_ref_of,
    encode,
    kept_ref_of,
)

from .async_store import AsyncStore
from .sessions import EndpointSession, send_or_drop

log = logging.getLogger("tether.service.fetches")

#: blob stubs of kept results already uploaded, so a second ask costs no second upload
UPLOADED_CACHE = 65536
#: askers waiting for one result (a bound: a client asking again and again adds nothing)
MAX_WAITERS_PER_TASK = 256
#: results asked for and not here yet, in all (past it an ask is refused, QuotaExceeded, in words)
MAX_WAITING = 100_000
#: seconds after which an upload asked of an endpoint and not answered is asked again
ASK_AGAIN_S = 30.0


class Fetches:
    """Who waits for which result, and the frames that answer them."""

    def __init__(self, db: AsyncStore, endpoints: dict[str, EndpointSession], blobs: Any = None):
        self.db = db
        self.endpoints = endpoints
        self.blobs = blobs  # service/blobs/index.py BlobIndex: lets an endpoint read an input's blob
        #: starts a user endpoint that is not running (stopped after its idle timeout) and says
        #: whether it is one: its kept results are asked for once it connects
        self.wake: Callable[[str], Awaitable[bool]] | None = None
        self._after_start: dict[str, set[str]] = defaultdict(set)  # user endpoint -> kept results wanted
        self._waiting: dict[str, dict[int, Any]] = defaultdict(dict)  # task id -> {id(session): session}
        #: (asking endpoint, input id) -> its open tasks that take that input
        self._readers: dict[tuple[str, str], list[str]] = {}
        self._uploaded: BoundedCache[str, bytes] = BoundedCache(max_items=UPLOADED_CACHE)
        #: kept results an endpoint was asked to upload and has not answered: when (asked again
        #: after ASK_AGAIN_S, in case that endpoint went away meanwhile)
        self._asked: dict[str, float] = {}
        self._asked_of: dict[str, str] = {}  # ... and which endpoint: the only one whose answer counts

    # --- asks -----------------------------------------------------------------------------------
    async def from_client(self, session: Any, ids: list[str]) -> None:
        """A client wants the values of its tasks' kept results."""
        ids, errors = self._wait_first(session, ids)
        rows = await self.db.get_tasks(session.user_id, ids)
        known = {r.id for r in rows}
        for tid in ids:
            if tid not in known:
                errors[tid] = _error(ErrorCode.UNKNOWN_TASK, f"task {tid} is not one of yours (or it was purged)")
        await self._answer_rows(session, rows, errors, asker_endpoint=None)

    async def from_endpoint(self, session: EndpointSession, ids: list[str]) -> None:
        """An endpoint wants results that tasks it holds take as inputs."""
        ids, errors = self._wait_first(session, ids)
        readers = await self.db.input_readers(session.endpoint_id, ids)
        for tid in ids:
            if tid not in readers:
                errors[tid] = _error(ErrorCode.UNKNOWN_TASK, f"task {tid} is not an input of a task this endpoint "
                                     "holds")
        wanted: dict[str, set[str]] = defaultdict(set)  # owner -> inputs their tasks here take
        for tid, pairs in readers.items():
            for _, owner in pairs:
                wanted[owner].add(tid)
        owned: dict[str, tuple[Any, str]] = {}  # an input must be its reader's owner's own task
        for owner, ids_of_owner in wanted.items():
            for row in await self.db.get_tasks(owner, list(ids_of_owner)):
                owned[row.id] = (row, owner)
        rows = []
        for tid, pairs in readers.items():
            if tid not in owned:
                errors[tid] = _error(ErrorCode.UNKNOWN_TASK, f"input task {tid} is not a task of the owner of the "
                                     "task that takes it (or it was purged)")
                continue
            row, owner = owned[tid]
            rows.append(row)
            self._readers[(session.endpoint_id, tid)] = [reader for reader, reader_owner in pairs
                                                         if reader_owner == owner]
        await self._answer_rows(session, rows, errors, asker_endpoint=session.endpoint_id)

    def _wait_first(self, asker: Any, ids: list[str]) -> tuple[list[str], dict[str, ErrorInfo]]:
        """Register ``asker`` as waiting for ``ids`` *before* the store is read: a result stored
        while the read is under way (it may see the row as it was) still reaches it. Returns the
        ids registered and the refusals of the others (over the bound)."""
        taken: list[str] = []
        errors: dict[str, ErrorInfo] = {}
        for tid in ids:
            if tid in self._waiting or len(self._waiting) < MAX_WAITING:
                self._wait(tid, asker)
                taken.append(tid)
            else:
                errors[tid] = _error(ErrorCode.QUOTA_EXCEEDED, f"the service holds {MAX_WAITING} asks for results "
                                     "that are not here yet; ask for this one again later")
        return taken, errors

    async def _answer_rows(self, asker: Any, rows: list[Any], errors: dict[str, ErrorInfo],
                           asker_endpoint: str | None) -> None:
        """Answer what the store already has; the asker stays registered (see :meth:`_wait_first`)
        for what is not there yet."""
        data: dict[str, bytes] = {}
        upload: dict[str, list[str]] = defaultdict(list)  # keeping endpoint -> tasks to upload
        for r in rows:
            tid = r.id
            if r.state in (TaskState.FAILED.value, TaskState.CANCELLED.value):
                what = "was cancelled" if r.state == TaskState.CANCELLED.value else "failed"
                errors[tid] = _error(ErrorCode.INPUT_FAILED, f"task {tid} {what}: {_message(r.error)}")
                continue
            if r.state != TaskState.SUCCESS.value:  # not finished: answered when its result is stored
                continue
            kept = kept_ref_of(r.result)
            if kept is None:
                data[tid] = r.result if r.result is not None else b""
                continue
            stub = self._uploaded.get(tid)
            if stub is not None:
                data[tid] = stub
            elif kept.endpoint == asker_endpoint:
                errors[tid] = _error(ErrorCode.RESULT_LOST, f"the result of task {tid} was kept on this endpoint "
                                     "and is no longer there (released, or freed after kept_results_retention_s)")
            elif kept.endpoint not in self.endpoints:
                if await self._woken(kept.endpoint, tid):
                    continue
                errors[tid] = _error(ErrorCode.ENDPOINT_OFFLINE, f"the result of task {tid} is kept on endpoint "
                                     f"{kept.endpoint}, which is not connected (to this service replica); it can "
                                     "be fetched once it is")
            elif self._ask(tid, kept.endpoint):
                upload[kept.endpoint].append(tid)
        for tid in (*data, *errors):  # answered now: no longer waiting
            self._unwait(tid, asker)
        await self._send(asker, data, errors)
        for endpoint_id, ids in upload.items():
            ep = self.endpoints.get(endpoint_id)
            if ep is not None:
                for start in range(0, len(ids), MAX_IDS):
                    await send_or_drop(ep, encode(Fetch(ids=ids[start : start + MAX_IDS])))

    async def _woken(self, endpoint_id: str, tid: str) -> bool:
        """A user endpoint keeps ``tid`` and is not running: start it, and ask once it connects."""
        if self.wake is None or not await self.wake(endpoint_id):
            return False
        self._after_start[endpoint_id].add(tid)
        return True

    async def endpoint_connected(self, session: EndpointSession) -> None:
        """An endpoint connected: the kept results wanted from it while it was away are asked for."""
        wanted = self._after_start.pop(session.endpoint_id, set())
        ids = [tid for tid in wanted if tid in self._waiting]
        for tid in ids:
            self._asked.pop(tid, None)
        for start in range(0, len(ids), MAX_IDS):
            chunk = [tid for tid in ids[start : start + MAX_IDS] if self._ask(tid, session.endpoint_id)]
            if chunk:
                await send_or_drop(session, encode(Fetch(ids=chunk)))

    def _ask(self, tid: str, endpoint_id: str) -> bool:
        """Whether to ask ``endpoint_id``, which keeps ``tid``, to upload it now (not if it was
        just asked); only that endpoint's answer will be taken."""
        now = time.monotonic()
        last = self._asked.get(tid)
        if last is not None and now - last < ASK_AGAIN_S and self._asked_of.get(tid) == endpoint_id:
            return False
        self._asked[tid] = now
        self._asked_of[tid] = endpoint_id
        return True

    def _wait(self, tid: str, asker: Any) -> None:
        waiting = self._waiting[tid]
        if len(waiting) < MAX_WAITERS_PER_TASK:
            waiting[id(asker)] = asker

    def _unwait(self, tid: str, asker: Any) -> None:
        waiting = self._waiting.get(tid)
        if waiting is not None:
            waiting.pop(id(asker), None)
            if not waiting:
                del self._waiting[tid]

    # --- answers --------------------------------------------------------------------------------
    async def uploaded(self, session: EndpointSession, msg: Fetched) -> None:
        """An endpoint uploaded kept results (or says why it could not): the askers get them.

        Only answers to what this endpoint was asked, naming a blob stored as that task's result,
        are taken: anything else (another endpoint's blob offered as a victim's input, which a
        reader would unpickle) is dropped and logged.
        """
        mine = {tid for tid in (*msg.data, *msg.errors) if self._asked_of.get(tid) == session.endpoint_id}
        if len(mine) < len(msg.data) + len(msg.errors):
            log.warning("endpoint %s answered for kept results it was not asked for; ignored", session.endpoint_id)
        for tid in mine:
            self._asked.pop(tid, None)
            self._asked_of.pop(tid, None)
        for tid, stub in msg.data.items():
            ref = blob_ref_of(stub)  # only blob stubs: an endpoint never answers with data
            if tid in mine and ref is not None and (self.blobs is None or await self.blobs.is_result_of(ref.id, tid)):
                self._uploaded[tid] = stub
                await self._deliver(tid, stub, None)
        for tid, error in msg.errors.items():
            if tid in mine:
                await self._deliver(tid, None, error)

    async def results_stored(self, results: list[Any]) -> None:
        """Results just stored: askers waiting for them get them (kept ones after an upload)."""
        if not self._waiting:
            return
        for r in results:
            if r.id not in self._waiting:
                continue
            kept = kept_ref_of(r.data) if r.state == TaskState.SUCCESS.value else None
            if kept is not None:
                ep = self.endpoints.get(kept.endpoint)
                if ep is None:
                    if not await self._woken(kept.endpoint, r.id):
                        await self._deliver(r.id, None, _error(ErrorCode.ENDPOINT_OFFLINE, f"the result of task "
                                                               f"{r.id} is kept on endpoint {kept.endpoint}, not "
                                                               "connected"))
                elif self._ask(r.id, kept.endpoint):
                    await send_or_drop(ep, encode(Fetch(ids=[r.id])))
                continue
            if r.state == TaskState.SUCCESS.value:
                await self._deliver(r.id, r.data if r.data is not None else b"", None)
            else:
                what = "was cancelled" if r.state == TaskState.CANCELLED.value else "failed"
                await self._deliver(r.id, None, _error(ErrorCode.INPUT_FAILED, f"task {r.id} {what}: "
                                                       f"{r.error.message if r.error else ''}"))

    async def _deliver(self, tid: str, data: bytes | None, error: ErrorInfo | None) -> None:
        for asker in self._waiting.pop(tid, {}).values():
            await self._send(asker, {tid: data} if data is not None else {}, {tid: error} if error else {})

    async def _let_read(self, data: bytes, readers: list[str]) -> None:
        """An endpoint downloads an input's blob: the tasks that read it name it, as their own
        arguments' blobs are named (see BlobIndex.may_read)."""
        ref = blob_ref_of(data)
        if ref is not None and readers:
            await self.blobs.link_inputs(ref.id, readers)

    async def _send(self, asker: Any, data: dict[str, bytes], errors: dict[str, ErrorInfo]) -> None:
        if isinstance(asker, EndpointSession):
            for tid in (*data, *errors):
                readers = self._readers.pop((asker.endpoint_id, tid), [])  # answered: no longer remembered
                if tid in data and self.blobs is not None:
                    await self._let_read(data[tid], readers)
        if data or errors:
            await send_or_drop(asker, encode(Fetched(data=data, errors=errors)))

    # --- release --------------------------------------------------------------------------------
    async def release(self, user_id: str, ids: list[str]) -> None:
        """A client holds these kept results no more: the endpoints keeping them may free them."""
        by_endpoint: dict[str, list[str]] = defaultdict(list)
        for r in await self.db.get_tasks(user_id, ids):
            kept = kept_ref_of(r.result) if r.state == TaskState.SUCCESS.value else None
            if kept is not None:
                by_endpoint[kept.endpoint].append(r.id)
        for endpoint_id, released in by_endpoint.items():
            ep = self.endpoints.get(endpoint_id)
            if ep is not None:  # an endpoint away frees them after kept_results_retention_s
                await send_or_drop(ep, encode(Release(ids=released)))


def _error(code: ErrorCode, message: str) -> ErrorInfo:
    return ErrorInfo(type="ResultLost" if code != ErrorCode.INPUT_FAILED else "InputFailed", message=message,
                     code=code.value)


def _message(error_json: str | None) -> str:
    """The stored error's message (the store keeps it as JSON)."""
    import json

    if not error_json:
        return "no error recorded"
    try:
        return str(json.loads(error_json).get("message", ""))
    except (ValueError, AttributeError):
        return error_json
