"""Durable service state, through SQLAlchemy Core: the tasks, and :class:`Store`, the whole of it.

``Store`` is what the service opens: the tasks' queries are here (the path every task takes:
insert, dispatch, results, cancels, retention), users, endpoints and function bodies are its
base :class:`~tether.service.registry.Registry`, the engine and transactions
:class:`~tether.service.database.Database`, the tables :mod:`tether.service.tables`. Every
method is one transaction, so one WebSocket frame (a batch of tasks or results) costs one
commit: that is what keeps the durable path fast.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import (
    and_,
    bindparam,
    delete,
    exists,
    func,
    or_,
    select,
    tuple_,
    update,
)

from tether.protocol import ErrorInfo, Result, TaskState, kept_ref_of

from . import store_sqlite
from .database import chunks
from .registry import Registry
from .tables import endpoints, task_inputs, tasks

log = logging.getLogger("tether.service.store")



#: A task is open (has no result yet) while t_done is NULL: every terminal write sets t_done. One
#: definition everywhere, and unlike a state IN (...) list it also works in executemany statements.
_OPEN = tasks.c.t_done.is_(None)
_TIME_COLUMN = {
    TaskState.RECEIVED: "t_received",
    TaskState.WAITING: "t_waiting",
    TaskState.DISPATCHED: "t_dispatched",
    TaskState.RUNNING: "t_running",
    TaskState.SUCCESS: "t_done",
    TaskState.FAILED: "t_done",
    TaskState.CANCELLED: "t_done",
}


def _owned_by(owner: Any) -> Any:
    """``owner_id = owner`` as a check on rows found by id. Written so that no planner uses the
    owner index for it: SQLite did, with bound ``id IN (...)`` lists, and scanned every task of
    the owner (a million-task backlog made each collection mark take a second)."""
    return func.coalesce(tasks.c.owner_id, "") == owner


def on_endpoint(endpoint_id: Any) -> Any:
    """``endpoint_id = endpoint_id`` as a check on tasks reached through another index (an
    input's or a blob's), written so that no planner starts from the endpoint's open tasks:
    SQLite, without statistics, did, and read every open task of the endpoint (a backlog of
    100,000) to answer a question about one input or one blob."""
    return func.coalesce(tasks.c.endpoint_id, "") == endpoint_id


# Statements of the task path, built once: SQLAlchemy then finds their compiled form without
# building the expression and its cache key again for every frame (that was most of the
# service's time per frame). ``ids`` are expanding IN lists, padded by _chunks.
_IDS = bindparam("ids", expanding=True)
_LOCK_OPEN_AMONG = select(tasks.c.id).where(and_(tasks.c.id.in_(_IDS), _OPEN)).order_by(tasks.c.id).with_for_update()
_STORE_RESULT = (
    update(tasks)
    .where(and_(tasks.c.id == bindparam("b_id"), _OPEN))
    .values(
        state=bindparam("b_state"),
        result=bindparam("b_result"),
        error=bindparam("b_error"),
        t_dispatched=func.coalesce(bindparam("b_dispatched"), tasks.c.t_dispatched),
        t_running=func.coalesce(bindparam("b_running"), tasks.c.t_running),
        t_done=bindparam("b_done"),
        payload=None,  # the arguments are not needed once a result exists
    )
)
#: _STORE_RESULT's parameters, in the order write_results builds them (store_sqlite's order)
_RESULT_KEYS = ("b_state", "b_result", "b_error", "b_dispatched", "b_running", "b_done", "b_id")
_SET_STATE = {
    state: update(tasks).where(and_(tasks.c.id == bindparam("b_id"), _OPEN))
    .values({"state": state.value, _TIME_COLUMN[state]: bindparam("b_ts")})
    for state in (TaskState.WAITING, TaskState.DISPATCHED, TaskState.RUNNING)
}
#: dispatched again: only tasks marked waiting (an endpoint that reconnects holding them)
_REDISPATCH = (update(tasks).where(and_(tasks.c.id == bindparam("b_id"), tasks.c.state == TaskState.WAITING.value))
               .values(state=TaskState.DISPATCHED.value, t_dispatched=bindparam("b_ts")))
_LOAD_OPEN = select(tasks.c.id, tasks.c.owner_id, tasks.c.endpoint_id, tasks.c.function_id, tasks.c.payload,
                    tasks.c.spec, tasks.c.uec, tasks.c.group_id, tasks.c.inputs, tasks.c.keep_over
                    ).where(and_(tasks.c.id.in_(_IDS), _OPEN))
_MARK_COLLECTED = (
    update(tasks)
    .where(and_(tasks.c.id.in_(_IDS), _owned_by(bindparam("owner")), tasks.c.collected_at.is_(None)))
    .values(collected_at=bindparam("now"))
)
_COUNT_OPEN = select(func.count()).select_from(tasks).where(and_(tasks.c.owner_id == bindparam("owner"), _OPEN))



def transitions(row: Any) -> dict[str, float]:
    """The timestamps of a task row, keyed by state name."""
    out = {}
    for state, col in _TIME_COLUMN.items():
        ts = row._mapping.get(col)
        if ts is not None and (col != "t_done" or row.state == state):
            out[state.value] = ts
    return out


def row_to_result(row: Any) -> Result:
    """A stored task row as a RESULT record."""
    error = None
    if row.error:
        e = json.loads(row.error)
        error = ErrorInfo(type=str(e.get("type", "")), message=str(e.get("message", "")),
                          traceback=str(e.get("traceback") or ""), code=e.get("code"))
    return Result(id=row.id, state=row.state, data=row.result, error=error, times=transitions(row))


def json_or_none(text: str | None) -> Any:
    """A JSON column's value (None for NULL or empty)."""
    return json.loads(text) if text else None


