"""The dashboard: a static page (``dashboard.html``) and the figures it draws.

The page signs in with the user's token (kept in the browser tab's sessionStorage, sent as a
Bearer header; ``tether dashboard`` prints a link that carries it in the URL fragment, which
never reaches a server) and renders ``GET /v1/dashboard`` every few seconds: live charts of the
user's tasks by state, throughput and queue depth, endpoints with their workers' use, task
groups with their progress, and failures whose traceback is one click away.

What it costs the service is bounded whatever the user has run: the figures come from the
user's ``WINDOW`` most recent tasks (one index range read) and their open tasks (the partial
index of open tasks), computed here in one pass over at most ``WINDOW`` rows.
"""

from __future__ import annotations

import bisect
import itertools
from collections import Counter, defaultdict
from importlib import resources
from typing import Any

#: the most recent tasks the dashboard looks at
WINDOW = 5000
#: what the charts span, and in how many steps
SPAN_S = 600.0
STEPS = 60
#: states whose counts are drawn over time, in the order they follow
OPEN_STATES = ("waiting", "dispatched", "running")
FINISHED_STATES = ("success", "failed", "cancelled")


def page() -> str:
    """The dashboard's HTML (one file: its own CSS and JavaScript, no outside requests)."""
    return resources.files("tether.service").joinpath("dashboard.html").read_text()


def _open_intervals(row: Any) -> list[tuple[str, float, float | None]]:
    """(state, from, until) for the open states a task went through; until None: still in it."""
    marks = [("waiting", row.t_received), ("waiting", row.t_waiting), ("dispatched", row.t_dispatched),
             ("running", row.t_running)]
    marks = [(s, t) for s, t in marks if t is not None]
    out: list[tuple[str, float, float | None]] = []
    for i, (state, start) in enumerate(marks):
        end = marks[i + 1][1] if i + 1 < len(marks) else row.t_done
        if end is not None and end <= start:
            continue
        if out and out[-1][0] == state:  # received, then waiting-for-endpoint: one "waiting" stretch
            out[-1] = (state, out[-1][1], end)
        else:
            out.append((state, start, end))
    return out


def activity(rows: list[Any], now: float, span_s: float = SPAN_S, steps: int = STEPS) -> dict[str, Any]:
    """Tasks by open state at the end of each step of the last ``span_s`` seconds, and tasks
    finished (by outcome) and submitted during each step, from ``rows`` (see Store.recent_tasks)."""
    step = span_s / steps
    ends = [now - span_s + (i + 1) * step for i in range(steps)]
    # state counts: +1 from the first step end inside a stretch, -1 from the first one past it
    delta = {state: [0] * (steps + 1) for state in OPEN_STATES}
    finished = {state: [0] * steps for state in FINISHED_STATES}
    submitted = [0] * steps
    for row in rows:
        for state, start, end in _open_intervals(row):
            first = bisect.bisect_left(ends, start)
            last = bisect.bisect_left(ends, end) if end is not None else steps
            if first < last:
                delta[state][first] += 1
                delta[state][last] -= 1
        if row.t_done is not None and row.state in finished and ends[0] - step < row.t_done <= ends[-1]:
            finished[row.state][min(steps - 1, bisect.bisect_left(ends, row.t_done))] += 1
        if ends[0] - step < row.t_received <= ends[-1]:
            submitted[min(steps - 1, bisect.bisect_left(ends, row.t_received))] += 1
    counts = {state: list(itertools.accumulate(delta[state][:steps])) for state in OPEN_STATES}
    return {"t": ends, "step_s": step, "by_state": counts, "finished": finished, "submitted": submitted}


def groups(rows: list[Any], limit: int = 8) -> list[dict[str, Any]]:
    """The task groups of ``rows`` with the latest submissions, with their counts by state."""
    by_group: dict[str, Counter[str]] = defaultdict(Counter)
    latest: dict[str, float] = {}
    for row in rows:
        gid = row.group_id or "(none)"
        by_group[gid][row.state] += 1
        latest[gid] = max(latest.get(gid, 0.0), row.t_received)
    out = []
    for gid in sorted(latest, key=latest.__getitem__, reverse=True)[:limit]:
        c = by_group[gid]
        out.append({"group_id": gid, "total": sum(c.values()), "last_submitted": latest[gid],
                    "done": sum(c[s] for s in FINISHED_STATES), **{s: c[s] for s in FINISHED_STATES}})
    return out


__all__ = ["WINDOW", "activity", "groups", "page"]
