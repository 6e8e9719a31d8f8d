"""Which endpoint each open task was dispatched to, as this process remembers it.

An endpoint's reports (received, running, a result) apply only to tasks dispatched to it. Asking
the database on every report would cost a SELECT per frame on the path every task takes, so the
relay remembers where it sent each task and asks the store (:meth:`Store.open_task_endpoints`)
only about ids it does not remember: tasks dispatched by another replica or before a restart.

The memory is a cache of a durable fact (``tasks.endpoint_id`` never changes once stored), not
state of its own: losing it costs a query, never a wrong answer. It lives on the event loop,
beside the sessions it serves, and is bounded by what the endpoints hold (flow control), not by
the backlog: queued tasks enter when they are dispatched.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

#: ended tasks remembered (oldest forgotten first): enough to cover a bus message in flight
RECENTLY_ENDED = 100_000


class Routes:
    """Task id -> endpoint id, for open tasks this process dispatched (or looked up)."""

    def __init__(self, remember_ended: bool = False) -> None:
        self._open: dict[str, str] = {}
        #: with several replicas only: one process has no copies of tasks on their way to it
        self._remember_ended = remember_ended
        #: tasks that ended here lately (insertion-ordered, bounded): a task offered by another
        #: replica after it was cancelled, or after its result came back through a page of the
        #: store, is not sent again (the store answered that for re-read tasks; carried ones
        #: are not re-read)
        self._ended: dict[str, None] = {}

    def _end(self, ids: Iterable[str]) -> None:
        if not self._remember_ended:
            return
        ended = self._ended
        for tid in ids:
            ended[tid] = None
        while len(ended) > RECENTLY_ENDED:
            del ended[next(iter(ended))]

    def ended(self, tid: str) -> bool:
        """Whether this task ended here lately (a result, a cancel)."""
        return tid in self._ended

    def unknown(self, ids: Iterable[str]) -> list[str]:
        """The ids this process does not remember (the store is asked about those)."""
        return [i for i in ids if i not in self._open]

    def learn(self, found: dict[str, tuple[str, bool]]) -> None:
        """Remember what the store answered ({id: (endpoint id, open?)}): the open ones."""
        for tid, (endpoint_id, is_open) in found.items():
            if is_open:
                self._open[tid] = endpoint_id

    def split(self, endpoint_id: str, ids: list[str],
              looked_up: dict[str, tuple[str, bool]]) -> tuple[list[str], list[str]]:
        """(open tasks of ``endpoint_id`` among ``ids``, foreign ids), after :meth:`learn`.

        Ids of the endpoint's own finished tasks are in neither (a late report of a cancelled
        task, say); foreign ids name tasks that are not this endpoint's, or do not exist.
        """
        mine, foreign = [], []
        for tid in ids:
            ep = self._open.get(tid)
            if ep is not None:
                (mine if ep == endpoint_id else foreign).append(tid)
            elif looked_up.get(tid, ("", False))[0] != endpoint_id:
                foreign.append(tid)
        return mine, foreign

    def claim(self, mine: list[str], results: list[Any]) -> list[Any]:
        """The results that are the first for their task among ``mine`` (the endpoint's open
        tasks); each task leaves the memory here, so a second result for it is a duplicate."""
        wanted = set(mine)
        fresh = []
        for r in results:
            if r.id in wanted:
                wanted.discard(r.id)  # a second result for the same task in one frame is a duplicate
                if self._open.pop(r.id, None) is not None:
                    fresh.append(r)
        if self._remember_ended:
            self._end(r.id for r in fresh)
        return fresh

    def unclaim(self, endpoint_id: str, results: Iterable[Any]) -> None:
        """Claimed results that were not stored: their tasks are open (and the endpoint's) again."""
        for r in results:
            self._open[r.id] = endpoint_id
            self._ended.pop(r.id, None)

    def track(self, endpoint_id: str, ids: Iterable[str]) -> None:
        """These open tasks were sent to this endpoint: its reports on them need no SELECT."""
        for tid in ids:
            self._open[tid] = endpoint_id

    def held_by(self, endpoint_id: str, ids: Iterable[str]) -> list[str]:
        """Those of ``ids`` that are open tasks dispatched to ``endpoint_id`` (or learned to be
        its): no query; ids an endpoint merely claims are not among them."""
        return [tid for tid in ids if self._open.get(tid) == endpoint_id]

    def forget(self, ids: Iterable[str]) -> None:
        """These tasks ended (a result, a cancel, a failure the service raised itself)."""
        ids = list(ids)
        for tid in ids:
            self._open.pop(tid, None)
        self._end(ids)