class Store(Registry):
    """All durable state. Methods are synchronous and short; the service calls them through
    :class:`tether.service.async_store.AsyncStore` (inline for SQLite, in a small thread pool
    for a database across the network, so a slow query never stalls the event loop).

    Every method is one transaction on its thread's connection (``_tx``), rolled back if
    anything in it fails: a bad request can fail only itself, never leave the connection in a
    broken transaction for everyone else.
    """

    def user_endpoints_with_open_tasks(self, parent_id: str) -> list[dict[str, Any]]:
        with self._tx() as conn:
            busy = select(tasks.c.endpoint_id).where(_OPEN).distinct()
            rows = conn.execute(select(endpoints).where(and_(endpoints.c.parent_id == parent_id,
                                                             endpoints.c.id.in_(busy)))).all()
        return [dict(r._mapping) for r in rows]

    def delete_endpoint(self, endpoint_id: str, error: dict[str, Any]) -> list[Any]:
        """Delete an endpoint and its user endpoints (kept as tombstones, their credentials void)
        and fail their open tasks with ``error``; returns the failed rows (id, owner_id)."""
        with self._tx() as conn:
            ids = [endpoint_id, *(r.id for r in conn.execute(
                select(endpoints.c.id).where(endpoints.c.parent_id == endpoint_id)))]
            conn.execute(update(endpoints).where(endpoints.c.id.in_(ids))
                         .values(deleted_at=time.time(), secret_hash="deleted", status=None))
        return [row for eid in ids for row in self.fail_open_tasks(eid, error)]

    def fail_open_tasks(self, endpoint_id: str, error: dict[str, Any]) -> list[Any]:
        """Fail every open task of an endpoint with ``error``; returns the rows (id, owner_id)."""
        with self._tx() as conn:
            rows = conn.execute(select(tasks.c.id, tasks.c.owner_id)
                                .where(and_(tasks.c.endpoint_id == endpoint_id, _OPEN))).all()
            conn.execute(update(tasks).where(and_(tasks.c.endpoint_id == endpoint_id, _OPEN))
                         .values(state=TaskState.FAILED.value, t_done=time.time(), payload=None,
                                 error=json.dumps(error)))
        return rows

    # --- tasks -------------------------------------------------------------------------------
    def insert_tasks(self, owner: str, batch: list[Any], now: float | None = None,
                     max_open: int | None = None) -> tuple[list[Any], list[str], list[str], list[str]]:
        """Store submitted tasks as waiting-for-endpoint, idempotently by task id.

        Returns (inserted tasks, ids the owner had already submitted, ids that belong to
        someone else, ids of tasks for endpoints deleted meanwhile). Only the first are new
        work; the second are a resubmission after a reconnect; the third and fourth are
        refused: an id is never merged into another owner's task, and no task is stored for a
        deleted endpoint (nothing would ever end it). The endpoints' rows are read and held
        (``FOR SHARE`` on PostgreSQL) in the same transaction, so a delete on another replica
        either commits first (these tasks are refused) or waits for this one (and then fails
        them): the caller may have checked the endpoint against a copy a second old.
        With ``max_open``, the owner's open tasks are counted under the owner's lock in the
        same transaction, and only the tasks that fit are inserted (the rest are none of the
        four: the caller refuses them): the quota holds however many replicas submit.
        """
        return self._insert_tasks(owner, batch, now or time.time(), max_open)

    def _insert_tasks(self, owner: str, batch: list[Any], now: float, max_open: int | None,
                      driver_ok: bool = True) -> tuple[list[Any], list[str], list[str], list[str]]:
        if not batch:
            return [], [], [], []
        submitted = batch
        waiting = TaskState.WAITING.value
        rows = [(t.id, owner, t.endpoint, t.function, t.group, waiting, t.payload,
                 json.dumps(t.spec) if t.spec else None, json.dumps(t.uec) if t.uec else None,
                 json.dumps(t.inputs) if t.inputs else None, t.keep, now, now, False) for t in batch]
        if driver_ok and max_open is None and self._driver_sql and not any(t.inputs for t in batch) \
                and self._insert_fresh_sqlite(batch, rows):
            return batch, [], [], []
        try:
            with self._tx() as conn:
                driver = self._sqlite_driver(conn) if driver_ok else None
                deleted: set[str] = set()
                for chunk in chunks(sorted({t.endpoint for t in batch})):  # sorted: locks always taken in one order
                    if driver is not None:
                        deleted |= store_sqlite.deleted_endpoints(driver, chunk)
                        continue
                    held = conn.execute(select(endpoints.c.id, endpoints.c.deleted_at)
                                        .where(endpoints.c.id.in_(chunk))
                                        .order_by(endpoints.c.id).with_for_update(read=True))
                    deleted.update(r.id for r in held if r.deleted_at is not None)
                refused = [t.id for t in batch if t.endpoint in deleted]  # unless stored before (below)
                if refused:
                    rows = [r for r, t in zip(rows, batch, strict=True) if t.endpoint not in deleted]
                    batch = [t for t in batch if t.endpoint not in deleted]
                if max_open is not None:
                    self.lock_owner(conn, owner, "tasks")
                    room = max(0, max_open - conn.execute(_COUNT_OPEN, {"owner": owner}).scalar_one())
                    batch, rows = batch[:room], rows[:room]
                if not rows:
                    inserted_ids: set[str] = set()
                elif driver is not None:
                    inserted_ids = store_sqlite.insert_tasks(driver, rows)
                else:
                    inserted_ids = {r.id for r in self._insert(
                        tasks, [dict(zip(store_sqlite.TASK_COLUMNS, r, strict=True)) for r in rows],
                        returning=tasks.c.id)}
                links = [{"task_id": t.id, "input_id": x} for t in batch if t.inputs and t.id in inserted_ids
                         for x in set(t.inputs)]
                if links:
                    self._insert(task_inputs, links)
                existing = [t.id for t in batch if t.id not in inserted_ids] + refused
                owners: dict[str, str] = {}
                for chunk in chunks(existing):
                    owners.update(store_sqlite.existing(driver, chunk) if driver is not None else
                                  conn.execute(select(tasks.c.id, tasks.c.owner_id).where(tasks.c.id.in_(chunk))).all())
        except store_sqlite.Raced:  # (rolled back) another writer meanwhile: the general way
            return self._insert_tasks(owner, submitted, now, max_open, driver_ok=False)
        inserted = [t for t in batch if t.id in inserted_ids]
        # a task for a deleted endpoint that was stored before (a resubmission) is answered as one
        gone = [tid for tid in refused if tid not in owners]
        mine = [tid for tid in existing if owners.get(tid) == owner]
        theirs = [tid for tid in existing if owners.get(tid) != owner and tid not in gone]
        return inserted, mine, theirs, gone

    def _insert_fresh_sqlite(self, batch: list[Any], rows: list[tuple[Any, ...]]) -> bool:
        """The common submission on SQLite (tasks never seen, endpoints not deleted, no quota
        count, no inputs to link): the deleted-endpoint check, one INSERT and the commit, on the
        driver, with no look for stored ids first. False (rolled back, nothing written) when
        any of that does not hold: the caller takes the general way, which tells each case apart."""
        with self._driver_tx() as db:
            if store_sqlite.deleted_endpoints(db, sorted({t.endpoint for t in batch})) \
                    or not store_sqlite.insert_all_fresh(db, rows):
                db.rollback()
                return False
        return True

    def set_state(self, stamps: Iterable[tuple[str, float]], state: TaskState) -> None:
        """Move open tasks to a non-terminal state at the given times (terminal tasks never move again)."""
        self._stamp(_SET_STATE[state], stamps)

    def redispatch(self, stamps: Iterable[tuple[str, float]]) -> None:
        """Tasks marked waiting when their endpoint left, and that it holds again on its return,
        are dispatched again at the given times (the others among them are left as they are)."""
        self._stamp(_REDISPATCH, stamps)

    def _stamp(self, statement: Any, stamps: Iterable[tuple[str, float]]) -> None:
        # rows are locked in id order, as write_results locks them: two writers never wait on
        # each other in a cycle (PostgreSQL reported deadlocks between the two before)
        params = sorted(({"b_id": i, "b_ts": ts} for i, ts in stamps), key=lambda p: p["b_id"])
        if not params:
            return
        with self._tx() as conn:
            conn.execute(statement, params)

    def open_task_endpoints(self, ids: Sequence[str]) -> dict[str, tuple[str, bool]]:
        """{id: (endpoint id, open?)} for the tasks among ``ids`` that exist: what the relay asks
        about reports on tasks it does not remember dispatching (see ``service/routing.py``)."""
        found: dict[str, tuple[str, bool]] = {}
        with self._tx() as conn:
            for chunk in chunks(ids):
                for r in conn.execute(select(tasks.c.id, tasks.c.endpoint_id, tasks.c.t_done)
                                      .where(tasks.c.id.in_(chunk))):
                    found[r.id] = (r.endpoint_id, r.t_done is None)
        return found

    def open_task_owner(self, endpoint_id: str, task_id: str) -> str | None:
        """The owner of an open task of this endpoint (None: no such task, ended, or another's)."""
        with self._tx() as conn:
            return conn.execute(select(tasks.c.owner_id).where(
                and_(tasks.c.id == task_id, tasks.c.endpoint_id == endpoint_id, _OPEN))).scalar()

    def write_results(self, fresh: list[Any]) -> list[Any]:
        """Store claimed results; returns those stored. The UPDATE is guarded by ``t_done IS
        NULL``: a stored result is never overwritten. The rows are locked first (``FOR UPDATE``
        on PostgreSQL), so when two service replicas store results for the same task at once,
        exactly one of them stores it and reports it stored."""
        if not fresh:
            return []
        now = time.time()
        params = []
        for r in fresh:
            times = r.times
            params.append((r.state, r.data, json.dumps(_error_dict(r.error)) if r.error else None,
                           times.get(TaskState.DISPATCHED.value), times.get(TaskState.RUNNING.value),
                           times.get(r.state) or now, r.id))
        if self._driver_sql:  # the common case first: every task still open (see _store_open_sqlite)
            params.sort(key=lambda p: p[-1])  # rows locked in id order, as set_state does
            if self._store_open_sqlite(params):
                return list(fresh)
        with self._tx() as conn:
            driver = self._sqlite_driver(conn)
            still_open: set[str] = set()
            for chunk in chunks(sorted(r.id for r in fresh)):  # locked in id order, as set_state does
                still_open.update(store_sqlite.open_among(driver, chunk) if driver is not None else
                                  conn.execute(_LOCK_OPEN_AMONG, {"ids": chunk}).scalars())
            params = sorted((p for p in params if p[-1] in still_open), key=lambda p: p[-1])
            if not params:
                return []
            if driver is not None:
                store_sqlite.store_results(driver, params)
            else:
                conn.execute(_STORE_RESULT, [dict(zip(_RESULT_KEYS, p, strict=True)) for p in params])
        return [r for r in fresh if r.id in still_open]

    def _store_open_sqlite(self, params: list[tuple[Any, ...]]) -> bool:
        """Results on SQLite whose tasks are all still open (the common case): one guarded UPDATE
        and the commit, on the driver, with no look first. False (rolled back, nothing written)
        if any task had a result already: the caller looks first, to say which were stored."""
        with self._driver_tx() as db:
            if not store_sqlite.store_all_open(db, params):
                db.rollback()
                return False
        return True

    def open_task_page(self, endpoint_id: str, after: tuple[float, str] | None, limit: int) -> list[Any]:
        """The next ``limit`` open tasks of an endpoint after ``after`` = (t_received, id), in
        submission order: (id, owner_id, t_received, size of the arguments). No payloads: a
        page of a million-task backlog costs an index range scan of ``limit`` rows."""
        cond = and_(tasks.c.endpoint_id == endpoint_id, _OPEN)
        if after is not None:
            cond = and_(cond, tuple_(tasks.c.t_received, tasks.c.id) > tuple_(*after))
        with self._tx() as conn:
            return conn.execute(
                select(tasks.c.id, tasks.c.owner_id, tasks.c.t_received, func.length(tasks.c.payload).label("size"))
                .where(cond).order_by(tasks.c.t_received, tasks.c.id).limit(limit)
            ).all()

    def load_open_tasks(self, ids: Sequence[str]) -> list[Any]:
        """Open tasks with what an endpoint needs to run them (tasks that ended meanwhile are left out)."""
        out: list[Any] = []
        with self._tx() as conn:
            for chunk in chunks(ids):
                out.extend(conn.execute(_LOAD_OPEN, {"ids": chunk}).all())
        return out

    def input_readers(self, endpoint_id: str, ids: Sequence[str]) -> dict[str, list[tuple[str, str]]]:
        """For an endpoint asking for results it needs as inputs: ``{input id: [(open task on this
        endpoint that takes it, that task's owner)]}``. An endpoint may read a result only that way."""
        readers: dict[str, list[tuple[str, str]]] = {}
        with self._tx() as conn:
            for chunk in chunks(list(set(ids))):
                for row in conn.execute(
                        select(task_inputs.c.input_id, tasks.c.id, tasks.c.owner_id)
                        .join(tasks, tasks.c.id == task_inputs.c.task_id)
                        .where(and_(task_inputs.c.input_id.in_(chunk), on_endpoint(endpoint_id), _OPEN))):
                    readers.setdefault(row.input_id, []).append((row.id, row.owner_id))
        return readers

    def kept_result_owner(self, endpoint_id: str, task_id: str) -> str | None:
        """The owner of a finished task whose result this endpoint keeps (it may upload it as a
        blob when someone asks for it), else None."""
        with self._tx() as conn:
            row = conn.execute(select(tasks.c.owner_id, tasks.c.result).where(
                and_(tasks.c.id == task_id, tasks.c.state == TaskState.SUCCESS.value))).first()
        if row is None:
            return None
        kept = kept_ref_of(row.result)
        return row.owner_id if kept is not None and kept.endpoint == endpoint_id else None

    def get_tasks(self, owner: str, ids: Sequence[str]) -> list[Any]:
        """The owner's tasks among ``ids`` (others' are simply not found)."""
        out: list[Any] = []
        with self._tx() as conn:
            for chunk in chunks(ids):
                out.extend(conn.execute(
                    select(tasks).where(and_(tasks.c.id.in_(chunk), _owned_by(owner)))).all())
        return out

    def count_open(self, owner: str) -> int:
        """How many of the owner's tasks have no result yet (waiting, dispatched or running)."""
        with self._tx() as conn:
            return conn.execute(_COUNT_OPEN, {"owner": owner}).scalar_one()

    def finished_among(self, owner: str, ids: Sequence[str]) -> list[str]:
        """The owner's tasks among ``ids`` that have a result (ids only: a cheap check of what
        a replica's clients wait for, see ``Relay.reconcile``)."""
        out: list[str] = []
        with self._tx() as conn:
            for chunk in chunks(ids):
                out.extend(conn.execute(select(tasks.c.id).where(
                    and_(tasks.c.id.in_(chunk), _owned_by(owner), tasks.c.t_done.is_not(None)))).scalars())
        return out

    def group_task_ids(self, owner: str, group_id: str) -> list[Any]:
        with self._tx() as conn:
            return conn.execute(
                select(tasks.c.id, tasks.c.state)
                .where(and_(tasks.c.owner_id == owner, tasks.c.group_id == group_id))
                .order_by(tasks.c.t_received)
            ).all()

    def cancel(self, owner: str, ids: Sequence[str]) -> list[Any]:
        """Cancel open tasks of this owner; returns (id, endpoint_id, previous state) of those cancelled."""
        cancelled: list[Any] = []
        error = json.dumps({"type": "TaskCancelled", "message": "cancelled by its owner"})
        with self._tx() as conn:
            for chunk in chunks(ids):
                rows = conn.execute(
                    select(tasks.c.id, tasks.c.endpoint_id, tasks.c.state).where(
                        and_(tasks.c.id.in_(chunk), _owned_by(owner), _OPEN)
                    )
                ).all()
                if rows:
                    conn.execute(
                        update(tasks)
                        .where(and_(tasks.c.id.in_([r.id for r in rows]), _OPEN))
                        .values(state=TaskState.CANCELLED.value, t_done=time.time(), payload=None, error=error)
                    )
                cancelled.extend(rows)
        return cancelled

    def mark_collected(self, owner: str, ids: Sequence[str]) -> None:
        with self._tx() as conn:
            now = time.time()
            for chunk in chunks(ids):
                conn.execute(_MARK_COLLECTED, {"ids": chunk, "owner": owner, "now": now})

    def purge(self, retention_s: float, uncollected_retention_s: float | None = None) -> int:
        """Forget finished tasks collected more than ``retention_s`` ago, and (if given) finished
        tasks nobody collected within ``uncollected_retention_s`` of their end."""
        now = time.time()
        expired = and_(tasks.c.collected_at.is_not(None), tasks.c.collected_at < now - retention_s)
        if uncollected_retention_s is not None:
            expired = or_(expired, and_(tasks.c.collected_at.is_(None), tasks.c.t_done.is_not(None),
                                        tasks.c.t_done < now - uncollected_retention_s))
        with self._tx() as conn:
            res = conn.execute(delete(tasks).where(expired))
            if res.rowcount:  # the inputs of tasks that are gone
                conn.execute(delete(task_inputs).where(~exists().where(tasks.c.id == task_inputs.c.task_id)))
        return res.rowcount or 0

    def open_by_state(self, owner: str) -> dict[str, int]:
        """A user's open tasks by state (read through the partial index of open tasks)."""
        with self._tx() as conn:
            rows = conn.execute(
                select(tasks.c.state, func.count()).where(and_(tasks.c.owner_id == owner, _OPEN))
                .group_by(tasks.c.state)
            ).all()
        return {r[0]: r[1] for r in rows}

    def recent_tasks(self, owner: str, limit: int) -> list[Any]:
        """A user's ``limit`` most recently submitted tasks, newest first, with their transition
        times: what the dashboard draws (a bounded read, however many tasks the user has)."""
        with self._tx() as conn:
            return conn.execute(
                select(tasks.c.id, tasks.c.state, tasks.c.group_id, tasks.c.endpoint_id, tasks.c.t_received,
                       tasks.c.t_waiting, tasks.c.t_dispatched, tasks.c.t_running, tasks.c.t_done)
                .where(tasks.c.owner_id == owner).order_by(tasks.c.t_received.desc()).limit(limit)
            ).all()


def _error_dict(error: Any) -> dict[str, Any]:
    """A result's error (an ErrorInfo record: endpoints send no dicts) as a plain dict."""
    import msgspec

    return msgspec.structs.asdict(error)
