"""Tasks to endpoints and results back, under flow control: the path every task takes.

An endpoint holds at most its workers + ``prefetch`` tasks; new tasks go straight to it while
it has room and nothing older waits, else wait in a small in-memory queue, else are paged to it
from the store in submission order (never the whole backlog in memory, or in one query). Its
reports (received, running, results) apply only to tasks dispatched to it (``routing.py``
remembers which, so the hot path asks the store nothing); a result is stored before the
endpoint is told to drop it, and the first result of a task is the one kept.

Kept lean on purpose (SPEC section 8): no await, thread hop or allocation per task that the
durable lifecycle does not need. State changes a lost write cannot hurt are written in bulk
(:meth:`Dispatch.flush_deferred`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict, deque

from tether.protocol import (
    DEFAULT_PREFETCH,
    ITEM_OVERHEAD,
    Audit,
    Cancel,
    Error,
    ErrorCode,
    Received,
    Result,
    Running,
    Task,
    Tasks,
    TaskState,
    TooLarge,
    encode,
    frame_batches,
    task_frames,
    wire_size,
)

from .async_store import AsyncStore
from .bus import LocalBus, RabbitBus
from .fetches import Fetches
from .replica_events import Forward, OwnedTask, ResultsPushed, inline
from .routing import Routes
from .sessions import PEER_MAX_FRAME, EndpointSession, failed_result, send_or_drop
from .store import json_or_none
from .subscriptions import Subscriptions

log = logging.getLogger("tether.service.relay")

DISPATCH_CHUNK = 1000  # most tasks per TASKS frame
PAGE_MIN = 64  # fewest rows read per page of an endpoint's backlog
#: stored tasks waiting for an endpoint's room are kept in memory up to this many (and bytes), so
#: a burst is sent on without reading the store back; beyond, they are paged from the store
QUEUE_MAX = 10_000
QUEUE_BYTES = 32 * 1024 * 1024


class Dispatch(Subscriptions):
    """The endpoints connected here, what each holds, and the tasks and results between them."""

    def __init__(self, db: AsyncStore, bus: LocalBus | RabbitBus | None = None, prefetch: int = DEFAULT_PREFETCH):
        super().__init__(db, bus)
        self.prefetch = prefetch
        self.endpoints: dict[str, EndpointSession] = {}
        #: kept results asked for by clients and endpoints (service/fetches.py)
        self.fetches = Fetches(db, self.endpoints)
        self.routes = Routes(remember_ended=self.replicated)
        # State changes that are not worth a commit each (a lost one is re-derived: the task is
        # re-dispatched, or its result carries the times): written in bulk by flush_deferred().
        self._deferred: dict[TaskState, dict[str, float]] = {TaskState.DISPATCHED: {}, TaskState.RUNNING: {}}
        self._deferred_collected: dict[str, list[str]] = defaultdict(list)

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

    async def _dispatched_to(self, endpoint_id: str, ids: list[str]) -> tuple[list[str], list[str]]:
        """Split ids an endpoint reports on into (open tasks of that endpoint, foreign ids); the
        store is asked only about ids this process does not remember (see ``routing.py``)."""
        unknown = self.routes.unknown(ids)
        looked_up: dict[str, tuple[str, bool]] = {}
        if unknown:
            looked_up = await self.db.open_task_endpoints(unknown)
            self.routes.learn(looked_up)
        return self.routes.split(endpoint_id, ids, looked_up)

    # --- to endpoints -----------------------------------------------------------------------
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

    async def _refill_from_store(self, ep: EndpointSession) -> None:
        """Page an endpoint's backlog from the store again (work stored by another replica)."""
        if ep.multi_user:
            return
        if ep.queue:  # everything queued here is in the store too: read it from there, in order
            ep.queue.clear()
            ep.queue_bytes = 0
        ep.backlog = True
        await self._refill(ep)

    async def _load_and_dispatch(self, ep: EndpointSession, ids: list[str]) -> None:
        """Read these open tasks of the endpoint (already counted in ``ep.sent``) and send them;
        those that ended meanwhile, or are not this endpoint's, leave ``ep.sent``."""
        loaded = [r for r in await self.db.load_open_tasks(ids) if r.endpoint_id == ep.endpoint_id]
        ep.sent.difference_update(set(ids) - {r.id for r in loaded})
        per_owner: dict[str, list[Task]] = defaultdict(list)
        for r in loaded:
            per_owner[r.owner_id].append(Task(id=r.id, function=r.function_id, endpoint=r.endpoint_id,
                                              payload=r.payload, group=r.group_id, spec=json_or_none(r.spec),
                                              uec=json_or_none(r.uec), inputs=json_or_none(r.inputs) or [],
                                              keep=r.keep_over))
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

    async def _offer_carried(self, ep: EndpointSession, carried: list[OwnedTask]) -> None:
        """Stored tasks another replica sent whole for an endpoint held here: offered as this
        replica's own submissions are (no read of the store), except those the endpoint holds
        already (a page of the store sent them) or that ended here lately (cancelled, or run
        and reported from such a page)."""
        if ep.multi_user:
            return
        per_owner: dict[str, list[Task]] = defaultdict(list)
        for item in carried:
            tid = item.task.id
            if tid not in ep.sent and not self.routes.ended(tid):
                per_owner[item.owner].append(item.task)
        for owner, items in per_owner.items():
            await self._offer(ep, owner, items)

    async def _dispatch(self, ep: EndpointSession, owner: str, items: list[Task]) -> None:
        """Send tasks of one owner to an endpoint, with the function bodies it has not seen, in
        frames bounded in bytes; a task too large for any frame fails alone."""
        ep.sent.update(t.id for t in items)
        self.routes.track(ep.endpoint_id, (t.id for t in items))
        needed: dict[str, bytes | None] = {}
        for fid in {t.function for t in items}:
            if fid not in ep.sent_functions:
                needed[fid] = await self.db.get_function(owner, fid)

        first = True
        for batch in task_frames(items, needed.get, PEER_MAX_FRAME, DISPATCH_CHUNK):
            if not first:
                await asyncio.sleep(0)  # a large backlog never holds the loop for long (a lone frame: no extra turn)
            first = False
            if isinstance(batch, TooLarge):
                ep.sent.discard(batch.item.id)
                await self._fail_task(owner, batch.item.id, ErrorCode.PAYLOAD_TOO_LARGE,
                                      batch.message(f"task {batch.item.id}, sent to endpoint {ep.endpoint_id},"))
                continue
            chunk, bodies = batch
            ep.sent_functions.update(bodies)
            await ep.send_tasks(encode(Tasks(tasks=chunk, functions=bodies)))

    async def _cancel_on(self, ep: EndpointSession, ids: list[str]) -> None:
        """Cancelled tasks of an endpoint held here: never sent if still queued; killed if running."""
        cancelled = set(ids)
        self.routes.forget(ids)  # a copy of one still on its way from another replica is not sent
        if ep.queue:
            ep.queue = deque(item for item in ep.queue if item[1].id not in cancelled)
            ep.queue_bytes = sum(wire_size(t) for _, t in ep.queue)
        await send_or_drop(ep, encode(Cancel(ids=ids)))

    async def _fail_task(self, owner: str, task_id: str, code: ErrorCode, message: str) -> None:
        """End an open task with an error the service raised itself (stored, then pushed)."""
        result = failed_result(task_id, code, message)
        stored = await self.db.write_results([result])
        self.routes.forget([task_id])
        self._push_results(stored)
        await self._tell_results(owner, [r.id for r in stored])

    # --- from endpoints ---------------------------------------------------------------------
    async def _refuse_reports(self, session: EndpointSession, what: str, ids: list[str]) -> None:
        """An endpoint spoke of tasks that are not its own: refuse, log, and tell it."""
        session.refused_reports += len(ids)
        self.counters["refused_endpoint_reports"] += len(ids)
        log.warning("endpoint %s (owner %s) sent '%s' for %d task(s) not dispatched to it, e.g. %s; refused",
                    session.endpoint_id, session.owner_id, what, len(ids), ids[0])
        await send_or_drop(session, encode(Error(code=ErrorCode.NOT_DISPATCHED, ids=ids[:100],
                                               message=f"'{what}' refused for {len(ids)} task(s) that were not "
                                                       "dispatched to this endpoint")))

    async def _state_report(self, session: EndpointSession, msg: Received | Running) -> None:
        """The endpoint has these tasks (``received``: state dispatched) or started them."""
        state = TaskState.DISPATCHED if isinstance(msg, Received) else TaskState.RUNNING
        mine, foreign = await self._dispatched_to(session.endpoint_id, msg.ids)
        if foreign:
            await self._refuse_reports(session, msg.__struct_config__.tag, foreign)
        ts = msg.ts or time.time()
        self._deferred[state].update(dict.fromkeys(mine, ts))
        self._push_status(mine, state, ts)
        if self.replicated:
            await self._tell_states(session.owner_id, [(tid, state.value, ts) for tid in mine])
        if session.parent_id:
            await self._audit(session, [(tid, state.value, ts) for tid in mine])

    async def _store_results(self, session: EndpointSession, results: list[Result]) -> None:
        self.counters["result_frames"] += 1
        mine, foreign = await self._dispatched_to(session.endpoint_id, [r.id for r in results])
        fresh = self.routes.claim(mine, results)
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
                self.routes.unclaim(session.endpoint_id, fresh)  # not acknowledged: the endpoint sends them again
                raise
        await self.fetches.results_stored(fresh)
        # foreign and duplicate results are acknowledged too: they will never be stored, and the
        # endpoint must not send them again forever
        session.acknowledge([r.id for r in results])
        if session.parent_id:
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
            self.routes.unclaim(session.endpoint_id, fresh)  # not acknowledged: the endpoint sends them again
            raise
        for client in self._push_results(stored):
            await client.send_results_now()
        stored_ids = {r.id for r in stored}
        again = [r.id for r in results if r.id not in stored_ids and r.id not in foreign]
        await self._push_stored(session.owner_id, again)
        if self.replicated:  # small results travel whole: the client's replica need not read them back
            carried = [r for r in stored if inline(r)]
            if carried:
                await self.bus.publish(ResultsPushed(user_id=session.owner_id, results=carried))
            named = [r.id for r in stored if not inline(r)]
            await self._tell_results(session.owner_id, [*named, *again])
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
            await self._tell_endpoint(Forward(endpoint_id=session.parent_id, frame=frame))

