"""Who hears what: the client sessions of this replica, the tasks each watches, and the news
pushed to them (state changes, results), here and, through the bus, on other replicas.

The first layer of the relay (see ``relay.py``): every other part of it tells clients what
happened to their tasks through here, and publishes what this replica cannot do itself as a
typed event (:mod:`tether.service.replica_events`) for the replica that can.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from tether.protocol import MAX_IDS, TERMINAL_STATES, Result, Status, TaskState, encode

from .async_store import AsyncStore
from .bus import LocalBus, RabbitBus
from .replica_events import EndpointEvent, ResultsStored, StatusChanged, user_key
from .sessions import ClientSession, send_or_drop
from .store import row_to_result


class Subscriptions:
    """Client sessions, the tasks they watch, and the news for them.

    With a broker (``bus`` a :class:`~tether.service.bus.RabbitBus`), ``replicated`` is true:
    an endpoint or client may be connected to another replica, so what cannot be done here is
    published as an event for the replica that can.
    """

    def __init__(self, db: AsyncStore, bus: LocalBus | RabbitBus | None = None):
        self.db = db
        self.bus = bus or LocalBus()
        self.replicated = self.bus.remote
        #: with several replicas: the URL at which clients reach this replica itself, written in the
        #: rows of the endpoints held here and told to clients with them (see _endpoint_brief)
        self.advertise_url: str | None = None
        self.clients: set[ClientSession] = set()
        self.watchers: dict[str, set[ClientSession]] = defaultdict(set)
        self._user_sessions: dict[str, int] = defaultdict(int)  # connected client sessions per user
        self.counters: dict[str, int] = defaultdict(int)

    # --- news for other replicas ------------------------------------------------------------
    async def _tell_endpoint(self, event: EndpointEvent) -> None:
        """News for an endpoint connected to another replica (dropped by the broker if none holds it)."""
        if self.replicated:
            await self.bus.publish(event)

    async def _tell_results(self, user_id: str, ids: list[str]) -> None:
        """Results of a user's tasks were stored: news for their client sessions on other replicas."""
        if self.replicated and ids:
            for start in range(0, len(ids), MAX_IDS):
                await self.bus.publish(ResultsStored(user_id=user_id, ids=ids[start : start + MAX_IDS]))

    async def _tell_states(self, user_id: str, updates: list[tuple[str, str, float]]) -> None:
        """A user's tasks changed state: news for their client sessions on other replicas."""
        if self.replicated and updates:
            for start in range(0, len(updates), MAX_IDS):
                await self.bus.publish(StatusChanged(user_id=user_id, updates=updates[start : start + MAX_IDS]))

    # --- sessions ---------------------------------------------------------------------------
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

    def watch(self, session: ClientSession, ids: Iterable[str]) -> None:
        for tid in ids:
            self.watchers[tid].add(session)
            session.watching.add(tid)

    # --- pushes -----------------------------------------------------------------------------
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

    async def _push_stored(self, user_id: str, ids: list[str]) -> None:
        """Push the stored results among ``ids`` to the sessions here that wait for them."""
        watched = [tid for tid in ids if tid in self.watchers]
        if watched:
            rows = await self.db.get_tasks(user_id, watched)
            self._push_results([row_to_result(r) for r in rows if r.state in TERMINAL_STATES])

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
