"""The relay: moves tasks from clients to endpoints and results back, storing each step first,
and keeps every frame inside its sender's own trust boundary.

Transport-free on purpose: a session is anything with ``async send(bytes)`` and
``async close(code, reason)``, so the WebSocket routes stay thin and the durable lifecycle and
the ownership rules live in one place:

* a task is stored before its submission is acknowledged; an id that already belongs to
  another owner is refused, never merged;
* the endpoint acknowledges receipt (``dispatched``) and start (``running``);
* a result is stored before the endpoint is told to drop it from its spool;
* an endpoint's reports (received, running, results) apply only to tasks dispatched to it;
  anything else is refused and logged;
* on (re)connection an endpoint is sent every open task it does not already hold, so tasks
  that were in the hands of an endpoint that died run again (at-least-once execution);
* flow control: an endpoint holds at most its workers + ``prefetch`` tasks; the rest wait in the
  store and are paged to it, in submission order, as its results free room;
* every frame is cut by bytes as well as by count (:func:`tether.protocol.frame_batches`); a
  task or result too large for any frame fails alone, in words;
* a result for a task that already has one is dropped (exactly-once results per task id).
* with several replicas, what this process cannot do itself (the endpoint or the client is
  connected to another replica) is published on the bus for the replica that can (``bus.py``);
  the database stays the only truth.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import defaultdict, deque
from collections.abc import Iterable, Sequence
from typing import Any

from tether.protocol import (
    CLOSE_AUTH_FAILED,
    CLOSE_CREDENTIAL_ROTATED,
    CLOSE_TRY_AGAIN,
    DEFAULT_PREFETCH,
    ITEM_OVERHEAD,
    MAX_IDS,
    TERMINAL_STATES,
    Audit,
    Cancel,
    Collected,
    EndpointBrief,
    Error,
    ErrorCode,
    ErrorInfo,
    Heartbeat,
    Identity,
    Received,
    Refusal,
    Result,
    Results,
    Running,
    StartUserEndpoint,
    Status,
    Stop,
    Submit,
    SubmitAck,
    Subscribe,
    Task,
    Tasks,
    TaskState,
    TooLarge,
    UserEndpointFailed,
    UserEndpointStarted,
    encode,
    frame_batches,
    task_frames,
    wire_size,
)
from tether.serialize import function_id

from .async_store import AsyncStore
from .bus import LocalBus, RabbitBus, endpoint_key, user_key
from .sessions import (
    PEER_MAX_FRAME,
    ClientSession,
    EndpointSession,
    close_quietly,
    failed_result,
    send_or_drop,
)
from .store import transitions

log = logging.getLogger("tether.service.relay")

DISPATCH_CHUNK = 1000  # most tasks per TASKS frame
PAGE_MIN = 64  # fewest rows read per page of an endpoint's backlog
#: stored tasks waiting for an endpoint's room are kept in memory up to this many (and bytes), so
#: a burst is sent on without reading the store back; beyond, they are paged from the store
QUEUE_MAX = 10_000
QUEUE_BYTES = 32 * 1024 * 1024
#: ids of a reconnecting endpoint's hello looked up at a time (SQLite answers on the event loop)
WITHDRAW_SLICE = 1000
START_RETRY_S = 30.0  # a user endpoint asked for and not connected by then is asked for again
#: how long a replica trusts its count of a user's open tasks (the quota) before counting again
QUOTA_RECOUNT_S = 5.0
#: with several replicas: an endpoint whose last report (to any replica) is older is offline
PRESENCE_S = 30.0
#: with several replicas: how often each replica re-reads the backlogs of the endpoints it holds
#: and (every WATCH_RECONCILE_S) the tasks its clients wait for, in case the bus lost news
RECONCILE_S = 5.0
WATCH_RECONCILE_S = 10.0


class Relay:
    """The routing state of one service process (replica) and what it does with each frame.

    With a broker (``bus`` a :class:`~tether.service.bus.RabbitBus`), ``replicated`` is true:
    an endpoint or client may be connected to another replica, so what cannot be done here is
    published as an event for the replica that can (see :mod:`tether.service.bus`).
    """

    def __init__(self, db: AsyncStore, max_payload: int, prefetch: int = DEFAULT_PREFETCH, authenticator: Any = None,
                 bus: LocalBus | RabbitBus | None = None, max_open_per_user: int | None = None,
                 function_quota: int | None = None):
        self.db = db
        self.max_open_per_user = max_open_per_user
        self.function_quota = function_quota  # bytes of function bodies one user may keep here
        self._open_counts: dict[str, tuple[int, float]] = {}  # user -> (open tasks, when counted)
        #: user -> [lock, submissions holding or awaiting it], while any is here
        self._quota_locks: dict[str, list[Any]] = {}
        self.bus = bus or LocalBus()
        self.replicated = self.bus.remote
        self._user_sessions: dict[str, int] = defaultdict(int)  # connected client sessions per user
        self.authenticator = authenticator  # service.auth.Authenticator: re-checks Globus tokens
        self.max_payload = max_payload
        self.prefetch = prefetch
        self.endpoints: dict[str, EndpointSession] = {}
        self.clients: set[ClientSession] = set()
        self.watchers: dict[str, set[ClientSession]] = defaultdict(set)
        self.counters: dict[str, int] = defaultdict(int)
        # State changes that are not worth a commit each (a lost one is re-derived: the task is
        # re-dispatched, or its result carries the times): written in bulk by flush_deferred().
        self._deferred: dict[TaskState, dict[str, float]] = {TaskState.DISPATCHED: {}, TaskState.RUNNING: {}}
        self._deferred_collected: dict[str, list[str]] = defaultdict(list)
        self._start_requested: dict[str, float] = {}  # user endpoint id -> when its start was asked for
        #: large payloads (service/blobs.py BlobIndex): checks that tasks name only their owner's blobs
        self.blobs: Any = None

    async def flush_deferred(self) -> None:
        """Write deferred state changes and collection marks (one transaction per kind)."""
        for state, stamps in self._deferred.items():
            if stamps:
                self._deferred[state] = {}
                await self.db.set_state(list(stamps.items()), state)
        if self._deferred_collected:
            pending, self._deferred_collected = self._deferred_collected, defaultdict(list)
            for user_id, ids in pending.items():
                await self.db.mark_collected(user_id, ids)

    async def flush_loop(self, interval: float = 0.2) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.flush_deferred()
            except Exception:  # noqa: BLE001 - a failed flush is retried by the next state change
                log.exception("writing deferred task states failed")

    async def credential_loop(self, interval: float = 1.0) -> None:
        """Close connections whose token or endpoint credential was revoked or rotated, within
        ``interval`` seconds, even when that happened in another process (``tether service``)."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.enforce_credentials()
            except Exception:  # noqa: BLE001 - checked again next time
                log.exception("checking credentials of open connections failed")

    async def enforce_credentials(self) -> None:
        # only the sessions asked about are judged: one that connected while the store answered
        # (an endpoint reconnecting, say) is not in the answer, and was checked when it connected
        clients = list(self.clients)
        if clients:
            valid = await self.db.valid_token_hashes([s.token_hash for s in clients])
            for session in [s for s in clients if s.token_hash not in valid and s in self.clients]:
                if self.authenticator is not None and await self.authenticator.still_valid_at_globus(session.token):
                    continue  # a Globus token (cached answer, re-asked when it expires)
                log.info("closing a connection of user %s: its token was revoked or rotated", session.user_id)
                self.clients.discard(session)
                await close_quietly(session, CLOSE_AUTH_FAILED, "token revoked or rotated; get a new one")
        endpoints = list(self.endpoints.values())
        if endpoints:
            valid_pairs = await self.db.valid_endpoint_secrets([(e.endpoint_id, e.secret_hash) for e in endpoints])
            for session in [e for e in endpoints if (e.endpoint_id, e.secret_hash) not in valid_pairs
                            and self.endpoints.get(e.endpoint_id) is e]:
                await self.disconnect_endpoint(session.endpoint_id, CLOSE_CREDENTIAL_ROTATED,
                                               "this endpoint's credential was replaced or revoked")

    # --- replicas ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect to the bus (a no-op without a broker)."""
        await self.bus.start(self.on_event, self.reconcile)

    def is_online(self, row: dict[str, Any]) -> bool:
        """Whether an endpoint (its row) is connected: to this process, or, with several
        replicas, to one that heard from it within PRESENCE_S."""
        if row["id"] in self.endpoints:
            return True
        if not self.replicated or row.get("deleted_at") is not None:
            return False
        status = _loads(row.get("status")) or {}
        return bool(status.get("online")) and (row.get("last_seen") or 0) > time.time() - PRESENCE_S

    async def _tell_endpoint(self, endpoint_id: str, kind: str, data: Any = None) -> None:
        """News for an endpoint connected to another replica (dropped by the broker if none holds it)."""
        if self.replicated:
            await self.bus.publish(endpoint_key(endpoint_id), kind, endpoint_id, data)

    async def _tell_user(self, user_id: str, kind: str, data: list[Any]) -> None:
        """News for a user's client sessions on other replicas."""
        if self.replicated and data:
            for start in range(0, len(data), MAX_IDS):
                await self.bus.publish(user_key(user_id), kind, user_id, data[start : start + MAX_IDS])

    async def on_event(self, kind: str, target: str, data: Any) -> None:
        """Act on news from another replica (``target``: a user id or an endpoint id)."""
        self.counters[f"bus_{kind}"] += 1
        if kind == "status":
            self._fan_out({tid: (tid, state, ts) for tid, state, ts in data}, "updates")
            return
        if kind == "results":
            await self._push_stored(target, data)
            return
        ep = self.endpoints.get(target)
        if ep is None:
            return  # it left this replica meanwhile: its new replica reads the database
        if kind == "refill":
            await self._offer_stored(ep, data)
        elif kind == "cancel":
            await self._cancel_on(ep, data)
        elif kind == "frame":
            await send_or_drop(ep, data)
        elif kind == "start_user":
            await self._start_user_endpoint(data)
        elif kind == "close":
            await self._disconnect_here(target, int(data[0]), str(data[1]))
        elif kind == "takeover":  # it connected to another replica: this connection is stale
            log.info("endpoint %s connected to replica %s; dropping its connection here", target, data)
            del self.endpoints[target]
            await self.bus.unbind(endpoint_key(target))
            await close_quietly(ep, CLOSE_TRY_AGAIN, "this endpoint connected to another replica")

    async def _push_stored(self, user_id: str, ids: list[str]) -> None:
        """Push the stored results among ``ids`` to the sessions here that wait for them."""
        watched = [tid for tid in ids if tid in self.watchers]
        if watched:
            rows = await self.db.get_tasks(user_id, watched)
            self._push_results([row_to_result(r) for r in rows if r.state in TERMINAL_STATES])

    async def _refill_from_store(self, ep: EndpointSession) -> None:
        """Page an endpoint's backlog from the store again (work stored by another replica)."""
        if ep.multi_user:
            return
        if ep.queue:  # everything queued here is in the store too: read it from there, in order
            ep.queue.clear()
            ep.queue_bytes = 0
        ep.backlog = True
        await self._refill(ep)

    async def reconcile(self, watched: bool = True) -> None:
        """Catch up on news the bus may have lost (a broker restart drops what was in flight):
        page the backlogs of the endpoints held here, and push results of watched tasks that ended."""
        for ep in list(self.endpoints.values()):
            if self.endpoints.get(ep.endpoint_id) is ep:
                await self._refill_from_store(ep)
        if not watched:
            return
        per_user: dict[str, set[str]] = defaultdict(set)
        for session in list(self.clients):
            per_user[session.user_id].update(session.watching)
        for user_id, ids in per_user.items():
            listed = list(ids)
            for start in range(0, len(listed), MAX_IDS):
                ended = await self.db.finished_among(user_id, listed[start : start + MAX_IDS])
                await self._push_stored(user_id, ended)

    async def reconcile_loop(self) -> None:
        """With several replicas: reconcile now and then (cheap: one page query per idle endpoint)."""
        last_watch = time.monotonic()
        while self.replicated:
            await asyncio.sleep(RECONCILE_S)
            try:
                due = time.monotonic() - last_watch >= WATCH_RECONCILE_S
                await self.reconcile(watched=due)
                if due:
                    last_watch = time.monotonic()
            except Exception:  # noqa: BLE001 - tried again next time
                log.exception("reconciling with the store failed")

    # --- helpers -------------------------------------------------------------------------------

    def watch(self, session: ClientSession, ids: Iterable[str]) -> None:
        for tid in ids:
            self.watchers[tid].add(session)
            session.watching.add(tid)

    def _fan_out(self, ids_to_item: dict[str, Any], key: str, drop: bool = False) -> set[ClientSession]:
        """Queue each item for the sessions watching its task; returns the sessions concerned."""
        per_session: dict[ClientSession, list[Any]] = defaultdict(list)
        for tid, item in ids_to_item.items():
            sessions = self.watchers.pop(tid, None) if drop else self.watchers.get(tid)
            for s in sessions or ():
                per_session[s].append(item)
                if drop:
                    s.watching.discard(tid)
        for session, items in per_session.items():
            session.push(key, items)
        return set(per_session)

    def _push_status(self, ids: Iterable[str], state: TaskState, ts: float) -> None:
        self._fan_out({tid: (tid, state.value, ts) for tid in ids}, "updates")

    def _push_results(self, results: Iterable[Result]) -> set[ClientSession]:
        return self._fan_out({r.id: r for r in results}, "results", drop=True)

    # --- clients -------------------------------------------------------------------------------
    async def client_connected(self, session: ClientSession) -> None:
        """A client session joins; with several replicas, this one now hears its user's news
        (bound before the session's first frame, so no result stored after it is missed)."""
        self.clients.add(session)
        self._user_sessions[session.user_id] += 1
        if self._user_sessions[session.user_id] == 1:
            await self.bus.bind(user_key(session.user_id))

    async def client_disconnected(self, session: ClientSession) -> None:
        if session in self.clients:
            self.clients.discard(session)
            self._user_sessions[session.user_id] -= 1
            if self._user_sessions[session.user_id] <= 0:
                del self._user_sessions[session.user_id]
                await self.bus.unbind(user_key(session.user_id))
        for tid in session.watching:
            group = self.watchers.get(tid)
            if group is not None:
                group.discard(session)
                if not group:
                    del self.watchers[tid]
        session.watching.clear()

    async def _row(self, rows: dict[str, dict[str, Any] | None], endpoint_id: str) -> dict[str, Any] | None:
        """An endpoint's row, read at most once per submission (``rows`` holds those read)."""
        if endpoint_id not in rows:
            rows[endpoint_id] = await self.db.get_endpoint(endpoint_id)
        return rows[endpoint_id]

    async def _endpoint_refusal(self, user_id: str, endpoint_id: str,
                          rows: dict[str, dict[str, Any] | None]) -> Refusal | None:
        """Why ``user_id`` may not send tasks to ``endpoint_id``, or None if they may: it is
        theirs, or a multi-user endpoint whose policy admits them."""
        session = self.endpoints.get(endpoint_id)
        if session is not None and session.owner_id == user_id and not session.multi_user and not session.parent_id:
            return None
        ep = await self._row(rows, endpoint_id)
        if ep is None or not (ep["owner_id"] == user_id or await self.admits(user_id, ep)):
            return Refusal(ErrorCode.UNKNOWN_ENDPOINT,
                           f"unknown endpoint {endpoint_id}: no endpoint with this id is visible to you")
        if ep["deleted_at"] is not None:
            return Refusal(ErrorCode.ENDPOINT_DELETED, f"endpoint {endpoint_id} was deleted by its owner")
        if ep["parent_id"] and not await self.parent_admits(ep, await self._row(rows, ep["parent_id"])):
            return Refusal(ErrorCode.NOT_ADMITTED, not_admitted_message(ep["parent_id"]))
        return None

    async def parent_admits(self, child: dict[str, Any], parent: dict[str, Any] | None) -> bool:
        """Whether a user endpoint may still serve its owner: its multi-user endpoint exists and
        its owner is that endpoint's owner or admitted by its policy (asked on every submission
        and every connection, so removing a user from ``allowed_users`` holds on every path)."""
        return parent is not None and parent["deleted_at"] is None and (
            parent["owner_id"] == child["owner_id"] or await self.admits(child["owner_id"], parent))

    async def enforce_policy(self, parent_id: str) -> int:
        """After a multi-user endpoint's policy changed: the user endpoints of users it no longer
        admits lose their credential and their connection (the process exits), and their open
        tasks fail saying why. Returns how many user endpoints were stopped."""
        parent = await self.db.get_endpoint(parent_id)
        stopped = 0
        for child in await self.db.user_endpoints(parent_id):
            if await self.parent_admits(child, parent):
                continue
            stopped += 1
            await self.db.void_secret(child["id"])
            why = not_admitted_message(parent_id)
            error = {"type": "NotAdmitted", "code": ErrorCode.NOT_ADMITTED.value, "message": why}
            rows = await self.db.fail_open_tasks(child["id"], error)
            await self.disconnect_endpoint(child["id"], CLOSE_AUTH_FAILED, why)
            await self._announcefailed_result(rows, error)
            log.info("multi-user endpoint %s no longer admits %s: user endpoint %s stopped, %d open task(s) failed",
                     parent_id, child["owner_id"], child["id"], len(rows))
        return stopped

    async def admits(self, user_id: str, ep: dict[str, Any]) -> bool:
        """Whether a multi-user endpoint's policy lets ``user_id`` (or their name) send it tasks."""
        if not ep.get("multi_user") or not ep.get("policy"):
            return False
        policy = json.loads(ep["policy"])
        users = policy.get("users") or []
        return bool(policy.get("public")) or user_id in users or await self.db.user_name(user_id) in users

    async def validate_submission(self, user_id: str, msg: Submit, rows: dict[str, dict[str, Any] | None]
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
                endpoint_refusal[task.endpoint] = await self._endpoint_refusal(user_id, task.endpoint, rows)
            refusal = endpoint_refusal[task.endpoint]
            if refusal is not None:
                rejected[tid] = refusal
            elif len(task.payload) > self.max_payload:
                rejected[tid] = Refusal(ErrorCode.PAYLOAD_TOO_LARGE,
                                        f"arguments are {len(task.payload)} bytes, over this service's limit of "
                                        f"{self.max_payload} bytes")
            elif any(b not in owned for b in task.blobs):
                rejected[tid] = Refusal(ErrorCode.UNKNOWN_BLOB, f"blob {next(b for b in task.blobs if b not in owned)} "
                                        "is not one of your complete uploads (or it expired with its tasks)")
            elif task.function in forged:
                rejected[tid] = Refusal(ErrorCode.FUNCTION_ID_MISMATCH,
                                        f"function id {task.function} is not the hash of the body sent with it")
            elif task.function not in bodies and await self.db.get_function(user_id, task.function) is None:
                rejected[tid] = Refusal(ErrorCode.UNKNOWN_FUNCTION, f"function {task.function} is not registered; "
                                        "submit it with its body first")
            else:
                accepted.append(task)
        return accepted, rejected, bodies

    def _refuse_functions(self, candidates: list[Task], rejected: dict[str, Refusal], over: set[str],
                          bodies: dict[str, bytes]) -> list[Task]:
        """Refuse the tasks whose function body did not fit the user's function quota."""
        for t in candidates:
            if t.function in over:
                rejected[t.id] = Refusal(ErrorCode.QUOTA_EXCEEDED, function_quota_message(
                    t.function, len(bodies[t.function]), self.function_quota or 0))
        return [t for t in candidates if t.function not in over]

    async def submit(self, session: ClientSession | None, user_id: str, msg: Submit) -> SubmitAck:
        """Store, acknowledge and dispatch a batch of tasks; returns the acknowledgement."""
        received = time.time()
        self.counters["submit_frames"] += 1
        rows: dict[str, dict[str, Any] | None] = {}  # endpoint rows this submission needs, read once each
        candidates, rejected, bodies = await self.validate_submission(user_id, msg, rows)
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
            await self._tell_endpoint(endpoint_id, "refill", [t.id for t in items])  # on another replica, maybe
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
            return await self.db.insert_tasks(user_id, batch, received)
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
                inserted, resubmitted, taken = await self.db.insert_tasks(
                    user_id, batch, received, max_open=limit if exact else None)
                fitted = len(inserted) + len(resubmitted) + len(taken) == len(batch)
                count = count + len(inserted) if fitted else limit  # refused ones met a full quota
                self._open_counts[user_id] = (count, counted_at)
        finally:
            entry[1] -= 1
            if not entry[1]:
                del self._quota_locks[user_id]
        settled = {t.id for t in inserted}.union(resubmitted, taken)
        over = [t for t in batch if t.id not in settled]
        if over:
            self.counters["refused_quota"] += len(over)
            refusal = Refusal(ErrorCode.QUOTA_EXCEEDED,
                              f"you have {count} tasks waiting or running, and this service allows {limit} per "
                              "user: wait for some to finish (or cancel some), then submit again")
            for t in over:
                rejected[t.id] = refusal
        return inserted, resubmitted, taken

    async def _route_to_user_endpoints(self, user_id: str, batch: list[Task],
                                 rows: dict[str, dict[str, Any] | None]) -> set[str]:
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

    async def _start_user_endpoint(self, user_endpoint_id: str, force: bool = False) -> None:
        """Ask the multi-user endpoint to start a user endpoint, with a fresh credential for it
        (once per START_RETRY_S; if the parent is offline, when it connects)."""
        child = await self.db.get_endpoint(user_endpoint_id)
        if child is None or child["parent_id"] is None or self.is_online(child):
            return
        parent = self.endpoints.get(child["parent_id"])
        if parent is None:  # the parent may be connected to another replica: it asks there
            await self._tell_endpoint(child["parent_id"], "start_user", user_endpoint_id)
            return
        asked = self._start_requested.get(user_endpoint_id)
        if not force and asked is not None and time.monotonic() - asked < START_RETRY_S:
            return
        self._start_requested[user_endpoint_id] = time.monotonic()
        identity = Identity(id=child["owner_id"], username=await self.db.user_name(child["owner_id"]) or "")
        log.info("asking multi-user endpoint %s to start user endpoint %s for %s", parent.endpoint_id,
                 user_endpoint_id, identity.username)
        await send_or_drop(parent, encode(StartUserEndpoint(
            user_endpoint_id=user_endpoint_id, identity=identity, config=json.loads(child["user_config"] or "{}"),
            secret=await self.db.new_secret(user_endpoint_id))))

    async def _endpoint_brief(self, endpoint_id: str, rows: dict[str, dict[str, Any] | None]) -> EndpointBrief:
        """Online state and versions, so the client can warn of a mismatch before any task runs."""
        session = self.endpoints.get(endpoint_id)
        if session is not None:
            status, online = session.status, True
        else:
            ep = await self._row(rows, endpoint_id)
            status = _loads(ep["status"]) if ep and ep.get("status") else {}
            online = ep is not None and self.is_online(ep)
        versions = status.get("versions") or {}
        return EndpointBrief(online=online, python=versions.get("python"), versions=versions)

    async def subscribe(self, session: ClientSession, msg: Subscribe) -> None:
        """Watch tasks (e.g. a reloaded task group); current state or result is sent at once."""
        await self.flush_deferred()
        rows = await self.db.get_tasks(session.user_id, msg.ids)
        known = {r.id for r in rows}
        unknown = [i for i in msg.ids if i not in known]
        if unknown:
            await send_or_drop(session, encode(Error(code=ErrorCode.UNKNOWN_TASK, ids=unknown,
                                                   message="unknown task ids (never submitted by you, or purged)")))
        self.watch(session, known)
        await self._send_current(session, rows)

    async def _send_current(self, session: ClientSession, rows: Sequence[Any]) -> None:
        """Tell a session where these (its own) tasks are: a result, or the latest state."""
        results, updates = [], []
        for r in rows:
            if r.state in TERMINAL_STATES:
                results.append(row_to_result(r))
            else:
                updates.append((r.id, r.state, r.t_running or r.t_dispatched or r.t_waiting or r.t_received))
        if updates:
            await send_or_drop(session, encode(Status(updates=updates)))
        if results:
            self._push_results(results)

    async def cancel(self, user_id: str, ids: Sequence[str]) -> list[str]:
        rows = await self.db.cancel(user_id, ids)
        if not rows:
            return []
        now = time.time()
        err = ErrorInfo(type="TaskCancelled", message="cancelled by its owner")
        self._push_results(Result(id=r.id, state="cancelled", error=err, times={"cancelled": now}) for r in rows)
        await self._tell_user(user_id, "results", [r.id for r in rows])
        per_endpoint: dict[str, list[str]] = defaultdict(list)
        for r in rows:
            if r.state != TaskState.WAITING.value or r.endpoint_id in self.endpoints or self.replicated:
                per_endpoint[r.endpoint_id].append(r.id)
        for endpoint_id, tids in per_endpoint.items():
            ep = self.endpoints.get(endpoint_id)
            if ep is not None:
                await self._cancel_on(ep, tids)
            else:
                await self._tell_endpoint(endpoint_id, "cancel", tids)
        self.counters["cancelled"] += len(rows)
        return [r.id for r in rows]

    async def _cancel_on(self, ep: EndpointSession, ids: list[str]) -> None:
        """Cancelled tasks of an endpoint held here: never sent if still queued; killed if running."""
        cancelled = set(ids)
        if ep.queue:
            ep.queue = deque(item for item in ep.queue if item[1].id not in cancelled)
            ep.queue_bytes = sum(wire_size(t) for _, t in ep.queue)
        await send_or_drop(ep, encode(Cancel(ids=ids)))

    async def client_message(self, session: ClientSession, msg: Any) -> None:
        """Act on one (already validated) client frame."""
        if isinstance(msg, Submit):
            await self.submit(session, session.user_id, msg)
        elif isinstance(msg, Subscribe):
            await self.subscribe(session, msg)
        elif isinstance(msg, Cancel):
            await self.cancel(session.user_id, msg.ids)
        elif isinstance(msg, Collected):
            self._deferred_collected[session.user_id].extend(msg.ids)

    # --- endpoints -----------------------------------------------------------------------------
    async def endpoint_connected(self, session: EndpointSession, hello: Any) -> None:
        old = self.endpoints.get(session.endpoint_id)
        self.endpoints[session.endpoint_id] = session
        if old is not None and old is not session:
            log.info("endpoint %s reconnected; dropping its previous connection", session.endpoint_id)
            await close_quietly(old, CLOSE_CREDENTIAL_ROTATED, "replaced by a newer connection of this endpoint")
        session.status = {"versions": hello.versions, "capacity": hello.capacity}
        session.set_capacity(hello.capacity)
        # with several replicas: hear this endpoint's news here, and tell a replica that still
        # holds an older (dead) connection of it to let go
        await self.bus.bind(endpoint_key(session.endpoint_id))
        await self._tell_endpoint(session.endpoint_id, "takeover", self.bus.replica_id)
        await self._save_presence(session, online=True)
        self._start_requested.pop(session.endpoint_id, None)
        if session.multi_user:  # user endpoints with work waiting for them: start them now
            for child in await self.db.user_endpoints_with_open_tasks(session.endpoint_id):
                await self._start_user_endpoint(child["id"], force=True)
            return
        # what it holds counts against its window until it reports on it; the rest is paged to it.
        # It cannot hold more tasks than its window: a longer list is made up, and is cut there.
        inflight = hello.inflight[: session.window]
        session.sent = set(inflight) | set(hello.spooled)
        await self._withdraw_ended(session, inflight)
        session.backlog = True
        await self._refill(session)

    async def _withdraw_ended(self, session: EndpointSession, held: list[str]) -> None:
        """Reconcile what a (re)connecting endpoint holds: tasks that ended while it was away
        (cancelled, say) or are not its own are withdrawn, so they never run there; those it
        still holds that were marked waiting for it are dispatched again."""
        if not held:
            return
        mine: set[str] = set()
        for start in range(0, len(held), WITHDRAW_SLICE):  # slices, so other sessions are served meanwhile
            mine.update((await self.db.dispatched_to(session.endpoint_id, held[start : start + WITHDRAW_SLICE]))[0])
            await asyncio.sleep(0)
        ended = [tid for tid in held if tid not in mine]
        if mine:
            now = time.time()
            await self.db.redispatch([(tid, now) for tid in mine])
            back = [(tid, TaskState.DISPATCHED.value, now) for tid in mine]
            self._push_status(mine, TaskState.DISPATCHED, now)
            await self._tell_user(session.owner_id, "status", back)
        if ended:
            session.sent.difference_update(ended)
            self.counters["withdrawn_on_reconnect"] += len(ended)
            log.info("endpoint %s holds %d task(s) that ended while it was away; withdrawing them",
                     session.endpoint_id, len(ended))
            for start in range(0, len(ended), MAX_IDS):
                await send_or_drop(session, encode(Cancel(ids=ended[start : start + MAX_IDS])))

    async def endpoint_disconnected(self, session: EndpointSession) -> None:
        if self.endpoints.get(session.endpoint_id) is session:
            del self.endpoints[session.endpoint_id]
            await self.bus.unbind(endpoint_key(session.endpoint_id))
            ep = await self.db.get_endpoint(session.endpoint_id)
            if ep is None or ep["deleted_at"] is not None:
                return
            holder = (_loads(ep["status"]) or {}).get("replica")
            if holder in (None, self.bus.replica_id):  # not if it reconnected to another replica meanwhile
                await self._save_presence(session, online=False)
                await self._wait_again(session)

    async def _wait_again(self, session: EndpointSession) -> None:
        """The tasks a departed endpoint held wait for it again, and say so (in the store and to
        their watchers) until it is back: they are dispatched again then."""
        held = self.db.store.held_by(session.endpoint_id, session.sent)[: session.window]
        if not held:
            return
        for state in (TaskState.DISPATCHED, TaskState.RUNNING):  # a later flush must not move them back
            for tid in held:
                self._deferred[state].pop(tid, None)
        now = time.time()
        await self.db.set_state([(tid, now) for tid in held], TaskState.WAITING)
        self._push_status(held, TaskState.WAITING, now)
        await self._tell_user(session.owner_id, "status", [(tid, TaskState.WAITING.value, now) for tid in held])

    async def _save_presence(self, session: EndpointSession, online: bool) -> None:
        """Write an endpoint's status (capacity, versions, online, which replica holds it)."""
        await self.db.save_endpoint_status(session.endpoint_id, {**session.status, "online": online,
                                                                 "replica": self.bus.replica_id})

    async def _offer(self, ep: EndpointSession, owner: str, items: list[Task]) -> None:
        """New (stored) tasks for a connected endpoint: sent while it has room and nothing older
        waits, else queued in memory while the queue is small, else left to be paged."""
        if not ep.backlog and not ep.queue:
            room = max(0, ep.window - len(ep.sent))
            now, items = items[:room], items[room:]
            if now:
                await self._dispatch(ep, owner, now)
        if not items:
            return
        if not ep.backlog:
            size = sum(wire_size(t) for t in items)
            if len(ep.queue) + len(items) <= QUEUE_MAX and ep.queue_bytes + size <= QUEUE_BYTES:
                ep.queue.extend((owner, t) for t in items)
                ep.queue_bytes += size
                await self._refill(ep)  # room may have opened while we were sending
                return
            ep.queue.clear()  # too many to keep here: they are all in the store, paged from there
            ep.queue_bytes = 0
            ep.backlog = True
        await self._refill(ep)

    async def _refill(self, ep: EndpointSession) -> None:
        """Send an endpoint the open tasks waiting for it, up to its window: first those queued
        in memory, then pages from the store in submission order (never the whole backlog in
        memory, or in one query).

        Called when it connects, when a submission did not fit, and when its results or
        heartbeat free room. At the end of the backlog the cursor goes back to the start, so the
        next backlog is read from the beginning (skipping what the endpoint holds).
        """
        if ep.multi_user:
            return
        if ep.refilling:  # the running refill reads the store once more before it calls the backlog done
            ep.refill_again = True
            return
        ep.refilling, ep.refill_again = True, False
        # refill once a quarter of the window is free, not on every result: pages and frames stay
        # large (a frame and a query per result capped a million-task drain at ~1,000 tasks/s),
        # and the endpoint still holds three quarters of its window meanwhile
        low = max(1, ep.window // 4)
        try:
            while ep.queue and ep.window - len(ep.sent) >= low and self.endpoints.get(ep.endpoint_id) is ep:
                taken = [ep.queue.popleft() for _ in range(min(ep.window - len(ep.sent), len(ep.queue)))]
                ep.queue_bytes -= sum(wire_size(t) for _, t in taken)
                per_owner: dict[str, list[Task]] = defaultdict(list)
                for owner, t in taken:
                    per_owner[owner].append(t)
                ep.sent.update(t.id for _, t in taken)
                for owner, items in per_owner.items():
                    await self._dispatch(ep, owner, items)
            while ep.backlog and self.endpoints.get(ep.endpoint_id) is ep:
                credit = ep.window - len(ep.sent)
                if credit < low:
                    return
                limit = max(credit, PAGE_MIN)
                page = await self.db.open_task_page(ep.endpoint_id, ep.cursor, limit)
                fresh, consumed = [], 0
                for row in page:
                    if len(fresh) >= credit:
                        break
                    consumed += 1
                    ep.cursor = (row.t_received, row.id)
                    if row.id not in ep.sent:
                        fresh.append(row)
                if len(page) < limit and consumed == len(page):
                    if ep.refill_again:  # tasks stored while this page was read: read from the start again
                        ep.refill_again, ep.cursor = False, None
                    else:
                        ep.backlog, ep.cursor = False, None
                ep.sent.update(r.id for r in fresh)
                for chunk in frame_batches(fresh, PEER_MAX_FRAME, DISPATCH_CHUNK,
                                           size=lambda r: (r.size or 0) + ITEM_OVERHEAD):
                    rows = [chunk.item] if isinstance(chunk, TooLarge) else chunk
                    await self._load_and_dispatch(ep, [r.id for r in rows])
        finally:
            ep.refilling = False

    async def _load_and_dispatch(self, ep: EndpointSession, ids: list[str]) -> None:
        """Read these open tasks of the endpoint (already counted in ``ep.sent``) and send them;
        those that ended meanwhile, or are not this endpoint's, leave ``ep.sent``."""
        loaded = [r for r in await self.db.load_open_tasks(ids) if r.endpoint_id == ep.endpoint_id]
        ep.sent.difference_update(set(ids) - {r.id for r in loaded})
        per_owner: dict[str, list[Task]] = defaultdict(list)
        for r in loaded:
            per_owner[r.owner_id].append(Task(id=r.id, function=r.function_id, endpoint=r.endpoint_id,
                                              payload=r.payload, group=r.group_id, spec=_loads(r.spec),
                                              uec=_loads(r.uec)))
        for owner, items in per_owner.items():
            await self._dispatch(ep, owner, items)

    async def _offer_stored(self, ep: EndpointSession, ids: list[str]) -> None:
        """Tasks another replica stored for an endpoint held here: sent at once while it has room
        and nothing older waits (one read of just those tasks), else paged to it in order."""
        if ep.multi_user:
            return
        if ep.backlog or ep.queue or ep.refilling:
            await self._refill_from_store(ep)
            return
        room = max(0, ep.window - len(ep.sent))
        now = [tid for tid in ids if tid not in ep.sent][:room]
        ep.sent.update(now)  # counted before the read: a refill meanwhile skips them
        if now:
            await self._load_and_dispatch(ep, now)
        if len(now) < len(ids):  # no room for the rest: they wait in the store, paged to it in order
            await self._refill_from_store(ep)

    async def _dispatch(self, ep: EndpointSession, owner: str, items: list[Task]) -> None:
        """Send tasks of one owner to an endpoint, with the function bodies it has not seen, in
        frames bounded in bytes; a task too large for any frame fails alone."""
        ep.sent.update(t.id for t in items)
        self.db.store.track_dispatched(ep.endpoint_id, (t.id for t in items))  # memory only
        needed: dict[str, bytes | None] = {}
        for fid in {t.function for t in items}:
            if fid not in ep.sent_functions:
                needed[fid] = await self.db.get_function(owner, fid)

        for batch in task_frames(items, needed.get, PEER_MAX_FRAME, DISPATCH_CHUNK):
            if isinstance(batch, TooLarge):
                ep.sent.discard(batch.item.id)
                await self._fail_task(owner, batch.item.id, ErrorCode.PAYLOAD_TOO_LARGE,
                                      batch.message(f"task {batch.item.id}, sent to endpoint {ep.endpoint_id},"))
                continue
            chunk, bodies = batch
            ep.sent_functions.update(bodies)
            await send_or_drop(ep, encode(Tasks(tasks=chunk, functions=bodies)))
            await asyncio.sleep(0)  # a large backlog never holds the loop for long

    async def _fail_task(self, owner: str, task_id: str, code: ErrorCode, message: str) -> None:
        """End an open task with an error the service raised itself (stored, then pushed)."""
        result = failed_result(task_id, code, message)
        stored = await self.db.write_results([result])
        self.db.store.forget_open([task_id])
        self._push_results(stored)
        await self._tell_user(owner, "results", [r.id for r in stored])

    async def _refuse_reports(self, session: EndpointSession, what: str, ids: list[str]) -> None:
        """An endpoint spoke of tasks that are not its own: refuse, log, and tell it."""
        session.refused_reports += len(ids)
        self.counters["refused_endpoint_reports"] += len(ids)
        log.warning("endpoint %s (owner %s) sent '%s' for %d task(s) not dispatched to it, e.g. %s; refused",
                    session.endpoint_id, session.owner_id, what, len(ids), ids[0])
        await send_or_drop(session, encode(Error(code=ErrorCode.NOT_DISPATCHED, ids=ids[:100],
                                               message=f"'{what}' refused for {len(ids)} task(s) that were not "
                                                       "dispatched to this endpoint")))

    async def endpoint_message(self, session: EndpointSession, msg: Any) -> None:
        """Act on one (already validated) endpoint frame; only its own tasks are touched."""
        if isinstance(msg, Received | Running):
            state = TaskState.DISPATCHED if isinstance(msg, Received) else TaskState.RUNNING
            mine, foreign = await self.db.dispatched_to(session.endpoint_id, msg.ids)
            if foreign:
                await self._refuse_reports(session, msg.__struct_config__.tag, foreign)
            ts = msg.ts or time.time()
            self._deferred[state].update(dict.fromkeys(mine, ts))
            self._push_status(mine, state, ts)
            await self._tell_user(session.owner_id, "status", [(tid, state.value, ts) for tid in mine])
            await self._audit(session, [(tid, state.value, ts) for tid in mine])
        elif isinstance(msg, Results):
            await self._store_results(session, msg.results)
        elif isinstance(msg, UserEndpointStarted | UserEndpointFailed):
            await self._user_endpoint_report(session, msg)
        elif isinstance(msg, Heartbeat):
            session.status = {"versions": msg.versions or session.status.get("versions", {}),
                              "capacity": msg.capacity}
            session.set_capacity(msg.capacity)
            await self._save_presence(session, online=True)
            if session.backlog or session.queue:
                await self._refill(session)

    async def _store_results(self, session: EndpointSession, results: list[Result]) -> None:
        self.counters["result_frames"] += 1
        fresh, foreign = await self.db.claim_results(session.endpoint_id, results)
        if foreign:
            await self._refuse_reports(session, "result", foreign)
        for r in fresh:  # the result's row carries the times not yet written
            for state, stamps in self._deferred.items():
                ts = stamps.pop(r.id, None)
                if ts is not None:
                    r.times.setdefault(state.value, ts)
        if self.replicated:
            fresh = await self._store_and_announce(session, results, fresh, set(foreign))
        else:
            # Push first, store second, acknowledge third: the client has its result a commit
            # sooner, and the endpoint keeps it spooled until it is stored.
            for client in self._push_results(fresh):
                await client.send_results_now()
            try:
                await self.db.write_results(fresh)
            except Exception:
                self.db.store.unclaim(session.endpoint_id, fresh)  # not acknowledged: the endpoint sends them again
                raise
        # foreign and duplicate results are acknowledged too: they will never be stored, and the
        # endpoint must not send them again forever
        session.acknowledge([r.id for r in results])
        await self._audit(session, [(r.id, r.state, r.times.get(r.state) or time.time()) for r in fresh])
        self.counters["results"] += len(fresh)
        self.counters["failed"] += sum(r.state == TaskState.FAILED.value for r in fresh)
        # room freed on the endpoint (foreign and duplicate ids are simply not in its set)
        session.sent.difference_update(r.id for r in results)
        if session.backlog or session.queue:
            await self._refill(session)

    async def _store_and_announce(self, session: EndpointSession, results: list[Result], fresh: list[Result],
                                  foreign: set[str]) -> list[Result]:
        """With several replicas: store first (exactly one replica stores a task's result, see
        :meth:`Store.write_results`), then push what was stored here and announce it to the other
        replicas; returns the results stored here.

        A result this endpoint sends again for a task that already has one is announced again
        too: the replica that stored it may have died before it told anyone (the endpoint sends
        it again because that replica never acknowledged it).
        """
        try:
            stored = await self.db.write_results(fresh)
        except Exception:
            self.db.store.unclaim(session.endpoint_id, fresh)  # not acknowledged: the endpoint sends them again
            raise
        for client in self._push_results(stored):
            await client.send_results_now()
        stored_ids = {r.id for r in stored}
        again = [r.id for r in results if r.id not in stored_ids and r.id not in foreign]
        await self._push_stored(session.owner_id, again)
        await self._tell_user(session.owner_id, "results", [*stored_ids, *again])
        return stored

    async def _audit(self, session: EndpointSession, events: list[tuple[str, str, float]]) -> None:
        """Tell a user endpoint's parent what happened to its tasks (the parent keeps the audit log)."""
        if not session.parent_id or not events:
            return
        frame = encode(Audit(events=[(session.endpoint_id, tid, state, ts) for tid, state, ts in events]))
        parent = self.endpoints.get(session.parent_id)
        if parent is not None:
            await send_or_drop(parent, frame)
        else:  # the parent is connected to another replica
            await self._tell_endpoint(session.parent_id, "frame", frame)

    async def _user_endpoint_report(self, session: EndpointSession, msg: Any) -> None:
        """A multi-user endpoint reports on one of *its* user endpoints (others are refused)."""
        child = await self.db.get_endpoint(msg.user_endpoint_id)
        if child is None or child["parent_id"] != session.endpoint_id:
            await self._refuse_reports(session, msg.__struct_config__.tag, [msg.user_endpoint_id])
            return
        if isinstance(msg, UserEndpointStarted):
            await self.db.set_local_user(msg.user_endpoint_id, msg.local_user)
            return
        self._start_requested.pop(msg.user_endpoint_id, None)
        log.warning("user endpoint %s could not start: %s", msg.user_endpoint_id, msg.message)
        error = {"type": "UserEndpointFailed", "code": ErrorCode.USER_ENDPOINT_FAILED.value,
                 "message": f"the multi-user endpoint could not start your user endpoint: {msg.message}"}
        rows = await self.db.fail_open_tasks(msg.user_endpoint_id, error)
        await self._announcefailed_result(rows, error)

    async def _announcefailed_result(self, rows: Sequence[Any], error: dict[str, Any]) -> None:
        """Push the failure of tasks the service ended itself (rows: id, owner_id), here and on
        other replicas."""
        info = ErrorInfo(type=error["type"], message=error["message"], code=error["code"])
        now = time.time()
        self._push_results(Result(id=r.id, state="failed", error=info, times={"failed": now}) for r in rows)
        per_owner: dict[str, list[str]] = defaultdict(list)
        for r in rows:
            per_owner[r.owner_id].append(r.id)
        for owner, ids in per_owner.items():
            await self._tell_user(owner, "results", ids)

    async def stop_endpoint(self, endpoint_id: str) -> bool:
        """Ask an endpoint to stop; False if it is not connected (to any replica)."""
        ep = self.endpoints.get(endpoint_id)
        if ep is not None:
            await send_or_drop(ep, encode(Stop()))
            return True
        row = await self.db.get_endpoint(endpoint_id) if self.replicated else None
        if row is None or not self.is_online(row):
            return False
        await self._tell_endpoint(endpoint_id, "frame", encode(Stop()))
        return True

    async def disconnect_endpoint(self, endpoint_id: str, code: int, reason: str) -> None:
        """Close an endpoint's connection, on whichever replica holds it."""
        await self._disconnect_here(endpoint_id, code, reason)
        await self._tell_endpoint(endpoint_id, "close", [code, reason])

    async def _disconnect_here(self, endpoint_id: str, code: int, reason: str) -> None:
        session = self.endpoints.get(endpoint_id)
        if session is not None:
            await self.endpoint_disconnected(session)
            await close_quietly(session, code, reason)

    async def delete_endpoint(self, endpoint_id: str) -> int:
        """Stop and forget an endpoint for good; its open tasks fail in words. Returns how many."""
        await self.stop_endpoint(endpoint_id)
        error = {"type": "EndpointDeleted", "code": ErrorCode.ENDPOINT_DELETED.value,
                 "message": f"endpoint {endpoint_id} was deleted by its owner before this task finished"}
        rows = await self.db.delete_endpoint(endpoint_id, error)
        await self.disconnect_endpoint(endpoint_id, CLOSE_AUTH_FAILED, "this endpoint was deleted by its owner")
        await self._announcefailed_result(rows, error)
        return len(rows)


def function_quota_message(fid: str, size: int, quota: int) -> str:
    """Why a function body was refused: what it would take, the limit, and what frees room."""
    return (f"function {fid} ({size} bytes) would take the function bodies you keep on this service past its "
            f"limit of {quota} bytes per user; bodies no stored task names are deleted after the service's "
            "function retention: register fewer distinct functions (pass data as arguments, not in closures)")


def not_admitted_message(parent_id: str) -> str:
    """Why a user endpoint or task is refused once its owner is out of the parent's policy."""
    return (f"multi-user endpoint {parent_id} no longer admits you: its owner removed you from its allowed_users; "
            "ask them to add you again")


def _loads(text: str | None) -> Any:
    return json.loads(text) if text else None


def row_to_result(row: Any) -> Result:
    """A stored task row as a RESULT record."""
    error = None
    if row.error:
        e = json.loads(row.error)
        error = ErrorInfo(type=str(e.get("type", "")), message=str(e.get("message", "")),
                          traceback=str(e.get("traceback") or ""), code=e.get("code"))
    return Result(id=row.id, state=row.state, data=row.result, error=error, times=transitions(row))


__all__ = ["MAX_IDS", "Relay", "function_quota_message", "not_admitted_message", "row_to_result"]
