"""The statements on every task's path, said to SQLite's driver directly (the embedded default).

A submission's insert and a result's update are the two statements every task costs the store.
Through SQLAlchemy Core each paid more in Python than SQLite took to run it (a one-task insert
~120 µs against ~77 µs through the driver, a result's select and update ~150 µs against ~45),
on the service's one event loop, in the middle of the round trip. Here they are plain SQL on
the connection's ``sqlite3`` handle, inside the same transaction (:meth:`Database._tx` begins
and commits it): the same rows, the same guards (``OR IGNORE`` on the id, ``t_done IS NULL``),
prepared once by the driver's statement cache. PostgreSQL keeps the SQLAlchemy statements (a
network round trip there dwarfs the Python).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .database import chunks

#: the columns a submitted task's row is written with, in this order (``retried`` is a Python-side
#: default in tables.py: SQLAlchemy wrote it, so this does too)
TASK_COLUMNS = ("id", "owner_id", "endpoint_id", "function_id", "group_id", "state", "payload", "spec", "uec",
                "inputs", "keep_over", "t_received", "t_waiting", "retried")
_INSERT = f"INSERT OR IGNORE INTO tasks ({', '.join(TASK_COLUMNS)}) VALUES ({', '.join('?' * len(TASK_COLUMNS))})"
#: a result, stored unless the task has one already (the same guard as store._STORE_RESULT)
_STORE_RESULT = ("UPDATE tasks SET state = ?, payload = NULL, result = ?, error = ?, "
                 "t_dispatched = coalesce(?, t_dispatched), t_running = coalesce(?, t_running), t_done = ? "
                 "WHERE id = ? AND t_done IS NULL")


_DELETED_ONE = "SELECT 1 FROM endpoints WHERE id = ? AND deleted_at IS NOT NULL"


class Raced(Exception):
    """Another writer inserted rows between our look and our insert: the caller does it again the
    general way (one service process owns an SQLite store, so this is for safety, not a path)."""


def _in(n: int) -> str:
    return ", ".join("?" * n)


def _ids_among(db: Any, sql: str, ids: Sequence[str]) -> set[str]:
    """The ids ``sql`` selects (its ``{}`` is the IN list) among ``ids``, a chunk at a time."""
    found: set[str] = set()
    for chunk in chunks(ids):
        found.update(r[0] for r in db.execute(sql.format(_in(len(chunk))), chunk))
    return found


def deleted_endpoints(db: Any, endpoint_ids: Sequence[str]) -> set[str]:
    """Those of ``endpoint_ids`` whose endpoint was deleted (unknown ids are not)."""
    if len(endpoint_ids) == 1:  # every task of a submission for one endpoint: one primary-key probe
        return set(endpoint_ids) if db.execute(_DELETED_ONE, endpoint_ids).fetchone() else set()
    return _ids_among(db, "SELECT id FROM endpoints WHERE id IN ({}) AND deleted_at IS NOT NULL", endpoint_ids)


def existing(db: Any, ids: Sequence[str]) -> dict[str, str]:
    """{task id: owner} of the tasks among ``ids`` that are stored."""
    found: dict[str, str] = {}
    for chunk in chunks(ids):
        found.update(db.execute(f"SELECT id, owner_id FROM tasks WHERE id IN ({_in(len(chunk))})", chunk))
    return found


def insert_tasks(db: Any, rows: list[tuple[Any, ...]]) -> set[str]:
    """Insert task rows (``TASK_COLUMNS`` order) whose id is not stored; returns the ids inserted."""
    stored = existing(db, [r[0] for r in rows])
    fresh, seen = [], set()
    for r in rows:
        if r[0] not in stored and r[0] not in seen:
            seen.add(r[0])
            fresh.append(r)
    if fresh and db.executemany(_INSERT, fresh).rowcount != len(fresh):
        raise Raced
    return seen


def insert_all_fresh(db: Any, rows: list[tuple[Any, ...]]) -> bool:
    """Insert task rows (``TASK_COLUMNS`` order) in one statement, with no look first; True if
    every row was inserted (none was stored before: the common case, a first submission).
    False if one was (a resubmission after a reconnect, an id taken) or ids repeat: the caller
    rolls back and takes the way that tells those apart (:func:`insert_tasks`)."""
    if len({r[0] for r in rows}) != len(rows):
        return False
    return bool(db.executemany(_INSERT, rows).rowcount == len(rows))


def store_all_open(db: Any, params: list[tuple[Any, ...]]) -> bool:
    """Store results (as :func:`store_results`) with no look first; True if each one's task was
    still open, so each was stored (the common case). False if one's task had a result already
    (the guard left it alone) or ids repeat: the caller rolls back and looks first."""
    if len({p[-1] for p in params}) != len(params):
        return False
    return bool(db.executemany(_STORE_RESULT, params).rowcount == len(params))


def open_among(db: Any, ids: Sequence[str]) -> set[str]:
    """The tasks among ``ids`` that have no result yet."""
    return _ids_among(db, "SELECT id FROM tasks WHERE id IN ({}) AND t_done IS NULL", ids)


def store_results(db: Any, params: list[tuple[Any, ...]]) -> None:
    """Store results: (state, result, error, dispatched, running, done, id) each."""
    db.executemany(_STORE_RESULT, params)
