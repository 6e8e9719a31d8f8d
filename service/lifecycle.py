"""An endpoint's connection from hello to goodbye: what it holds when it connects, where its
tasks stand when it leaves, whether it is online (here, or on another replica), the user
endpoints a multi-user endpoint starts, and stopping or deleting it.

The layer of the relay above dispatch (see ``relay.py``): it decides which frames of a connected
endpoint go where, and reconciles its state with the store at the edges of its connection, so
that tasks in the hands of an endpoint that died run again when it is back (at-least-once
execution) and tasks that ended meanwhile never run there.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from tether.protocol import (
    CLOSE_AUTH_FAILED,
    CLOSE_CREDENTIAL_ROTATED,
    DEFAULT_PREFETCH,
    MAX_IDS,
    Cancel,
    ErrorCode,
    ErrorInfo,
    Fetch,
    Fetched,
    Heartbeat,
    Hello,
    Identity,
    Received,
    Result,
    Results,
    Running,
    StartUserEndpoint,
    Stop,
    TaskState,
    UserEndpointFailed,
    UserEndpointStarted,
    encode,
)

from .async_store import AsyncStore
from .bus import LocalBus, RabbitBus
from .dispatch import Dispatch
from .endpoint_rows import EndpointRows
from .replica_events import Close, Forward, StartUser, Takeover, endpoint_key
from .sessions import EndpointSession, close_quietly, send_or_drop
from .store import json_or_none

log = logging.getLogger("tether.service.relay")

#: ids of a reconnecting endpoint's hello looked up at a time (SQLite answers on the event loop)
WITHDRAW_SLICE = 1000
START_RETRY_S = 30.0  # a user endpoint asked for and not connected by then is asked for again
#: with several replicas: an endpoint whose last report (to any replica) is older is offline
PRESENCE_S = 30.0


class EndpointLifecycle(Dispatch):
    """Connected endpoints: their frames, their presence, their user endpoints, their end."""

    def __init__(self, db: AsyncStore, bus: LocalBus | RabbitBus | None = None, prefetch: int = DEFAULT_PREFETCH):
        super().__init__(db, bus, prefetch)
        self._start_requested: dict[str, float] = {}  # user endpoint id -> when its start was asked for
        #: with several replicas: rows of endpoints held elsewhere, read once a second at most (endpoint_rows.py)
        self.endpoint_rows = EndpointRows(db)
        self.fetches.wake = self._wake_user_endpoint

    async def endpoint_message(self, session: EndpointSession, msg: Any) -> None:
        """Act on one (already validated) endpoint frame; only its own tasks are touched."""
        if isinstance(msg, Received | Running):
            await self._state_report(session, msg)
        elif isinstance(msg, Results):
            await self._store_results(session, msg.results)
        elif isinstance(msg, UserEndpointStarted | UserEndpointFailed):
            await self._user_endpoint_report(session, msg)
        elif isinstance(msg, Fetch):
            await self.fetches.from_endpoint(session, msg.ids)
        elif isinstance(msg, Fetched):
            await self.fetches.uploaded(session, msg)
        elif isinstance(msg, Heartbeat):
            session.status = {"versions": msg.versions or session.status.get("versions", {}),
                              "capacity": msg.capacity}
            session.set_capacity(msg.capacity)
            await self._save_presence(session, online=True)
            if session.backlog or session.queue:
                await self._refill(session)

    def is_online(self, row: dict[str, Any]) -> bool:
        """Whether an endpoint (its row) is connected: to this process, or, with several
        replicas, to one that heard from it within PRESENCE_S."""
        if row["id"] in self.endpoints:
            return True
        if not self.replicated or row.get("deleted_at") is not None:
            return False
        status = json_or_none(row.get("status")) or {}
        return bool(status.get("online")) and (row.get("last_seen") or 0) > time.time() - PRESENCE_S

    # --- connection ----------------------------------------------------------------------------
    async def endpoint_connected(self, session: EndpointSession, hello: Hello) -> None:
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
        await self._tell_endpoint(Takeover(endpoint_id=session.endpoint_id, replica=self.bus.replica_id))
        await self._save_presence(session, online=True)
        self._start_requested.pop(session.endpoint_id, None)
        await self.fetches.endpoint_connected(session)
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
            mine.update((await self._dispatched_to(session.endpoint_id, held[start : start + WITHDRAW_SLICE]))[0])
            await asyncio.sleep(0)
        ended = [tid for tid in held if tid not in mine]
        if mine:
            now = time.time()
            await self.db.redispatch([(tid, now) for tid in mine])
            self._push_status(mine, TaskState.DISPATCHED, now)
            await self._tell_states(session.owner_id, [(tid, TaskState.DISPATCHED.value, now) for tid in mine])
        if ended:
            session.sent.difference_update(ended)
            self.counters["withdrawn_on_reconnect"] += len(ended)
            log.info("endpoint %s holds %d task(s) that ended while it was away; withdrawing them",
                     session.endpoint_id, len(ended))
            for start in range(0, len(ended), MAX_IDS):
                await send_or_drop(session, encode(Cancel(ids=ended[start : start + MAX_IDS])))

    async def endpoint_disconnected(self, session: EndpointSession) -> None:
        """The endpoint's tasks wait for it again, and it shows offline, unless it reconnected
        meanwhile: here (a newer session, possibly while this one's teardown awaited the bus or
        the store; its connect wrote its presence and dispatched what it holds, which must not be
        undone) or to another replica (its row names that one)."""
        eid = session.endpoint_id
        if self.endpoints.get(eid) is not session:
            return
        del self.endpoints[eid]
        await self.bus.unbind(endpoint_key(eid))
        ep = await self.db.get_endpoint(eid)
        if ep is None or ep["deleted_at"] is not None or eid in self.endpoints:
            return
        holder = (json_or_none(ep["status"]) or {}).get("replica")
        if holder not in (None, self.bus.replica_id):
            return
        await self._save_presence(session, online=False)
        newer = self.endpoints.get(eid)
        if newer is not None:  # it came back while that was written: online it is
            await self._save_presence(newer, online=True)
            return
        await self._wait_again(session)

    async def _wait_again(self, session: EndpointSession) -> None:
        """The tasks a departed endpoint held wait for it again, and say so (in the store and to
        their watchers) until it is back: they are dispatched again then."""
        held = self.routes.held_by(session.endpoint_id, session.sent)[: session.window]
        if not held:
            return
        for state in (TaskState.DISPATCHED, TaskState.RUNNING):  # a later flush must not move them back
            for tid in held:
                self._deferred[state].pop(tid, None)
        now = time.time()
        await self.db.set_state([(tid, now) for tid in held], TaskState.WAITING)
        self._push_status(held, TaskState.WAITING, now)
        await self._tell_states(session.owner_id, [(tid, TaskState.WAITING.value, now) for tid in held])

    async def _save_presence(self, session: EndpointSession, online: bool) -> None:
        """Write an endpoint's status (capacity, versions, online, which replica holds it)."""
        await self.db.save_endpoint_status(session.endpoint_id, {**session.status, "online": online,
                                                                 "replica": self.bus.replica_id,
                                                                 "replica_url": self.advertise_url})

    # --- user endpoints ------------------------------------------------------------------------
    async def _wake_user_endpoint(self, endpoint_id: str) -> bool:
        """Start a user endpoint that stopped (someone wants a result it keeps); False if
        ``endpoint_id`` is no user endpoint."""
        child = await self.db.get_endpoint(endpoint_id)
        if child is None or child["parent_id"] is None:
            return False
        await self._start_user_endpoint(endpoint_id)
        return True

    async def _start_user_endpoint(self, user_endpoint_id: str, force: bool = False) -> None:
        """Ask the multi-user endpoint to start a user endpoint, with a fresh credential for it
        (once per START_RETRY_S; if the parent is offline, when it connects)."""
        child = await self.db.get_endpoint(user_endpoint_id)
        if child is None or child["parent_id"] is None or self.is_online(child):
            return
        parent = self.endpoints.get(child["parent_id"])
        if parent is None:  # the parent may be connected to another replica: it asks there
            await self._tell_endpoint(StartUser(endpoint_id=child["parent_id"], user_endpoint_id=user_endpoint_id))
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

    async def _user_endpoint_report(self, session: EndpointSession,
                                    msg: UserEndpointStarted | UserEndpointFailed) -> None:
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
        rows = await self._fail_open_tasks(msg.user_endpoint_id, error)
        await self._announce_failed_tasks(rows, error)

    # --- the end -------------------------------------------------------------------------------
    async def _fail_open_tasks(self, endpoint_id: str, error: dict[str, Any]) -> list[Any]:
        """Fail every open task of an endpoint (stored at once; announce them once the endpoint
        is dealt with); returns the rows (id, owner_id)."""
        rows = await self.db.fail_open_tasks(endpoint_id, error)
        self.routes.forget(r.id for r in rows)
        return rows

    async def _announce_failed_tasks(self, rows: Sequence[Any], error: dict[str, Any]) -> None:
        """Push the failure of tasks the service ended itself (rows: id, owner_id), here and on
        other replicas."""
        info = ErrorInfo(type=error["type"], message=error["message"], code=error["code"])
        now = time.time()
        self._push_results(Result(id=r.id, state="failed", error=info, times={"failed": now}) for r in rows)
        per_owner: dict[str, list[str]] = defaultdict(list)
        for r in rows:
            per_owner[r.owner_id].append(r.id)
        for owner, ids in per_owner.items():
            await self._tell_results(owner, ids)

    async def stop_endpoint(self, endpoint_id: str) -> bool:
        """Ask an endpoint to stop; False if it is not connected (to any replica)."""
        ep = self.endpoints.get(endpoint_id)
        if ep is not None:
            await send_or_drop(ep, encode(Stop()))
            return True
        row = await self.db.get_endpoint(endpoint_id) if self.replicated else None
        if row is None or not self.is_online(row):
            return False
        await self._tell_endpoint(Forward(endpoint_id=endpoint_id, frame=encode(Stop())))
        return True

    async def disconnect_endpoint(self, endpoint_id: str, code: int, reason: str) -> None:
        """Close an endpoint's connection, on whichever replica holds it (its row changed: this
        replica's copy of it is dropped; the others' age out, see endpoint_rows.py)."""
        self.endpoint_rows.forget(endpoint_id)
        await self._disconnect_here(endpoint_id, code, reason)
        await self._tell_endpoint(Close(endpoint_id=endpoint_id, code=code, reason=reason))

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
        self.routes.forget(r.id for r in rows)
        await self.disconnect_endpoint(endpoint_id, CLOSE_AUTH_FAILED, "this endpoint was deleted by its owner")
        await self._announce_failed_tasks(rows, error)
        return len(rows)
