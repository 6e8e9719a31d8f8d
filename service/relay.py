"""The relay: moves tasks from clients to endpoints and results back, storing each step first.

Transport-free on purpose: a session is anything with ``async send(bytes)``, so the WebSocket
routes stay thin and the durable lifecycle lives in one place:

* a task is stored before its submission is acknowledged;
* the endpoint acknowledges receipt (``dispatched``) and start (``running``);
* a result is stored before the endpoint is told to drop it from its spool;
* on (re)connection an endpoint is sent every open task it does not already hold, so tasks
  that were in the hands of an endpoint that died run again (at-least-once execution);
* a result for a task that already has one is dropped (exactly-once results per task id).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any, Protocol

from tether.protocol import TERMINAL_STATES, Msg, ProtocolError, TaskState, encode, require

from .store import Store

log = logging.getLogger("tether.service.relay")

DISPATCH_CHUNK = 1000
STATUS_WINDOW = 0.005  # seconds a client's state updates are gathered before they are sent


class Sender(Protocol):
    async def send(self, frame: bytes) -> None: ...


class ClientSession:
    """One connected client process of one user.

    State updates and results for it are buffered and sent once per event-loop iteration, as
    at most one STATUS and one RESULT frame: under load, many endpoint frames collapse into a
    few client frames (each frame is a syscall; syscalls, not Python, bound throughput here).
    """

    def __init__(self, sender: Sender, user_id: str):
        self.sender = sender
        self.user_id = user_id
        self.watching: set[str] = set()
        self._updates: list[Any] = []
        self._results: list[Any] = []
        self._scheduled = False

    async def send(self, frame: bytes) -> None:
        await self.sender.send(frame)

    def push(self, key: str, items: list[Any]) -> None:
        if key == "updates":
            # state changes are not worth a frame each: gathered for STATUS_WINDOW
            if not self._updates:
                asyncio.get_running_loop().call_later(STATUS_WINDOW, self._flush_updates)
            self._updates.extend(items)
            return
        self._results.extend(items)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_results)

    def _flush_updates(self) -> None:
        if self._updates:
            updates, self._updates = self._updates, []
            asyncio.ensure_future(_safe_send(self, encode(Msg.STATUS, updates=updates)))

    def _flush_results(self) -> None:
        self._scheduled = False
        if self._results:
            asyncio.ensure_future(self.send_results_now())

    async def send_results_now(self) -> None:
        """Send buffered results in this coroutine (the scheduled flush then finds nothing)."""
        if self._results:
            results, self._results = self._results, []
            await _safe_send(self, encode(Msg.RESULT, results=results))


class EndpointSession:
    """One connected endpoint process."""

    def __init__(self, sender: Sender, endpoint: dict[str, Any]):
        self.sender = sender
        self.endpoint_id: str = endpoint["id"]
        self.owner_id: str = endpoint["owner_id"]
        self.sent_functions: set[str] = set()
        self.status: dict[str, Any] = {}
        self.connected_at = time.time()

    async def send(self, frame: bytes) -> None:
        await self.sender.send(frame)


class Relay:
    def __init__(self, store: Store, max_payload: int):
        self.store = store
        self.max_payload = max_payload
        self.endpoints: dict[str, EndpointSession] = {}
        self.watchers: dict[str, set[ClientSession]] = defaultdict(set)
        self.counters: dict[str, int] = defaultdict(int)
        # State changes that are not worth a commit each (a lost one is re-derived: the task is
        # re-dispatched, or its result carries the times): written in bulk by flush_deferred().
        self._deferred: dict[TaskState, dict[str, float]] = {TaskState.DISPATCHED: {}, TaskState.RUNNING: {}}
        self._deferred_collected: dict[str, list[str]] = defaultdict(list)

    def flush_deferred(self) -> None:
        """Write deferred state changes and collection marks (one transaction per kind)."""
        for state, stamps in self._deferred.items():
            if stamps:
                self._deferred[state] = {}
                self.store.set_state(stamps.items(), state)
        if self._deferred_collected:
            pending, self._deferred_collected = self._deferred_collected, defaultdict(list)
            for user_id, ids in pending.items():
                self.store.mark_collected(user_id, ids)

    async def flush_loop(self, interval: float = 0.2) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                self.flush_deferred()
            except Exception:  # noqa: BLE001 - a failed flush is retried by the next state change
                log.exception("writing deferred task states failed")

    # --- helpers -------------------------------------------------------------------------------
    def online(self, endpoint_id: str) -> bool:
        return endpoint_id in self.endpoints

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
        self._fan_out({tid: [tid, state.value, ts] for tid in ids}, "updates")

    def _push_results(self, results: list[dict[str, Any]]) -> set[ClientSession]:
        return self._fan_out(
            {r["id"]: {k: r.get(k) for k in ("id", "state", "data", "error", "times")} for r in results},
            "results",
            drop=True,
        )

    # --- clients -------------------------------------------------------------------------------
    def client_disconnected(self, session: ClientSession) -> None:
        for tid in session.watching:
            group = self.watchers.get(tid)
            if group is not None:
                group.discard(session)
                if not group:
                    del self.watchers[tid]
        session.watching.clear()

    def validate_submission(
        self, user_id: str, batch: list[Any], functions: dict[str, bytes]
    ) -> tuple[list[dict[str, Any]], dict[str, str]]:
        """Split a submitted batch into tasks to accept and {task_id: reason} to reject."""
        accepted: list[dict[str, Any]] = []
        rejected: dict[str, str] = {}
        endpoint_ok: dict[str, str | None] = {}
        for task in batch:
            if not isinstance(task, dict) or not isinstance(task.get("id"), str):
                raise ProtocolError("every task must be a map with a string 'id'")
            tid = task["id"]
            ep = task.get("endpoint")
            if not isinstance(ep, str) or not isinstance(task.get("function"), str):
                rejected[tid] = "task needs string fields 'endpoint' and 'function'"
                continue
            if not isinstance(task.get("payload"), bytes):
                rejected[tid] = "task payload must be bytes (serialized arguments)"
                continue
            if ep not in endpoint_ok:
                endpoint_ok[ep] = self._endpoint_problem(user_id, ep)
            if endpoint_ok[ep]:
                rejected[tid] = endpoint_ok[ep]  # type: ignore[assignment]
                continue
            if len(task["payload"]) > self.max_payload:
                rejected[tid] = (
                    f"arguments are {len(task['payload'])} bytes, over this service's limit of "
                    f"{self.max_payload} bytes (PayloadTooLarge)"
                )
                continue
            fid = task["function"]
            if fid not in functions and self.store.get_function(user_id, fid) is None:
                rejected[tid] = f"function {fid} is not registered; submit it with its body first (UnknownFunction)"
                continue
            accepted.append(task)
        return accepted, rejected

    def _endpoint_brief(self, endpoint_id: str) -> dict[str, Any]:
        """Online state and Python version, so the client can warn of a mismatch before any task runs."""
        session = self.endpoints.get(endpoint_id)
        if session is not None:
            status = session.status
        else:
            ep = self.store.get_endpoint(endpoint_id)
            status = _loads(ep["status"]) if ep and ep.get("status") else {}
        return {"online": session is not None, "python": (status.get("versions") or {}).get("python")}

    def _endpoint_problem(self, user_id: str, endpoint_id: str) -> str | None:
        session = self.endpoints.get(endpoint_id)
        owner = session.owner_id if session else None
        if owner is None:
            ep = self.store.get_endpoint(endpoint_id)
            owner = ep["owner_id"] if ep else None
        if owner is None or owner != user_id:
            return f"unknown endpoint {endpoint_id}: no endpoint with this id is visible to you (UnknownEndpoint)"
        return None

    async def submit(self, session: ClientSession | None, user_id: str, msg: dict[str, Any]) -> dict[str, Any]:
        """Store, acknowledge and dispatch a batch of tasks; returns the acknowledgement fields."""
        batch = require(msg, "tasks", list)
        functions = msg.get("functions") or {}
        if not isinstance(functions, dict) or not all(isinstance(b, bytes) for b in functions.values()):
            raise ProtocolError("'functions' must map function ids to serialized bodies (bytes)")
        received = time.time()
        self.counters["submit_frames"] += 1
        accepted, rejected = self.validate_submission(user_id, batch, functions)
        self.store.add_functions(user_id, functions)
        if session is not None:
            self.watch(session, (t["id"] for t in accepted))
        by_endpoint: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for t in accepted:
            t["owner"] = user_id
            by_endpoint[t["endpoint"]].append(t)
        if accepted:  # stored before anything else sees it: a result can never overtake its task
            self.store.insert_tasks(user_id, accepted, received)
            self.counters["submitted"] += len(accepted)
        for endpoint_id, items in by_endpoint.items():
            ep = self.endpoints.get(endpoint_id)
            if ep is not None:
                await self._dispatch(ep, items)
        ack = {"accepted": [t["id"] for t in accepted], "rejected": rejected, "ts": received,
               "endpoints": {eid: self._endpoint_brief(eid) for eid in by_endpoint}}
        if session is not None:
            await _safe_send(session, encode(Msg.SUBMIT_ACK, ref=msg.get("ref"), **ack))
        return ack

    async def subscribe(self, session: ClientSession, ids: list[str]) -> None:
        """Watch tasks (e.g. a reloaded task group); current state or result is sent at once."""
        self.flush_deferred()
        rows = self.store.get_tasks(session.user_id, ids) if ids else []
        known = {r.id for r in rows}
        unknown = [i for i in ids if i not in known]
        if unknown:
            await _safe_send(
                session,
                encode(Msg.ERROR, message="unknown task ids (never submitted by you, or purged)", ids=unknown),
            )
        results, updates = [], []
        self.watch(session, known)
        for r in rows:
            if r.state in TERMINAL_STATES:
                results.append(row_to_result(r))
            else:
                ts = r.t_running or r.t_dispatched or r.t_waiting or r.t_received
                updates.append([r.id, r.state, ts])
        if updates:
            await _safe_send(session, encode(Msg.STATUS, updates=updates))
        if results:
            self._push_results(results)

    async def cancel(self, user_id: str, ids: list[str]) -> list[str]:
        rows = self.store.cancel(user_id, ids)
        if not rows:
            return []
        now = time.time()
        err = {"type": "TaskCancelled", "message": "cancelled by its owner", "traceback": ""}
        self._push_results(
            [{"id": r.id, "state": TaskState.CANCELLED.value, "data": None, "error": err, "times": {"cancelled": now}}
             for r in rows]
        )
        per_endpoint: dict[str, list[str]] = defaultdict(list)
        for r in rows:
            if r.state != TaskState.WAITING.value or r.endpoint_id in self.endpoints:
                per_endpoint[r.endpoint_id].append(r.id)
        for endpoint_id, tids in per_endpoint.items():
            ep = self.endpoints.get(endpoint_id)
            if ep is not None:
                await _safe_send(ep, encode(Msg.CANCEL, ids=tids))
        self.counters["cancelled"] += len(rows)
        return [r.id for r in rows]

    def collected(self, user_id: str, ids: list[str]) -> None:
        self._deferred_collected[user_id].extend(ids)

    # --- endpoints -----------------------------------------------------------------------------
    async def endpoint_connected(self, session: EndpointSession, hello: dict[str, Any]) -> None:
        old = self.endpoints.get(session.endpoint_id)
        self.endpoints[session.endpoint_id] = session
        if old is not None and old is not session:
            log.info("endpoint %s reconnected; dropping its previous connection", session.endpoint_id)
        session.status = {"versions": hello.get("versions") or {}, "capacity": hello.get("capacity") or {}}
        self.store.save_endpoint_status(session.endpoint_id, {**session.status, "online": True})
        held = set(hello.get("inflight") or []) | set(hello.get("spooled") or [])
        rows = self.store.open_tasks_for_endpoint(session.endpoint_id, exclude=held)
        if rows:
            log.info("endpoint %s: dispatching %d open tasks", session.endpoint_id, len(rows))
            items = [
                {
                    "id": r.id,
                    "function": r.function_id,
                    "payload": r.payload,
                    "spec": _loads(r.spec),
                    "uec": _loads(r.uec),
                    "group": r.group_id,
                    "owner": r.owner_id,
                }
                for r in rows
            ]
            await self._dispatch(session, items)

    def endpoint_disconnected(self, session: EndpointSession) -> None:
        if self.endpoints.get(session.endpoint_id) is session:
            del self.endpoints[session.endpoint_id]
            self.store.save_endpoint_status(session.endpoint_id, {**session.status, "online": False})

    async def _dispatch(self, ep: EndpointSession, items: list[dict[str, Any]]) -> None:
        for start in range(0, len(items), DISPATCH_CHUNK):
            chunk = items[start : start + DISPATCH_CHUNK]
            bodies: dict[str, bytes] = {}
            out = []
            for t in chunk:
                fid = t["function"]
                if fid not in ep.sent_functions and fid not in bodies:
                    body = self.store.get_function(t["owner"], fid)
                    if body is not None:
                        bodies[fid] = body
                out.append({"id": t["id"], "function": fid, "payload": t["payload"], "spec": t.get("spec"),
                            "uec": t.get("uec")})
            ep.sent_functions.update(bodies)
            await _safe_send(ep, encode(Msg.TASKS, tasks=out, functions=bodies))

    async def endpoint_message(self, session: EndpointSession, msg: dict[str, Any]) -> None:
        kind = msg["t"]
        if kind == Msg.RECEIVED:
            ids = require(msg, "ids", list)
            ts = msg.get("ts") or time.time()
            self._deferred[TaskState.DISPATCHED].update(dict.fromkeys(ids, ts))
            self._push_status(ids, TaskState.DISPATCHED, ts)
        elif kind == Msg.RUNNING:
            ids = require(msg, "ids", list)
            ts = msg.get("ts") or time.time()
            self._deferred[TaskState.RUNNING].update(dict.fromkeys(ids, ts))
            self._push_status(ids, TaskState.RUNNING, ts)
        elif kind == Msg.RESULT:
            results = require(msg, "results", list)
            self.counters["result_frames"] += 1
            for r in results:  # the result's row carries the times not yet written
                times = r.setdefault("times", {})
                for state, stamps in self._deferred.items():
                    ts = stamps.pop(r["id"], None)
                    if ts is not None:
                        times.setdefault(state.value, ts)
            # Push first, store second, acknowledge third: the client has its result a commit
            # sooner, and the endpoint keeps it spooled until it is stored.
            fresh = self.store.claim_results(results)
            for client in self._push_results(fresh):
                await client.send_results_now()
            try:
                self.store.write_results(fresh)
            except Exception:
                self.store.unclaim(fresh)  # not acknowledged: the endpoint sends them again
                raise
            await _safe_send(session, encode(Msg.RESULT_ACK, ids=[r["id"] for r in results]))
            self.counters["results"] += len(fresh)
            self.counters["failed"] += sum(r["state"] == TaskState.FAILED.value for r in fresh)
        elif kind == Msg.HEARTBEAT:
            session.status = {
                "versions": msg.get("versions") or session.status.get("versions", {}),
                "capacity": msg.get("capacity") or {},
            }
            self.store.save_endpoint_status(session.endpoint_id, {**session.status, "online": True})
        else:
            raise ProtocolError(f"'{kind}' is not a message an endpoint may send")

    async def stop_endpoint(self, endpoint_id: str) -> bool:
        ep = self.endpoints.get(endpoint_id)
        if ep is None:
            return False
        await _safe_send(ep, encode(Msg.STOP))
        return True


def _loads(text: str | None) -> Any:
    import json

    return json.loads(text) if text else None


def row_to_result(row: Any) -> dict[str, Any]:
    """A stored task row as a RESULT record."""
    import json

    from .store import transitions

    return {
        "id": row.id,
        "state": row.state,
        "data": row.result,
        "error": json.loads(row.error) if row.error else None,
        "times": transitions(row),
    }


async def _safe_send(session: Any, frame: bytes) -> None:
    """Send, tolerating a peer that went away: its state is durable, it will catch up on reconnect."""
    try:
        await session.send(frame)
    except Exception as exc:  # noqa: BLE001 - any transport error means the peer is gone
        log.debug("send to %r failed: %s", session, exc)


__all__ = ["Relay", "ClientSession", "EndpointSession", "row_to_result"]
