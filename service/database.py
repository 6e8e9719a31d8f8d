"""How the store reaches its database: the engine, its connections, one transaction per method.

SQLite (WAL mode) is the embedded default; PostgreSQL is a different URL, not different code.
:class:`Database` is the base of the store (:mod:`tether.service.registry` for who and what is
registered, :mod:`tether.service.store` for tasks): each of their methods is one transaction
(``_tx``), so one WebSocket frame (a batch of tasks or results) costs one commit.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import (
    Table,
    create_engine,
    event,
    insert,
    text,
)
from sqlalchemy.engine import Connection, Engine

from tether.bounded import BoundedCache

#: ids per IN (...) clause: far below SQLite's limit on bound parameters, so no list a peer
#: sends can make a statement fail
IN_CHUNK = 500

#: PostgreSQL: a lock held until the transaction ends, keyed by a 64-bit number (Store.lock_owner)
_ADVISORY_LOCK = text("SELECT pg_advisory_xact_lock(:key)")


def credential_hash(secret: str) -> str:
    """How tokens and endpoint secrets are kept (never in clear)."""
    return hashlib.sha256(secret.encode()).hexdigest()


#: lengths an IN (...) list is padded to: each distinct length is a distinct SQL text, which
#: SQLite prepares and caches anew; a handful of lengths keep that cache small and warm
IN_BUCKETS = (1, 4, 16, 64, 128, 256, IN_CHUNK)


def chunks(items: Sequence[Any], size: int = IN_CHUNK) -> Iterator[Sequence[Any]]:
    """``items`` in IN-list chunks of at most ``size``, each padded (with its last item
    repeated, harmless in IN) to a bucket length from IN_BUCKETS."""
    for start in range(0, len(items), size):
        chunk = list(items[start : start + size])
        bucket = next((b for b in IN_BUCKETS if b >= len(chunk)), len(chunk))
        yield chunk + [chunk[-1]] * (bucket - len(chunk))


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


class Database:
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
        from .schema import ensure_schema  # imported here: the schema module is only needed to open a store

        self.engine = make_engine(url)
        ensure_schema(self.engine, auto_migrate, upgrade_hint)
        self._local = threading.local()  # one connection per thread, from the engine's pool
        self._function_cache: BoundedCache[tuple[str, str], bytes] = BoundedCache(
            max_items=4096, max_bytes=256 * 1024 * 1024)
        self._inserts: dict[tuple[str, str | None], Any] = {}  # see _insert
        #: the task path's statements go to SQLite's driver directly (service/store_sqlite.py)
        self._driver_sql = self.engine.dialect.name == "sqlite"

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

    @contextmanager
    def _driver_tx(self) -> Iterator[Any]:
        """One transaction said to SQLite's driver directly (``sqlite3``; callers check
        ``_driver_sql``): committed on success, rolled back on any error. What ``_tx`` does,
        without SQLAlchemy's transaction bookkeeping around it (~15 µs a transaction in Python,
        twice per task: its insert and its result, on the service's one event loop). SQLAlchemy
        issues no BEGIN on SQLite either: the driver begins before the first write, and
        ``commit()`` is the same driver call SQLAlchemy's commit makes."""
        conn = self._conn
        if conn.in_transaction():  # never inherit a transaction something else left open
            conn.rollback()
        driver = conn.connection.dbapi_connection
        try:
            yield driver
        except BaseException:
            driver.rollback()
            raise
        driver.commit()

    def _sqlite_driver(self, conn: Connection) -> Any:
        """The ``sqlite3`` connection under ``conn`` (in its transaction), for the task path's
        statements (``store_sqlite.py``); None on other databases."""
        return conn.connection.dbapi_connection if self._driver_sql else None

    def transaction(self) -> Any:
        """:meth:`_tx` for modules that keep tables of their own here (service/blobs/index.py)."""
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
