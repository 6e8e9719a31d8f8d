"""Durable service state: users, endpoints, functions and tasks, through SQLAlchemy Core.

SQLite (WAL mode) is the embedded default; PostgreSQL is a different URL, not different code.
Every method is one transaction, so one WebSocket frame (a batch of tasks or results) costs one
commit: that is what keeps the durable path fast.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
import uuid
from collections.abc import Iterable
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Float,
    Index,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    and_,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    select,
    update,
)
from sqlalchemy.engine import Engine

from tether.protocol import TaskState

metadata = MetaData()

users = Table(
    "users",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(255), nullable=False, unique=True),
    Column("token_hash", String(64), nullable=False, index=True),
    Column("created_at", Float, nullable=False),
)

endpoints = Table(
    "endpoints",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("owner_id", String(64), nullable=False, index=True),
    Column("name", String(255), nullable=False),
    Column("secret_hash", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("last_seen", Float),
    Column("status", Text),  # JSON of the last heartbeat
)

functions = Table(
    "functions",
    metadata,
    Column("owner_id", String(64), primary_key=True),
    Column("id", String(64), primary_key=True),
    Column("body", LargeBinary, nullable=False),
    Column("created_at", Float, nullable=False),
)

tasks = Table(
    "tasks",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("owner_id", String(64), nullable=False),
    Column("endpoint_id", String(64), nullable=False),
    Column("function_id", String(64), nullable=False),
    Column("group_id", String(64)),
    Column("state", String(32), nullable=False),
    Column("payload", LargeBinary),
    Column("spec", Text),
    Column("uec", Text),
    Column("result", LargeBinary),
    Column("error", Text),
    Column("t_received", Float),
    Column("t_waiting", Float),
    Column("t_dispatched", Float),
    Column("t_running", Float),
    Column("t_done", Float),
    Column("collected_at", Float),
    Column("retried", Boolean, default=False),
    Index("ix_tasks_endpoint_state", "endpoint_id", "state"),
    Index("ix_tasks_owner_group", "owner_id", "group_id"),
)

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


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
    cur.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes, fsync at checkpoints
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


def transitions(row: Any) -> dict[str, float]:
    """The timestamps of a task row, keyed by state name."""
    out = {}
    for state, col in _TIME_COLUMN.items():
        ts = row._mapping.get(col)
        if ts is not None and (col != "t_done" or row.state == state):
            out[state.value] = ts
    return out


class Store:
    """All durable state. Methods are synchronous and short; the service calls them on its loop."""

    def __init__(self, url: str):
        self.engine = make_engine(url)
        metadata.create_all(self.engine)
        self._conn = self.engine.connect()
        self._token_cache: dict[str, str] = {}
        self._function_cache: dict[tuple[str, str], bytes] = {}
        self._open: set[str] = set()  # ids of tasks known to have no result yet (see claim_results)

    def close(self) -> None:
        self._conn.close()
        self.engine.dispose()

    def _insert_ignore(self, table: Table, rows: list[dict[str, Any]]) -> None:
        """INSERT, skipping rows whose primary key exists (resubmission after a reconnect)."""
        dialect = self.engine.dialect.name
        if dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        elif dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:  # pragma: no cover - other databases are not supported yet
            raise RuntimeError(f"unsupported database {dialect}")
        self._conn.execute(insert(table).on_conflict_do_nothing(), rows)

    # --- users -------------------------------------------------------------------------------
    def create_user(self, name: str, token: str | None = None) -> tuple[str, str]:
        """Create a user (or give an existing one a new token); returns (user_id, token)."""
        token = token or secrets.token_urlsafe(32)
        with self._conn.begin():
            row = self._conn.execute(select(users.c.id).where(users.c.name == name)).first()
            if row:
                self._conn.execute(update(users).where(users.c.id == row.id).values(token_hash=_hash(token)))
                user_id = row.id
            else:
                user_id = str(uuid.uuid4())
                self._conn.execute(
                    users.insert().values(id=user_id, name=name, token_hash=_hash(token), created_at=time.time())
                )
        self._token_cache.clear()
        return user_id, token

    def user_by_token(self, token: str) -> str | None:
        """The user a token belongs to. Only hits are cached: a user added by ``tether service
        user-add`` (another process, same database) is recognised at once."""
        key = _hash(token)
        user = self._token_cache.get(key)
        if user is None:
            row = self._conn.execute(select(users.c.id).where(users.c.token_hash == key)).first()
            self._conn.commit()
            if row is None:
                return None
            user = self._token_cache[key] = row.id
        return user

    def user_name(self, user_id: str) -> str | None:
        row = self._conn.execute(select(users.c.name).where(users.c.id == user_id)).first()
        self._conn.commit()
        return row.name if row else None

    # --- endpoints ---------------------------------------------------------------------------
    def register_endpoint(self, owner: str, name: str, endpoint_id: str | None = None) -> tuple[str, str]:
        """Register an endpoint, or re-issue the credential of one the owner already has."""
        secret = secrets.token_urlsafe(32)
        with self._conn.begin():
            if endpoint_id:
                row = self._conn.execute(
                    select(endpoints.c.id).where(and_(endpoints.c.id == endpoint_id, endpoints.c.owner_id == owner))
                ).first()
                if row:
                    self._conn.execute(
                        update(endpoints)
                        .where(endpoints.c.id == endpoint_id)
                        .values(secret_hash=_hash(secret), name=name)
                    )
                    return endpoint_id, secret
            endpoint_id = endpoint_id or str(uuid.uuid4())
            self._conn.execute(
                endpoints.insert().values(
                    id=endpoint_id, owner_id=owner, name=name, secret_hash=_hash(secret), created_at=time.time()
                )
            )
        return endpoint_id, secret

    def endpoint_by_secret(self, endpoint_id: str, secret: str) -> dict[str, Any] | None:
        row = self._conn.execute(select(endpoints).where(endpoints.c.id == endpoint_id)).first()
        self._conn.commit()
        if row is None or not secrets.compare_digest(row.secret_hash, _hash(secret)):
            return None
        return dict(row._mapping)

    def get_endpoint(self, endpoint_id: str) -> dict[str, Any] | None:
        row = self._conn.execute(select(endpoints).where(endpoints.c.id == endpoint_id)).first()
        self._conn.commit()
        return dict(row._mapping) if row else None

    def list_endpoints(self, owner: str) -> list[dict[str, Any]]:
        rows = self._conn.execute(
            select(endpoints).where(endpoints.c.owner_id == owner).order_by(endpoints.c.created_at)
        ).all()
        self._conn.commit()
        return [dict(r._mapping) for r in rows]

    def save_endpoint_status(self, endpoint_id: str, status: dict[str, Any]) -> None:
        with self._conn.begin():
            self._conn.execute(
                update(endpoints)
                .where(endpoints.c.id == endpoint_id)
                .values(status=json.dumps(status), last_seen=time.time())
            )

    def delete_endpoint(self, endpoint_id: str) -> None:
        with self._conn.begin():
            self._conn.execute(delete(endpoints).where(endpoints.c.id == endpoint_id))

    # --- functions ---------------------------------------------------------------------------
    def add_functions(self, owner: str, bodies: dict[str, bytes]) -> None:
        if not bodies:
            return
        now = time.time()
        with self._conn.begin():
            self._insert_ignore(
                functions, [{"owner_id": owner, "id": fid, "body": b, "created_at": now} for fid, b in bodies.items()]
            )
        for fid, body in bodies.items():
            self._function_cache[(owner, fid)] = body

    def get_function(self, owner: str, fid: str) -> bytes | None:
        body = self._function_cache.get((owner, fid))
        if body is None:
            row = self._conn.execute(
                select(functions.c.body).where(and_(functions.c.owner_id == owner, functions.c.id == fid))
            ).first()
            self._conn.commit()
            if row is None:
                return None
            body = self._function_cache[(owner, fid)] = row.body
        return body

    # --- tasks -------------------------------------------------------------------------------
    def insert_tasks(self, owner: str, batch: list[dict[str, Any]], now: float | None = None) -> None:
        """Store a batch of submitted tasks (idempotent by task id) as waiting-for-endpoint."""
        now = now or time.time()
        rows = [
            {
                "id": t["id"],
                "owner_id": owner,
                "endpoint_id": t["endpoint"],
                "function_id": t["function"],
                "group_id": t.get("group"),
                "state": TaskState.WAITING.value,
                "payload": t["payload"],
                "spec": json.dumps(t["spec"]) if t.get("spec") else None,
                "uec": json.dumps(t["uec"]) if t.get("uec") else None,
                "t_received": now,
                "t_waiting": now,
            }
            for t in batch
        ]
        with self._conn.begin():
            self._insert_ignore(tasks, rows)
        self._open.update(r["id"] for r in rows)

    def set_state(self, stamps: Iterable[tuple[str, float]], state: TaskState) -> None:
        """Move open tasks to a non-terminal state at the given times (terminal tasks never move again)."""
        params = [{"b_id": i, "b_ts": ts} for i, ts in stamps]
        if not params:
            return
        col = _TIME_COLUMN[state]
        stmt = (
            update(tasks)
            .where(and_(tasks.c.id == bindparam("b_id"), _OPEN))
            .values({"state": state.value, col: bindparam("b_ts")})
        )
        with self._conn.begin():
            self._conn.execute(stmt, params)

    def claim_results(self, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The results that are the first for their task (duplicates are dropped); store them
        with :meth:`write_results`.

        Which tasks are open is known from memory for tasks this process inserted or loaded
        (the hot path: no SELECT); others (after a restart) are looked up.
        """
        unknown = [r["id"] for r in results if r["id"] not in self._open]
        if unknown:
            rows = self._conn.execute(
                select(tasks.c.id).where(and_(tasks.c.id.in_(unknown), _OPEN))
            ).all()
            self._conn.commit()
            self._open.update(r.id for r in rows)
        fresh = []
        for r in results:
            if r["id"] in self._open:
                self._open.discard(r["id"])
                fresh.append(r)
        return fresh

    def unclaim(self, results: list[dict[str, Any]]) -> None:
        self._open.update(r["id"] for r in results)

    def write_results(self, fresh: list[dict[str, Any]]) -> None:
        """Store claimed results. The UPDATE is guarded by ``t_done IS NULL``: a stored result
        is never overwritten."""
        with self._conn.begin():
            if fresh:
                now = time.time()
                params = []
                for r in fresh:
                    times = r.get("times") or {}
                    params.append(
                        {
                            "b_id": r["id"],
                            "b_state": r["state"],
                            "b_result": r.get("data"),
                            "b_error": json.dumps(r["error"]) if r.get("error") else None,
                            "b_dispatched": times.get(TaskState.DISPATCHED.value),
                            "b_running": times.get(TaskState.RUNNING.value),
                            "b_done": times.get(r["state"]) or now,
                        }
                    )
                self._conn.execute(
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
                    ),
                    params,
                )

    def open_tasks_for_endpoint(self, endpoint_id: str, exclude: set[str], limit: int = 100_000) -> list[Any]:
        rows = self._conn.execute(
            select(tasks.c.id, tasks.c.owner_id, tasks.c.function_id, tasks.c.payload, tasks.c.spec, tasks.c.uec,
                   tasks.c.group_id)
            .where(and_(tasks.c.endpoint_id == endpoint_id, _OPEN))
            .order_by(tasks.c.t_received)
            .limit(limit)
        ).all()
        self._conn.commit()
        self._open.update(r.id for r in rows)
        return [r for r in rows if r.id not in exclude]

    def get_tasks(self, owner: str, ids: list[str]) -> list[Any]:
        rows = self._conn.execute(
            select(tasks).where(and_(tasks.c.id.in_(ids), tasks.c.owner_id == owner))
        ).all()
        self._conn.commit()
        return rows

    def group_task_ids(self, owner: str, group_id: str) -> list[Any]:
        rows = self._conn.execute(
            select(tasks.c.id, tasks.c.state)
            .where(and_(tasks.c.owner_id == owner, tasks.c.group_id == group_id))
            .order_by(tasks.c.t_received)
        ).all()
        self._conn.commit()
        return rows

    def cancel(self, owner: str, ids: list[str]) -> list[Any]:
        """Cancel open tasks of this owner; returns (id, endpoint_id, previous state) of those cancelled."""
        with self._conn.begin():
            rows = self._conn.execute(
                select(tasks.c.id, tasks.c.endpoint_id, tasks.c.state).where(
                    and_(tasks.c.id.in_(ids), tasks.c.owner_id == owner, _OPEN)
                )
            ).all()
            self._open.difference_update(r.id for r in rows)
            if rows:
                self._conn.execute(
                    update(tasks)
                    .where(and_(tasks.c.id.in_([r.id for r in rows]), _OPEN))
                    .values(
                        state=TaskState.CANCELLED.value,
                        t_done=time.time(),
                        payload=None,
                        error=json.dumps({"type": "TaskCancelled", "message": "cancelled by its owner"}),
                    )
                )
        return rows

    def mark_collected(self, owner: str, ids: list[str]) -> None:
        with self._conn.begin():
            self._conn.execute(
                update(tasks)
                .where(and_(tasks.c.id.in_(ids), tasks.c.owner_id == owner, tasks.c.collected_at.is_(None)))
                .values(collected_at=time.time())
            )

    def purge(self, retention_s: float) -> int:
        """Forget finished tasks collected more than ``retention_s`` ago."""
        with self._conn.begin():
            res = self._conn.execute(
                delete(tasks).where(
                    and_(tasks.c.collected_at.is_not(None), tasks.c.collected_at < time.time() - retention_s)
                )
            )
        return res.rowcount or 0

    def count_by_state(self, owner: str) -> dict[str, int]:
        rows = self._conn.execute(
            select(tasks.c.state, func.count()).where(tasks.c.owner_id == owner).group_by(tasks.c.state)
        ).all()
        self._conn.commit()
        return {r[0]: r[1] for r in rows}

    def recent_failures(self, owner: str, limit: int = 20) -> list[Any]:
        rows = self._conn.execute(
            select(tasks.c.id, tasks.c.endpoint_id, tasks.c.error, tasks.c.t_done)
            .where(and_(tasks.c.owner_id == owner, tasks.c.state == TaskState.FAILED.value))
            .order_by(tasks.c.t_done.desc())
            .limit(limit)
        ).all()
        self._conn.commit()
        return rows
