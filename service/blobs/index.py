"""The blob index: the blobs' rows (in the service's store) and their files (on disk).

Everything that decides about a blob without moving its bytes is here: the limits and the
per-user quota checked when it is declared, who may read it, its state through its upload,
which tasks name it, and its deletion when none does any more. The routes
(:mod:`tether.service.blobs.routes`) and the relay (which checks that tasks name only their
owner's blobs) ask it; both reach it through :class:`~tether.service.async_store.AsyncStore`'s
``offload``, so its queries run where the store's do.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from sqlalchemy import and_, bindparam, delete, exists, func, select, update

from tether.ids import child_path
from tether.protocol import Task

from ..models import BlobCreate
from ..store import Store
from ..tables import blobs, task_blobs, tasks
from .arrival import Arrival

DEFAULT_MAX_BLOB = 16 * 1024**3
DEFAULT_QUOTA = 100 * 1024**3
DEFAULT_ORPHAN_S = 3600.0
_STORED_BYTES = select(func.coalesce(func.sum(blobs.c.size), 0)).where(blobs.c.owner_id == bindparam("owner"))

RESERVED, UPLOADING, COMPLETE = "reserved", "uploading", "complete"


@dataclass(frozen=True)
class Principal:
    """Who sent a request: a user, or an endpoint (its store row)."""

    user_id: str | None = None
    endpoint: dict[str, Any] | None = None

    @property
    def uploader(self) -> str:
        return f"user:{self.user_id}" if self.user_id is not None else f"endpoint:{self.endpoint['id']}"  # type: ignore[index]


class BlobIndex:
    """The blobs' rows (in the service's store) and files (in ``root``)."""

    def __init__(self, store: Store, root: Path, max_blob: int = DEFAULT_MAX_BLOB, quota: int = DEFAULT_QUOTA,
                 orphan_s: float = DEFAULT_ORPHAN_S):
        self.store, self.root = store, root
        self.max_blob, self.quota, self.orphan_s = max_blob, quota, orphan_s
        #: uploads under way in this process (one entry per upload in progress)
        self.arriving: dict[str, Arrival] = {}
        #: blobs whose readers wait for their upload to start here (set when it does)
        self.awaited: dict[str, asyncio.Event] = {}
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._drop_interrupted()

    def path(self, blob_id: str, part: bool = False) -> Path:
        path = child_path(self.root, blob_id, "blob id")
        return path.with_name(blob_id + ".part") if part else path

    def _drop_interrupted(self) -> None:
        """Uploads cut short by a restart of the service can never complete: forget them."""
        with self.store.transaction() as conn:
            ids = [r.id for r in conn.execute(select(blobs.c.id).where(blobs.c.state == UPLOADING))]
            conn.execute(delete(blobs).where(blobs.c.state == UPLOADING))
        for blob_id in ids:
            self.path(blob_id, part=True).unlink(missing_ok=True)

    # --- rows ----------------------------------------------------------------------------------
    def get(self, blob_id: str) -> Any:
        with self.store.transaction() as conn:
            return conn.execute(select(blobs).where(blobs.c.id == blob_id)).first()

    def reserve(self, who: Principal, body: BlobCreate) -> Any:
        """Check the limits on the declared size and record the blob (no bytes yet)."""
        owner = who.user_id
        if who.endpoint is not None:
            if body.task_id is None:
                raise HTTPException(403, "an endpoint stores blobs only as task results: give 'task_id'")
            owner = self._result_owner(who.endpoint["id"], body.task_id)
        elif body.task_id is not None:
            raise HTTPException(403, "'task_id' is for endpoints storing a task's result; omit it")
        assert owner is not None
        if body.size > self.max_blob:
            raise HTTPException(413, f"a blob of {body.size} bytes is over this service's limit of {self.max_blob} "
                                     "bytes per blob (--max-blob-bytes)")
        blob_id = str(uuid.uuid4())
        row = {"id": blob_id, "owner_id": owner, "uploader": who.uploader, "size": body.size,
               "digest": body.digest or "",  # none: declared at the end of the upload ("" until then)
               "state": RESERVED, "created_at": time.time(), "linked": body.task_id is not None}
        with self.store.transaction() as conn:
            # the check and the insert are one step (concurrent uploads cannot all fit one gap)
            self.store.lock_owner(conn, owner, "blobs")
            used = int(conn.execute(_STORED_BYTES, {"owner": owner}).scalar_one())
            if used + body.size > self.quota:
                raise HTTPException(429, f"storing {body.size} more bytes would take you over your quota of "
                                         f"{self.quota} stored bytes ({used} in use); wait for results to be "
                                         "collected and expire, or ask the service's operator for a larger "
                                         "--blob-quota-bytes")
            conn.execute(blobs.insert().values(**row))
            if body.task_id is not None:
                conn.execute(task_blobs.insert().values(task_id=body.task_id, blob_id=blob_id, role="result"))
        return self.get(blob_id)

    def _result_owner(self, endpoint_id: str, task_id: str) -> str:
        """The owner of an open task this endpoint holds (else 404: it is not the endpoint's)."""
        owner = self.store.open_task_owner(endpoint_id, task_id) or self.store.kept_result_owner(endpoint_id, task_id)
        if owner is None:
            raise HTTPException(404, f"unknown task {task_id}: no open task with this id is dispatched to this "
                                     "endpoint")
        return owner

    def may_read(self, who: Principal, row: Any) -> bool:
        """Users read their own blobs; endpoints those named by an open task dispatched to them
        (complete or still being uploaded)."""
        if row is None:
            return False
        if who.user_id is not None:
            return row.owner_id == who.user_id
        assert who.endpoint is not None  # the bytes may still be arriving: the download follows them
        with self.store.transaction() as conn:
            return conn.execute(
                select(task_blobs.c.task_id).join(tasks, tasks.c.id == task_blobs.c.task_id)
                .where(and_(task_blobs.c.blob_id == row.id, task_blobs.c.role == "input",
                            tasks.c.endpoint_id == who.endpoint["id"], tasks.c.t_done.is_(None))).limit(1)
            ).first() is not None

    def set_state(self, blob_id: str, state: str, expected: str, digest: str | None = None) -> bool:
        """Move a blob from state ``expected`` to ``state`` (and record the digest its upload
        declared at its end, if given); False if it was not in ``expected``."""
        values = {"state": state} if digest is None else {"state": state, "digest": digest}
        with self.store.transaction() as conn:
            res = conn.execute(update(blobs).where(and_(blobs.c.id == blob_id, blobs.c.state == expected))
                               .values(**values))
        return bool(res.rowcount)

    def forget(self, blob_ids: Iterable[str]) -> None:
        """Delete rows, links and files."""
        ids = list(blob_ids)
        if not ids:
            return
        with self.store.transaction() as conn:
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                conn.execute(delete(task_blobs).where(task_blobs.c.blob_id.in_(chunk)))
                conn.execute(delete(blobs).where(blobs.c.id.in_(chunk)))
        for blob_id in ids:
            self.path(blob_id).unlink(missing_ok=True)
            self.path(blob_id, part=True).unlink(missing_ok=True)

    # --- what the relay asks -------------------------------------------------------------------
    def owned(self, owner: str, blob_ids: Iterable[str]) -> set[str]:
        """Which of these blobs ``owner`` owns (declared: a task may be sent while its arguments
        are still being uploaded, and its endpoint's download follows the upload)."""
        wanted = list(set(blob_ids))
        found: set[str] = set()
        with self.store.transaction() as conn:
            for start in range(0, len(wanted), 500):
                found.update(r.id for r in conn.execute(
                    select(blobs.c.id).where(and_(blobs.c.id.in_(wanted[start : start + 500]),
                                                  blobs.c.owner_id == owner))))
        return found

    def link(self, stored: Iterable[Task]) -> None:
        """Record which stored tasks name which blobs (their lifetime is now the tasks')."""
        rows = [{"task_id": t.id, "blob_id": b, "role": "input"} for t in stored for b in set(t.blobs)]
        if not rows:
            return
        with self.store.transaction() as conn:
            conn.execute(task_blobs.insert(), rows)
            conn.execute(update(blobs).where(blobs.c.id.in_({r["blob_id"] for r in rows})).values(linked=True))

    def is_result_of(self, blob_id: str, task_id: str) -> bool:
        """Whether ``blob_id`` was declared as ``task_id``'s result (complete or being uploaded)."""
        with self.store.transaction() as conn:
            return conn.execute(
                select(task_blobs.c.task_id).join(blobs, blobs.c.id == task_blobs.c.blob_id)
                .where(and_(task_blobs.c.blob_id == blob_id, task_blobs.c.task_id == task_id,
                            task_blobs.c.role == "result")).limit(1)
            ).first() is not None

    def link_inputs(self, blob_id: str, task_ids: Iterable[str]) -> None:
        """Tasks that take another task's result (this blob) as input name it: the endpoint they
        are dispatched to may read it (see ``service/fetches.py``), and it lives as long as they do."""
        with self.store.transaction() as conn:
            have = {r.task_id for r in conn.execute(select(task_blobs.c.task_id).where(
                and_(task_blobs.c.blob_id == blob_id, task_blobs.c.role == "input")))}
            rows = [{"task_id": t, "blob_id": blob_id, "role": "input"} for t in set(task_ids) - have]
            if rows:
                conn.execute(task_blobs.insert(), rows)

    # --- lifetime ------------------------------------------------------------------------------
    def purge(self) -> int:
        """Delete blobs whose tasks are all gone (purged after their retention), and blobs never
        named by a task within ``orphan_s`` (abandoned uploads). Returns how many."""
        cutoff = time.time() - self.orphan_s
        task_exists = exists().where(tasks.c.id == task_blobs.c.task_id)
        with self.store.transaction() as conn:
            conn.execute(delete(task_blobs).where(~task_exists))
            named = exists().where(task_blobs.c.blob_id == blobs.c.id)
            ids = [r.id for r in conn.execute(select(blobs.c.id).where(and_(
                ~named, blobs.c.state != UPLOADING, (blobs.c.linked.is_(True)) | (blobs.c.created_at < cutoff))))]
        self.forget(ids)
        return len(ids)
