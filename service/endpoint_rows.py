"""Endpoint rows a replica has read lately, so a submission does not read them once per frame.

A submission checks the endpoint each of its tasks is for (owner, deleted, online, versions).
An endpoint connected to this process answers from its session; one connected to another
replica was read from the database once per submit frame and endpoint: with 100 endpoints over
two replicas, 50 SELECTs for every frame, through the same few store threads that commit
results (py-spy on bench_replicas.py: a tenth of a replica's store time).

The memory is a cache of the database, never a truth of its own: a row is kept ROW_TTL_S at
most, dropped at once on the replica that deletes the endpoint, and used only with several
replicas (one process reads what it does not hold as before). A copy may still say "not
deleted" for up to ROW_TTL_S after another replica deleted the endpoint; what makes that safe
is the store, not this module: the INSERT of a submission's tasks checks in its own transaction
that their endpoints are not deleted, holding their rows against a concurrent delete
(:meth:`tether.service.store.Store.insert_tasks`), so a stale copy costs a refusal in words,
never a task stored for a deleted endpoint (which would never end). Only ordinary endpoints are
kept: the rows of multi-user endpoints and their user endpoints carry a policy, which is read
fresh every time.
"""

from __future__ import annotations

import time
from typing import Any

#: how long a row read from the database answers for it (online state and versions included)
ROW_TTL_S = 1.0


class EndpointRows:
    """endpoint id -> (row, when read), for ordinary endpoints read from the store lately."""

    def __init__(self, db: Any, ttl: float = ROW_TTL_S):
        self.db = db
        self.ttl = ttl
        self._rows: dict[str, tuple[dict[str, Any], float]] = {}
        self.hits = 0
        self.reads = 0

    async def get(self, endpoint_id: str) -> dict[str, Any] | None:
        """The endpoint's row (None: no such endpoint), from memory while fresh."""
        now = time.monotonic()
        kept = self._rows.get(endpoint_id)
        if kept is not None and now - kept[1] < self.ttl:
            self.hits += 1
            return kept[0]
        self.reads += 1
        row = await self.db.get_endpoint(endpoint_id)
        if row is not None and not row.get("multi_user") and not row.get("parent_id"):
            if len(self._rows) > 100_000:  # bounded whatever the callers ask for
                self._rows.clear()
            self._rows[endpoint_id] = (row, time.monotonic())
        else:
            self._rows.pop(endpoint_id, None)
        return row

    def forget(self, endpoint_id: str) -> None:
        """The endpoint changed (deleted, re-registered): read it again next time."""
        self._rows.pop(endpoint_id, None)
