"""Durable service state: users, endpoints, functions and tasks, through SQLAlchemy Core.

SQLite (WAL mode) is the embedded default; PostgreSQL is a different URL, not different code.
Every method is one transaction, so one WebSocket frame (a batch of tasks or results) costs one
commit: that is what keeps the durable path fast.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import (
    BigInteger,
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
    insert,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.engine import Connection, Engine

from tether.bounded import BoundedCache
from tether.protocol import ErrorInfo, Result, TaskState

log = logging.getLogger("tether.service.store")

#: ids per IN (...) clause: far below SQLite's limit on bound parameters, so no list a peer
#: sends can make a statement fail
IN_CHUNK = 500

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
    # a deleted endpoint stays as a tombstone: its id is never issued again, to anyone
    Column("deleted_at", Float),
    # multi-user endpoints: who may send tasks ({"public": bool, "users": [names or ids]})
    Column("multi_user", Boolean),
    Column("policy", Text),
    # a user endpoint: its multi-user parent, the user's config, the local account it runs as
    Column("parent_id", String(64), index=True),
    Column("user_config", Text),
    Column("local_user", String(255)),
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
# An endpoint's open tasks in submission order, for paging through a backlog: partial, so a
# task leaves it when it ends and a page costs what it returns, not what the endpoint ever ran.
Index("ix_tasks_endpoint_open", tasks.c.endpoint_id, tasks.c.t_received, tasks.c.id,
      sqlite_where=tasks.c.t_done.is_(None), postgresql_where=tasks.c.t_done.is_(None))
# A user's tasks newest first, for the dashboard's bounded window (see Store.recent_tasks).
Index("ix_tasks_owner_recent", tasks.c.owner_id, tasks.c.t_received)
# A user's open tasks, counted for the per-user quota (see Store.count_open).
Index("ix_tasks_owner_open", tasks.c.owner_id,
      sqlite_where=tasks.c.t_done.is_(None), postgresql_where=tasks.c.t_done.is_(None))

# --- blobs: large payloads on the service's disk (service/blobs.py owns these two tables) -------
#: One row per blob: who owns it (counted against their quota), what it must hash to, and where
#: its upload stands (reserved -> uploading -> complete). The bytes are a file named by the id.
blobs = Table(
    "blobs",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("owner_id", String(64), nullable=False, index=True),
    Column("uploader", String(80), nullable=False),  # "user:<id>" or "endpoint:<id>": who may send the bytes
    Column("size", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("state", String(16), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("linked", Boolean, nullable=False),  # ever named by a task: deleted with its last task
)
#: Which tasks name which blobs (arguments and function bodies: "input"; a result: "result").
task_blobs = Table(
    "task_blobs",
    metadata,
    Column("task_id", String(64), primary_key=True),
    Column("blob_id", String(64), primary_key=True),
    Column("role", String(16), nullable=False),
    Index("ix_task_blobs_blob", "blob_id"),
)
# --- end of blobs ------------------------------------------------------------------------------

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
_SET_STATE = {
    state: update(tasks).where(and_(tasks.c.id == bindparam("b_id"), _OPEN))
    .values({"state": state.value, _TIME_COLUMN[state]: bindparam("b_ts")})
    for state in (TaskState.WAITING, TaskState.DISPATCHED, TaskState.RUNNING)
}
#: dispatched again: only tasks marked waiting (an endpoint that reconnects holding them)
_REDISPATCH = (update(tasks).where(and_(tasks.c.id == bindparam("b_id"), tasks.c.state == TaskState.WAITING.value))
               .values(state=TaskState.DISPATCHED.value, t_dispatched=bindparam("b_ts")))
_LOAD_OPEN = select(tasks.c.id, tasks.c.owner_id, tasks.c.endpoint_id, tasks.c.function_id, tasks.c.payload,
                    tasks.c.spec, tasks.c.uec, tasks.c.group_id).where(and_(tasks.c.id.in_(_IDS), _OPEN))
_MARK_COLLECTED = (
    update(tasks)
    .where(and_(tasks.c.id.in_(_IDS), _owned_by(bindparam("owner")), tasks.c.collected_at.is_(None)))
    .values(collected_at=bindparam("now"))
)
_COUNT_OPEN = select(func.count()).select_from(tasks).where(and_(tasks.c.owner_id == bindparam("owner"), _OPEN))
#: PostgreSQL: a lock held until the transaction ends, keyed by a 64-bit number (Store.lock_owner)
_ADVISORY_LOCK = text("SELECT pg_advisory_xact_lock(:key)")


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def credential_hash(secret: str) -> str:
    """How tokens and endpoint secrets are kept (never in clear)."""
    return _hash(secret)


#: lengths an IN (...) list is padded to: each distinct length is a distinct SQL text, which
#: SQLite prepares and caches anew; a handful of lengths keep that cache small and warm
IN_BUCKETS = (1, 4, 16, 64, 128, 256, IN_CHUNK)


def _chunks(items: Sequence[Any], size: int = IN_CHUNK) -> Iterator[Sequence[Any]]:
    """``items`` in IN-list chunks of at most ``size``, each padded (with its last item
    repeated, harmless in IN) to a bucket length from IN_BUCKETS."""
    for start in range(0, len(items), size):
        chunk = list(items[start : start + size])
        bucket = next((b for b in IN_BUCKETS if b >= len(chunk)), len(chunk))
        yield chunk + [chunk[-1]] * (bucket - len(chunk))


class EndpointIdTaken(Exception):
    """The endpoint id exists (another owner's, or deleted): ids are never issued twice."""


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
    cur.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes, fsync at checkpoints
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        # few cached statements: inserts of n rows are n-row statements, one per batch size, and
        # 128 of them (the default) held ~20 MB that grew with the tasks ever submitted
        engine = create_engine(url, connect_args={"check_same_thread": False, "cached_statements": 32})
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


class Store:
    """All durable state. Methods are synchronous and short; the service calls them through
    :class:`tether.service.async_store.AsyncStore` (inline for SQLite, in a small thread pool
    for a database across the network, so a slow query never stalls the event loop).

    Every method is one transaction on its thread's connection (``_tx``), rolled back if
    anything in it fails: a bad request can fail only itself, never leave the connection in a
    broken transaction for everyone else.
    """

    def __init__(self, url: str, auto_migrate: bool = False, upgrade_hint: str | None = None):
        """Open the store; its schema is checked (and, where that is safe, upgraded) first: see
        :mod:`tether.service.schema` for who migrates what (``auto_migrate``: PostgreSQL too)."""
        from .schema import ensure_schema  # schema imports make_engine from here

        self.engine = make_engine(url)
        ensure_schema(self.engine, auto_migrate, upgrade_hint)
        self._local = threading.local()  # one connection per thread, from the engine's pool
        self._function_cache: BoundedCache[tuple[str, str], bytes] = BoundedCache(
            max_items=4096, max_bytes=256 * 1024 * 1024)
        self._inserts: dict[tuple[str, str | None], Any] = {}  # see _insert

    @property
    def _conn(self) -> Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            conn = self._local.conn = self.engine.connect()
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
        self.engine.dispose()

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        """One transaction: committed on success, rolled back on any error."""
        conn = self._conn
        if conn.in_transaction():  # never inherit a transaction something else left open
            conn.rollback()
        with conn.begin():
            yield conn

    def transaction(self) -> Any:
        """:meth:`_tx` for modules that keep tables of their own here (service/blobs.py)."""
        return self._tx()

    def lock_owner(self, conn: Connection, owner: str, what: str) -> None:
        """Hold ``owner``'s lock on ``what`` until this transaction ends, so a quota's check and
        the insert it allows are one step for every replica. PostgreSQL: an advisory lock
        (keyed by a hash of both); SQLite serialises writers itself and has one process."""
        if self.engine.dialect.name != "postgresql":
            return
        key = int.from_bytes(hashlib.sha256(f"{what}:{owner}".encode()).digest()[:8], "big", signed=True)
        conn.execute(_ADVISORY_LOCK, {"key": key})

    def _insert(self, table: Table, rows: list[dict[str, Any]], returning: Any = None) -> Any:
        """INSERT, skipping rows whose primary key exists; with ``returning``, the rows inserted.

        SQLAlchemy cannot cache a statement with ``ON CONFLICT DO NOTHING`` (2.0.x): it compiled
        the task insert anew for every submission, most of a one-task submission's cost. On
        SQLite ``INSERT OR IGNORE`` says the same (our rows break no other constraint) and is
        cached; the statement objects are built once, so not even their cache key is rebuilt.
        """
        key = (table.name, None if returning is None else str(returning))
        stmt = self._inserts.get(key)
        if stmt is None:
            dialect = self.engine.dialect.name
            if dialect == "sqlite":
                stmt = insert(table).prefix_with("OR IGNORE")
            elif dialect == "postgresql":
                from sqlalchemy.dialects.postgresql import insert as pg_insert

                stmt = pg_insert(table).on_conflict_do_nothing()
            else:  # pragma: no cover - other databases are not supported yet
                raise RuntimeError(f"unsupported database {dialect}")
            if returning is not None:
                stmt = stmt.returning(returning)
            self._inserts[key] = stmt
        return self._conn.execute(stmt, rows)

    # --- users -------------------------------------------------------------------------------
    def create_user(self, name: str, token: str | None = None) -> tuple[str, str]:
        """Create a user, or give an existing one a new token (the old one stops working at
        once); returns (user_id, token)."""
        token = token or secrets.token_urlsafe(32)
        with self._tx() as conn:
            row = conn.execute(select(users.c.id).where(users.c.name == name)).first()
            if row:
                conn.execute(update(users).where(users.c.id == row.id).values(token_hash=_hash(token)))
                return row.id, token
            user_id = str(uuid.uuid4())
            conn.execute(users.insert().values(id=user_id, name=name, token_hash=_hash(token), created_at=time.time()))
        return user_id, token

    def ensure_user(self, name: str, token: str | None = None) -> tuple[str, str | None]:
        """Create a user with ``token`` (or a new one) unless it exists; an existing user's token
        is never changed. Returns (user_id, the token if it is the user's current one, else None).

        For a database several service replicas share: a replica starting must not rotate a
        token that the others (and their clients) use."""
        with self._tx() as conn:
            row = conn.execute(select(users.c.id, users.c.token_hash).where(users.c.name == name)).first()
            if row:
                current = token is not None and secrets.compare_digest(row.token_hash, _hash(token))
                return row.id, token if current else None
        return self.create_user(name, token)

    def revoke_user_token(self, name: str) -> bool:
        """Revoke a user's token: every request and connection with it is refused (no new token
        until ``create_user`` issues one). False if there is no such user."""
        with self._tx() as conn:
            res = conn.execute(update(users).where(users.c.name == name).values(token_hash="revoked"))
        return bool(res.rowcount)

    def user_by_token(self, token: str) -> str | None:
        """The user a token belongs to. Not cached: a token rotated or revoked by
        ``tether service ...`` (another process, same database) is refused at once."""
        with self._tx() as conn:
            row = conn.execute(select(users.c.id).where(users.c.token_hash == _hash(token))).first()
        return row.id if row else None

    def user_for_identity(self, identity_id: str, username: str) -> str:
        """The service user of a Globus identity (made on first sight): its id is the identity
        id, its name the Globus username (suffixed if a local user already has that name)."""
        with self._tx() as conn:
            if conn.execute(select(users.c.id).where(users.c.id == identity_id)).first() is None:
                taken = conn.execute(select(users.c.id).where(users.c.name == username)).first() is not None
                name = f"{username}#{identity_id[:8]}" if taken else username
                conn.execute(users.insert().values(id=identity_id, name=name, token_hash="globus",
                                                   created_at=time.time()))
        return identity_id

    def valid_token_hashes(self, hashes: Iterable[str]) -> set[str]:
        """Which of these token hashes still authenticate someone (for open connections)."""
        wanted = list(set(hashes))
        out: set[str] = set()
        with self._tx() as conn:
            for chunk in _chunks(wanted):
                out.update(r.token_hash for r in conn.execute(
                    select(users.c.token_hash).where(users.c.token_hash.in_(chunk))))
        return out

    def user_name(self, user_id: str) -> str | None:
        with self._tx() as conn:
            row = conn.execute(select(users.c.name).where(users.c.id == user_id)).first()
        return row.name if row else None

    # --- endpoints ---------------------------------------------------------------------------
    def register_endpoint(self, owner: str, name: str, endpoint_id: str | None = None,
                          multi_user: bool = False) -> tuple[str, str]:
        """Register a new endpoint (the service makes its id), or re-issue the credential of an
        endpoint the owner has (the old credential stops working).

        Raises KeyError for an id that does not exist and EndpointIdTaken for one that is
        another user's or deleted: an endpoint id is never handed to anyone else.
        """
        secret = secrets.token_urlsafe(32)
        with self._tx() as conn:
            if endpoint_id:
                row = conn.execute(select(endpoints).where(endpoints.c.id == endpoint_id)).first()
                if row is None:
                    raise KeyError(endpoint_id)
                if row.owner_id != owner or row.deleted_at is not None or row.parent_id is not None:
                    raise EndpointIdTaken(endpoint_id)
                conn.execute(update(endpoints).where(endpoints.c.id == endpoint_id)
                             .values(secret_hash=_hash(secret), name=name, multi_user=multi_user))
                return endpoint_id, secret
            endpoint_id = str(uuid.uuid4())
            conn.execute(endpoints.insert().values(
                id=endpoint_id, owner_id=owner, name=name, secret_hash=_hash(secret), created_at=time.time(),
                multi_user=multi_user))
        return endpoint_id, secret

    def set_policy(self, endpoint_id: str, policy: dict[str, Any]) -> None:
        with self._tx() as conn:
            conn.execute(update(endpoints).where(endpoints.c.id == endpoint_id).values(policy=json.dumps(policy)))

    def user_endpoint_for(self, parent: dict[str, Any], user_id: str, user_name: str,
                          config: dict[str, Any] | None) -> str:
        """The id of the user endpoint that runs ``user_id``'s tasks with ``config`` on the
        multi-user endpoint ``parent`` (made on first use; one per user and config)."""
        canonical = json.dumps(config or {}, sort_keys=True, separators=(",", ":"))
        child_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"tether:{parent['id']}:{user_id}:{canonical}"))
        with self._tx():
            self._insert(endpoints, [{
                "id": child_id, "owner_id": user_id, "name": f"{parent['name']}.{user_name}"[:255],
                "secret_hash": "unset", "created_at": time.time(), "parent_id": parent["id"],
                "user_config": canonical,
            }])
        return child_id

    def new_secret(self, endpoint_id: str) -> str:
        """A fresh credential for an endpoint (the previous one stops working)."""
        secret = secrets.token_urlsafe(32)
        with self._tx() as conn:
            conn.execute(update(endpoints).where(endpoints.c.id == endpoint_id).values(secret_hash=_hash(secret)))
        return secret

    def void_secret(self, endpoint_id: str) -> None:
        """Make an endpoint's credential useless until a new one is issued (``new_secret``)."""
        with self._tx() as conn:
            conn.execute(update(endpoints).where(endpoints.c.id == endpoint_id).values(secret_hash="revoked"))

    def set_local_user(self, endpoint_id: str, local_user: str) -> None:
        with self._tx() as conn:
            conn.execute(update(endpoints).where(endpoints.c.id == endpoint_id).values(local_user=local_user))

    def user_endpoints(self, parent_id: str, owner: str | None = None) -> list[dict[str, Any]]:
        """The user endpoints of a multi-user endpoint (only ``owner``'s, when given)."""
        cond = and_(endpoints.c.parent_id == parent_id, endpoints.c.deleted_at.is_(None))
        if owner is not None:
            cond = and_(cond, endpoints.c.owner_id == owner)
        with self._tx() as conn:
            rows = conn.execute(select(endpoints).where(cond).order_by(endpoints.c.created_at)).all()
        return [dict(r._mapping) for r in rows]

    def user_endpoints_with_open_tasks(self, parent_id: str) -> list[dict[str, Any]]:
        with self._tx() as conn:
            busy = select(tasks.c.endpoint_id).where(_OPEN).distinct()
            rows = conn.execute(select(endpoints).where(and_(endpoints.c.parent_id == parent_id,
                                                             endpoints.c.id.in_(busy)))).all()
        return [dict(r._mapping) for r in rows]

    def endpoint_by_secret(self, endpoint_id: str, secret: str) -> dict[str, Any] | None:
        ep = self.get_endpoint(endpoint_id)
        if ep is None or ep["deleted_at"] is not None or not secrets.compare_digest(ep["secret_hash"], _hash(secret)):
            return None
        return ep

    def valid_endpoint_secrets(self, pairs: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
        """Which (endpoint id, secret hash) pairs still authenticate a live endpoint."""
        wanted = dict(pairs)
        out: set[tuple[str, str]] = set()
        with self._tx() as conn:
            for chunk in _chunks(list(wanted)):
                for r in conn.execute(select(endpoints.c.id, endpoints.c.secret_hash)
                                      .where(and_(endpoints.c.id.in_(chunk), endpoints.c.deleted_at.is_(None)))):
                    out.add((r.id, r.secret_hash))
        return out

    def get_endpoint(self, endpoint_id: str) -> dict[str, Any] | None:
        """An endpoint's row, deleted ones included (check ``deleted_at``)."""
        with self._tx() as conn:
            row = conn.execute(select(endpoints).where(endpoints.c.id == endpoint_id)).first()
        return dict(row._mapping) if row else None

    def list_endpoints(self, owner: str) -> list[dict[str, Any]]:
        with self._tx() as conn:
            rows = conn.execute(
                select(endpoints).where(and_(endpoints.c.owner_id == owner, endpoints.c.deleted_at.is_(None),
                                             endpoints.c.parent_id.is_(None)))
                .order_by(endpoints.c.created_at)
            ).all()
        return [dict(r._mapping) for r in rows]

    def save_endpoint_status(self, endpoint_id: str, status: dict[str, Any]) -> None:
        with self._tx() as conn:
            conn.execute(update(endpoints).where(endpoints.c.id == endpoint_id)
                         .values(status=json.dumps(status), last_seen=time.time()))

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

    # --- functions ---------------------------------------------------------------------------
    def add_functions(self, owner: str, bodies: dict[str, bytes], quota: int | None = None) -> set[str]:
        """Keep function bodies under (owner, id); callers check that each id is its body's hash.

        Returns the ids refused because keeping them would take the owner past ``quota`` bytes
        of function bodies. The check and the insert are one transaction under the owner's lock,
        so concurrent registrations cannot overshoot. A body kept already is never refused: sent
        again, it only counts as registered now (``created_at``), which keeps it from the purge.
        """
        if not bodies:
            return set()
        now = time.time()
        refused: set[str] = set()
        with self._tx() as conn:
            if quota is not None:
                self.lock_owner(conn, owner, "functions")
                mine = functions.c.owner_id == owner
                kept = {r.id for r in conn.execute(select(functions.c.id).where(
                    and_(mine, functions.c.id.in_(list(bodies)))))}
                used = conn.execute(select(func.coalesce(func.sum(func.length(functions.c.body)), 0))
                                    .where(mine)).scalar_one()
                for fid, body in bodies.items():
                    if fid in kept:
                        continue
                    if used + len(body) > quota:
                        refused.add(fid)
                    else:
                        used += len(body)
            fresh = {fid: body for fid, body in bodies.items() if fid not in refused}
            if fresh:
                self._insert(functions, [{"owner_id": owner, "id": fid, "body": b, "created_at": now}
                                         for fid, b in fresh.items()])
                conn.execute(update(functions).where(and_(functions.c.owner_id == owner,
                                                          functions.c.id.in_(list(fresh)),
                                                          functions.c.created_at < now)).values(created_at=now))
        for fid, body in fresh.items():
            self._function_cache[(owner, fid)] = body
        return refused

    def purge_functions(self, retention_s: float) -> int:
        """Forget function bodies registered more than ``retention_s`` ago that no stored task
        names (a client sends a forgotten body again when the service says it does not know it)."""
        named = select(tasks.c.owner_id, tasks.c.function_id)
        with self._tx() as conn:
            res = conn.execute(delete(functions).where(and_(
                functions.c.created_at < time.time() - retention_s,
                tuple_(functions.c.owner_id, functions.c.id).not_in(named))))
        if res.rowcount:
            self._function_cache.clear()
        return res.rowcount or 0

    def get_function(self, owner: str, fid: str) -> bytes | None:
        body = self._function_cache.get((owner, fid))
        if body is None:
            with self._tx() as conn:
                row = conn.execute(
                    select(functions.c.body).where(and_(functions.c.owner_id == owner, functions.c.id == fid))
                ).first()
            if row is None:
                return None
            body = self._function_cache[(owner, fid)] = row.body
        return body

    # --- tasks -------------------------------------------------------------------------------
    def insert_tasks(self, owner: str, batch: list[Any], now: float | None = None,
                     max_open: int | None = None) -> tuple[list[Any], list[str], list[str]]:
        """Store submitted tasks as waiting-for-endpoint, idempotently by task id.

        Returns (inserted tasks, ids the owner had already submitted, ids that belong to
        someone else). Only the first are new work; the second are a resubmission after a
        reconnect; the third are refused: an id is never merged into another owner's task.
        With ``max_open``, the owner's open tasks are counted under the owner's lock in the
        same transaction, and only the tasks that fit are inserted (the rest are neither of
        the three: the caller refuses them): the quota holds however many replicas submit.
        """
        now = now or time.time()
        rows = [
            {
                "id": t.id,
                "owner_id": owner,
                "endpoint_id": t.endpoint,
                "function_id": t.function,
                "group_id": t.group,
                "state": TaskState.WAITING.value,
                "payload": t.payload,
                "spec": json.dumps(t.spec) if t.spec else None,
                "uec": json.dumps(t.uec) if t.uec else None,
                "t_received": now,
                "t_waiting": now,
            }
            for t in batch
        ]
        if not rows:
            return [], [], []
        with self._tx() as conn:
            if max_open is not None:
                self.lock_owner(conn, owner, "tasks")
                room = max(0, max_open - conn.execute(_COUNT_OPEN, {"owner": owner}).scalar_one())
                batch, rows = batch[:room], rows[:room]
                if not rows:
                    return [], [], []
            inserted_ids = {r.id for r in self._insert(tasks, rows, returning=tasks.c.id)}
            existing = [t.id for t in batch if t.id not in inserted_ids]
            owners: dict[str, str] = {}
            for chunk in _chunks(existing):
                owners.update(conn.execute(select(tasks.c.id, tasks.c.owner_id).where(tasks.c.id.in_(chunk))).all())
        inserted = [t for t in batch if t.id in inserted_ids]
        mine = [tid for tid in existing if owners.get(tid) == owner]
        theirs = [tid for tid in existing if owners.get(tid) != owner]
        return inserted, mine, theirs

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
            for chunk in _chunks(ids):
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
            params.append(
                {
                    "b_id": r.id,
                    "b_state": r.state,
                    "b_result": r.data,
                    "b_error": json.dumps(_error_dict(r.error)) if r.error else None,
                    "b_dispatched": times.get(TaskState.DISPATCHED.value),
                    "b_running": times.get(TaskState.RUNNING.value),
                    "b_done": times.get(r.state) or now,
                }
            )
        with self._tx() as conn:
            still_open: set[str] = set()
            for chunk in _chunks(sorted(r.id for r in fresh)):  # locked in id order, as set_state does
                still_open.update(conn.execute(_LOCK_OPEN_AMONG, {"ids": chunk}).scalars())
            params = sorted((p for p in params if p["b_id"] in still_open), key=lambda p: p["b_id"])
            if not params:
                return []
            conn.execute(_STORE_RESULT, params)
        return [r for r in fresh if r.id in still_open]

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
            for chunk in _chunks(ids):
                out.extend(conn.execute(_LOAD_OPEN, {"ids": chunk}).all())
        return out

    def get_tasks(self, owner: str, ids: Sequence[str]) -> list[Any]:
        """The owner's tasks among ``ids`` (others' are simply not found)."""
        out: list[Any] = []
        with self._tx() as conn:
            for chunk in _chunks(ids):
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
            for chunk in _chunks(ids):
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
            for chunk in _chunks(ids):
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
            for chunk in _chunks(ids):
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
