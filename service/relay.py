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

The relay is built in layers, one idea per module, each a class that builds on the one before
(what a layer needs of the earlier ones it calls on ``self``; nothing calls a later layer):

* ``subscriptions.py``: client sessions, the tasks they watch, pushes to them, news for other replicas;
* ``dispatch.py``: tasks to endpoints under flow control, their reports and results back;
* ``lifecycle.py``: an endpoint's connection, presence, user endpoints, stop and delete;
* ``policy.py``: revoked credentials and multi-user endpoints' policies, enforced;
* ``submission.py``: a client's batch checked, kept within quotas, stored, acknowledged, offered;
* here: what a client frame or another replica's event asks for, and catching up with the store.

Layers of one object rather than objects wired to each other: they share one process's
sessions and routing memory, and a call between them on the task path stays a plain method call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from tether.protocol import (
    CLOSE_TRY_AGAIN,
    MAX_IDS,
    Cancel,
    Collected,
    Error,
    ErrorCode,
    ErrorInfo,
    Fetch,
    Release,
    Result,
    Submit,
    Subscribe,
    TaskState,
    encode,
)

from .replica_events import (
    CancelOn,
    Close,
    EndpointEvent,
    Forward,
    Offered,
    OfferedTo,
    OwnedTask,
    Refill,
    ReplicaEvent,
    ResultsPushed,
    ResultsStored,
    StartUser,
    StatusChanged,
    Takeover,
    endpoint_key,
    replica_key,
    tag_of,
)
from .sessions import ClientSession, EndpointSession, close_quietly, send_or_drop
from .submission import Submission

log = logging.getLogger("tether.service.relay")

#: with several replicas: how often each replica re-reads the backlogs of the endpoints it holds
#: and (every WATCH_RECONCILE_S) the tasks its clients wait for, in case the bus lost news
RECONCILE_S = 5.0
WATCH_RECONCILE_S = 10.0


class Relay(Submission):
    """The routing state of one service process (replica) and what it does with each frame.

    With a broker (``bus`` a :class:`~tether.service.bus.RabbitBus`), ``replicated`` is true:
    an endpoint or client may be connected to another replica, so what cannot be done here is
    published as an event for the replica that can (see :mod:`tether.service.replica_events`).
    """

    # --- clients -------------------------------------------------------------------------------
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
        elif isinstance(msg, Fetch):
            await self.fetches.from_client(session, msg.ids)
        elif isinstance(msg, Release):
            await self.fetches.release(session.user_id, msg.ids)

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

    async def cancel(self, user_id: str, ids: Sequence[str]) -> list[str]:
        rows = await self.db.cancel(user_id, ids)
        if not rows:
            return []
        self.routes.forget(r.id for r in rows)
        now = time.time()
        err = ErrorInfo(type="TaskCancelled", message="cancelled by its owner")
        self._push_results(Result(id=r.id, state="cancelled", error=err, times={"cancelled": now}) for r in rows)
        await self._tell_results(user_id, [r.id for r in rows])
        per_endpoint: dict[str, list[str]] = defaultdict(list)
        for r in rows:
            if r.state != TaskState.WAITING.value or r.endpoint_id in self.endpoints or self.replicated:
                per_endpoint[r.endpoint_id].append(r.id)
        await self._to_holders(per_endpoint, self._cancel_on, lambda eid, ids: CancelOn(endpoint_id=eid, ids=ids))
        self.counters["cancelled"] += len(rows)
        return [r.id for r in rows]

    # --- replicas ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect to the bus (a no-op without a broker)."""
        await self.bus.start(self.on_event, self.reconcile)
        await self.bus.bind(replica_key(self.bus.replica_id))  # tasks for the endpoints held here

    async def on_event(self, event: ReplicaEvent) -> None:
        """Act on news from another replica."""
        self.counters[f"bus_{tag_of(event)}"] += 1
        match event:
            case StatusChanged(updates=updates):
                self._fan_out({tid: (tid, state, ts) for tid, state, ts in updates}, "updates")
                return
            case ResultsStored(user_id=user_id, ids=ids):
                await self._push_stored(user_id, ids)
                return
            case ResultsPushed(results=results):
                for client in self._push_results(results):
                    await client.send_results_now()
                return
            case OfferedTo(tasks=tasks):
                await self._offer_to_held(tasks)
                return
        ep = self.endpoints.get(event.endpoint_id)
        if ep is None:
            return  # it left this replica meanwhile: its new replica reads the database
        match event:
            case Refill(ids=ids):
                await self._offer_stored(ep, ids)
            case Offered(tasks=tasks):
                await self._offer_carried(ep, tasks)
            case CancelOn(ids=ids):
                await self._cancel_on(ep, ids)
            case Forward(frame=frame):
                await send_or_drop(ep, frame)
            case StartUser(user_endpoint_id=user_endpoint_id):
                await self._start_user_endpoint(user_endpoint_id)
            case Close(code=code, reason=reason):
                await self._disconnect_here(event.endpoint_id, code, reason)
            case Takeover(replica=replica):  # it connected to another replica: this connection is stale
                log.info("endpoint %s connected to replica %s; dropping its connection here", event.endpoint_id,
                         replica)
                del self.endpoints[event.endpoint_id]
                await self.bus.unbind(endpoint_key(event.endpoint_id))
                await close_quietly(ep, CLOSE_TRY_AGAIN, "this endpoint connected to another replica")

    async def _offer_to_held(self, tasks: list[OwnedTask]) -> None:
        """Tasks another replica sent here for the endpoints it read were held here: offered to
        those that are; the others moved meanwhile, and are sent on to whoever holds them now."""
        per_endpoint: dict[str, list[OwnedTask]] = defaultdict(list)
        for item in tasks:
            per_endpoint[item.task.endpoint].append(item)
        await self._to_holders(per_endpoint, self._offer_carried,
                               lambda eid, items: Offered(endpoint_id=eid, tasks=items))

    async def _to_holders(self, per_endpoint: dict[str, list[Any]],
                          here: Callable[[EndpointSession, list[Any]], Awaitable[None]],
                          news: Callable[[str, list[Any]], EndpointEvent]) -> None:
        """Each endpoint's share: acted on here if the endpoint is held here, else published as
        news for the replica that holds it (dropped by the broker if none does)."""
        for endpoint_id, items in per_endpoint.items():
            ep = self.endpoints.get(endpoint_id)
            if ep is not None:
                await here(ep, items)
            else:
                await self._tell_endpoint(news(endpoint_id, items))

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
