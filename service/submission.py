"""A batch of tasks from a client, from frame to acknowledgement: validated (endpoint visible
to the submitter, payload size, blobs and functions theirs), kept within the user's quotas,
routed to the user endpoint of a multi-user endpoint, **stored**, acknowledged, and only then
offered to the endpoint (a result can never overtake its task).

A layer of the relay (see ``relay.py``); an id that already belongs to another owner is
refused, never merged.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from typing import Any

from tether.protocol import DEFAULT_PREFETCH, EndpointBrief, ErrorCode, Refusal, Submit, SubmitAck, Task, encode
from tether.serialize import function_id

from .async_store import AsyncStore
from .authentication_policy import Identity
from .authentication_policy import refusal as authentication_refusal
from .bus import LocalBus, RabbitBus
from .policy import Policy, not_admitted_message
from .replica_events import Offered, OfferedTo, OwnedTask, Refill, inline
from .sessions import ClientSession
from .store import json_or_none

#: how long a replica trusts its count of a user's open tasks (the quota) before counting again
QUOTA_RECOUNT_S = 5.0
#: endpoint rows one submission needs, read at most once each (None: no such endpoint)
Rows = dict[str, dict[str, Any] | None]


def function_quota_message(fid: str, size: int, quota: int) -> str:
    """Why a function body was refused: what it would take, the limit, and what frees room."""
    return (f"function {fid} ({size} bytes) would take the function bodies you keep on this service past its "
            f"limit of {quota} bytes per user; bodies no stored task names are deleted after the service's "
            "function retention: register fewer distinct functions (pass data as arguments, not in closures)")


def deleted_refusal(endpoint_id: str) -> Refusal:
    """The refusal of a task for a deleted endpoint (found when checked, or when stored)."""
    return Refusal(ErrorCode.ENDPOINT_DELETED, f"endpoint {endpoint_id} was deleted by its owner")


class Submission(Policy):
    """Submissions: checks, quotas, routing to user endpoints, storing, acknowledging."""

    def __init__(self, db: AsyncStore, max_payload: int, prefetch: int = DEFAULT_PREFETCH, authenticator: Any = None,
                 bus: LocalBus | RabbitBus | None = None, max_open_per_user: int | None = None,
                 function_quota: int | None = None):
        super().__init__(db, bus, prefetch, authenticator)
        self.max_payload = max_payload
        self.max_open_per_user = max_open_per_user
        self.function_quota = function_quota  # bytes of function bodies one user may keep here
        self._open_counts: dict[str, tuple[int, float]] = {}  # user -> (open tasks, when counted)
        #: user -> [lock, submissions holding or awaiting it], while any is here
        self._quota_locks: dict[str, list[Any]] = {}
        #: large payloads (service/blobs/index.py BlobIndex): checks that tasks name only their owner's blobs
        self.blobs: Any = None

    async def submit(self, session: ClientSession | None, user_id: str, msg: Submit, token: str = "") -> SubmitAck:
        """Store, acknowledge and dispatch a batch of tasks; returns the acknowledgement.
        ``token`` (a REST request's; a connection's is its session's) names the identity that
        endpoints' authentication policies judge."""
        received = time.time()
        self.counters["submit_frames"] += 1
        rows: Rows = {}
        token = session.token if session is not None else token
        identity = self.authenticator.identity_of(token) if self.authenticator is not None and token else None
        candidates, rejected, bodies = await self.validate_submission(user_id, msg, rows, identity)
        over = await self.db.add_functions(user_id, bodies, self.function_quota)
        if over:
            candidates = self._refuse_functions(candidates, rejected, over, bodies)
        user_endpoints = await self._route_to_user_endpoints(user_id, candidates, rows)
        # stored before anything else sees it: a result can never overtake its task
        inserted, resubmitted, taken = await self._insert_within_quota(user_id, candidates, rejected, received)
        if self.blobs is not None:
            await self.blobs.link([t for t in inserted if t.blobs])
        for tid in taken:
            rejected[tid] = Refusal(ErrorCode.ID_CONFLICT, f"task id {tid} is already in use; task ids must be "
                                    "unique (let the client make them: it uses random uuids)")
        self.counters["submitted"] += len(inserted)
        by_endpoint: dict[str, list[Task]] = defaultdict(list)
        for t in inserted:
            by_endpoint[t.endpoint].append(t)
        accepted = [t.id for t in inserted] + resubmitted
        if session is not None:
            self.watch(session, accepted)
        for endpoint_id, items in by_endpoint.items():
            ep = self.endpoints.get(endpoint_id)
            if ep is not None:
                await self._offer(ep, user_id, items)
                continue
            if self.replicated:  # held elsewhere, maybe: small tasks travel whole, larger ones by id
                carried = [OwnedTask(user_id, t) for t in items if inline(t)]
                holder = self._holder(rows.get(endpoint_id))
                if carried and holder:  # one message per batch for every endpoint that replica holds
                    await self.bus.publish(OfferedTo(replica=holder, tasks=carried))
                elif carried:
                    await self._tell_endpoint(Offered(endpoint_id=endpoint_id, tasks=carried))
                if len(carried) < len(items):
                    await self._tell_endpoint(Refill(endpoint_id=endpoint_id,
                                                     ids=[t.id for t in items if not inline(t)]))
            if endpoint_id in user_endpoints:
                await self._start_user_endpoint(endpoint_id)
        briefs = {eid: await self._endpoint_brief(eid, rows) for eid in {t.endpoint for t in candidates}}
        ack = SubmitAck(ref=msg.ref, accepted=accepted, rejected=rejected, ts=received, endpoints=briefs)
        if session is not None:
            session.hold_ack(encode(ack))  # it goes with the next frame to this client (see ClientSession)
            if rejected or resubmitted:
                await session.send_held_acks()  # a refusal is news: at once
            if resubmitted:  # sent again after a reconnect: the client may have missed its news
                await self._send_current(session, await self.db.get_tasks(user_id, resubmitted))
        return ack

    def _holder(self, row: dict[str, Any] | None) -> str | None:
        """The other replica that holds an endpoint, as its row (read lately) says; None if
        unknown. A stale answer costs a forward (the receiver sends on what it does not hold)."""
        if row is None or not self.is_online(row):
            return None
        holder = (json_or_none(row.get("status")) or {}).get("replica")
        return holder if holder and holder != self.bus.replica_id else None

    # --- checks -------------------------------------------------------------------------------
    async def validate_submission(self, user_id: str, msg: Submit, rows: Rows, identity: Identity | None = None
                                  ) -> tuple[list[Task], dict[str, Refusal], dict[str, bytes]]:
        """Split a submission into (tasks to store, {task id: refusal}, function bodies to keep)."""
        bodies: dict[str, bytes] = {}
        forged: set[str] = set()
        for fid, body in msg.functions.items():
            if function_id(body) == fid:
                bodies[fid] = body
            else:
                forged.add(fid)
        accepted: list[Task] = []
        rejected: dict[str, Refusal] = {}
        seen: set[str] = set()
        endpoint_refusal: dict[str, Refusal | None] = {}
        named = {b for t in msg.tasks for b in t.blobs}
        owned = await self.blobs.owned(user_id, named) if named and self.blobs is not None else set()
        for task in msg.tasks:
            tid = task.id
            if tid in seen:
                rejected[tid] = Refusal(ErrorCode.ID_CONFLICT, f"task id {tid} appears twice in one submission")
                continue
            seen.add(tid)
            if task.endpoint not in endpoint_refusal:
                endpoint_refusal[task.endpoint] = await self._endpoint_refusal(user_id, task.endpoint, rows, identity)
            refusal = endpoint_refusal[task.endpoint]
            if refusal is not None:
                rejected[tid] = refusal
            elif len(task.payload) > self.max_payload:
                rejected[tid] = Refusal(ErrorCode.PAYLOAD_TOO_LARGE,
                                        f"arguments are {len(task.payload)} bytes, over this service's limit of "
                                        f"{self.max_payload} bytes")
            elif any(b not in owned for b in task.blobs):
                rejected[tid] = Refusal(ErrorCode.UNKNOWN_BLOB, f"blob {next(b for b in task.blobs if b not in owned)} "
                                        "is not one of your uploads (or it expired with its tasks)")
            elif task.function in forged:
                rejected[tid] = Refusal(ErrorCode.FUNCTION_ID_MISMATCH,
                                        f"function id {task.function} is not the hash of the body sent with it")
            elif task.function not in bodies and await self.db.get_function(user_id, task.function) is None:
                rejected[tid] = Refusal(ErrorCode.UNKNOWN_FUNCTION, f"function {task.function} is not registered; "
                                        "submit it with its body first")
            else:
                accepted.append(task)
        return accepted, rejected, bodies

    async def _row(self, rows: Rows, endpoint_id: str) -> dict[str, Any] | None:
        """An endpoint's row, read at most once per submission (``rows`` holds those read); with
        several replicas, an ordinary endpoint's at most once a second per replica
        (``endpoint_rows.py``: safe because the insert checks the endpoint again)."""
        if endpoint_id not in rows:
            read = self.endpoint_rows.get if self.replicated else self.db.get_endpoint
            rows[endpoint_id] = await read(endpoint_id)
        return rows[endpoint_id]

    async def _endpoint_refusal(self, user_id: str, endpoint_id: str, rows: Rows,
                                identity: Identity | None = None) -> Refusal | None:
        """Why ``user_id`` may not send tasks to ``endpoint_id``, or None if they may: it is
        theirs, or a multi-user endpoint whose policy admits them."""
        session = self.endpoints.get(endpoint_id)
        if session is not None and session.owner_id == user_id and not session.multi_user and not session.parent_id:
            return self._authentication_refusal(endpoint_id, session.authentication, identity)
        ep = await self._row(rows, endpoint_id)
        if ep is None or not (ep["owner_id"] == user_id or await self.admits(user_id, ep)):
            return Refusal(ErrorCode.UNKNOWN_ENDPOINT,
                           f"unknown endpoint {endpoint_id}: no endpoint with this id is visible to you")
        if ep["deleted_at"] is not None:
            return deleted_refusal(endpoint_id)
        if ep["parent_id"] and not await self.parent_admits(ep, await self._row(rows, ep["parent_id"])):
            return Refusal(ErrorCode.NOT_ADMITTED, not_admitted_message(ep["parent_id"]))
        # a user endpoint answers to its multi-user endpoint's policy, whichever id the task names
        governing = await self._row(rows, ep["parent_id"]) if ep["parent_id"] else ep
        policy = (json.loads(governing["policy"]).get("authentication")
                  if governing and governing.get("policy") else None)
        return self._authentication_refusal(governing["id"] if governing else endpoint_id, policy, identity)

    @staticmethod
    def _authentication_refusal(endpoint_id: str, policy: dict[str, Any] | None,
                                identity: Identity | None) -> Refusal | None:
        """The endpoint's authentication policy applied to the submitter's identity (see
        ``service/authentication_policy.py``); None when there is no policy (the common case)."""
        if not policy:
            return None
        why = authentication_refusal(endpoint_id, policy, identity)
        return None if why is None else Refusal(*why)

    def _refuse_functions(self, candidates: list[Task], rejected: dict[str, Refusal], over: set[str],
                          bodies: dict[str, bytes]) -> list[Task]:
        """Refuse the tasks whose function body did not fit the user's function quota."""
        for t in candidates:
            if t.function in over:
                rejected[t.id] = Refusal(ErrorCode.QUOTA_EXCEEDED, function_quota_message(
                    t.function, len(bodies[t.function]), self.function_quota or 0))
        return [t for t in candidates if t.function not in over]

    async def _insert_within_quota(self, user_id: str, batch: list[Task], rejected: dict[str, Refusal],
                                   received: float) -> tuple[list[Task], list[str], list[str]]:
        """Store the tasks of ``batch`` that fit the user's quota of open tasks (``insert_tasks``'
        answer); the rest are refused in words.

        One user's submissions pass here one at a time on this replica, so the count kept here
        (the store's, plus what was inserted since) is exact for this process; it is re-read
        every QUOTA_RECOUNT_S. Once a batch would take the user past half the quota, the store
        counts and inserts in one transaction under the user's lock, which holds across
        replicas. Far from the limit nothing is counted per submission (a count reads every
        open task of the user).
        """
        limit = self.max_open_per_user
        if limit is None or not batch:
            inserted, resubmitted, taken, gone = await self.db.insert_tasks(user_id, batch, received)
            self._refuse_deleted(batch, gone, rejected)
            return inserted, resubmitted, taken
        entry = self._quota_locks.get(user_id)
        if entry is None:
            entry = self._quota_locks[user_id] = [asyncio.Lock(), 0]
        entry[1] += 1
        try:
            async with entry[0]:
                count, counted_at = self._open_counts.get(user_id, (0, -QUOTA_RECOUNT_S))
                if time.monotonic() - counted_at >= QUOTA_RECOUNT_S:
                    count = await self.db.count_open(user_id)
                    counted_at = time.monotonic()
                exact = count + len(batch) > limit // 2
                inserted, resubmitted, taken, gone = await self.db.insert_tasks(
                    user_id, batch, received, max_open=limit if exact else None)
                fitted = len(inserted) + len(resubmitted) + len(taken) + len(gone) == len(batch)
                count = count + len(inserted) if fitted else limit  # refused ones met a full quota
                self._open_counts[user_id] = (count, counted_at)
        finally:
            entry[1] -= 1
            if not entry[1]:
                del self._quota_locks[user_id]
        self._refuse_deleted(batch, gone, rejected)
        settled = {t.id for t in inserted}.union(resubmitted, taken, gone)
        over = [t for t in batch if t.id not in settled]
        if over:
            self.counters["refused_quota"] += len(over)
            refusal = Refusal(ErrorCode.QUOTA_EXCEEDED,
                              f"you have {count} tasks waiting or running, and this service allows {limit} per "
                              "user: wait for some to finish (or cancel some), then submit again")
            for t in over:
                rejected[t.id] = refusal
        return inserted, resubmitted, taken

    @staticmethod
    def _refuse_deleted(batch: list[Task], gone: list[str], rejected: dict[str, Refusal]) -> None:
        """Tasks the store would not keep: their endpoint was deleted after this replica last
        read its row (on another replica, within the second a row is kept: endpoint_rows.py)."""
        if not gone:
            return
        endpoint_of = {t.id: t.endpoint for t in batch}
        for tid in gone:
            rejected[tid] = deleted_refusal(endpoint_of[tid])

    # --- where the tasks go -------------------------------------------------------------------
    async def _route_to_user_endpoints(self, user_id: str, batch: list[Task], rows: Rows) -> set[str]:
        """Point tasks for a multi-user endpoint at the user endpoint that runs this user's tasks
        with this config (one per user and config); returns the user endpoint ids."""
        parents: dict[str, dict[str, Any] | None] = {}
        children: dict[tuple[str, str], str] = {}  # (parent, config) -> user endpoint, for this batch
        routed: set[str] = set()
        for t in batch:
            if t.endpoint not in parents:
                session = self.endpoints.get(t.endpoint)
                if session is not None and not session.multi_user:
                    parents[t.endpoint] = None  # the common case: an ordinary endpoint, online; no SELECT
                else:
                    ep = await self._row(rows, t.endpoint)
                    parents[t.endpoint] = ep if ep is not None and ep.get("multi_user") else None
            parent = parents[t.endpoint]
            if parent is not None:
                key = (parent["id"], json.dumps(t.uec or {}, sort_keys=True))
                if key not in children:
                    children[key] = await self.db.user_endpoint_for(
                        parent, user_id, await self.db.user_name(user_id) or user_id, t.uec)
                t.endpoint = children[key]
                routed.add(t.endpoint)
        return routed

    async def _endpoint_brief(self, endpoint_id: str, rows: Rows) -> EndpointBrief:
        """Online state and versions, so the client can warn of a mismatch before any task runs."""
        session = self.endpoints.get(endpoint_id)
        if session is not None:
            status, online, holder = session.status, True, self.advertise_url
        else:
            ep = await self._row(rows, endpoint_id)
            status = json_or_none(ep["status"]) if ep and ep.get("status") else {}
            online = ep is not None and self.is_online(ep)
            # the replica holding it, as its row says (written by that replica, never by the endpoint)
            holder = status.get("replica_url") if online and self.replicated else None
        versions = status.get("versions") or {}
        return EndpointBrief(online=online, python=versions.get("python"), versions=versions,
                             service=holder if isinstance(holder, str) else None)
