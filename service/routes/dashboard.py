"""The dashboard: its page, and ``/v1/dashboard``, the figures it draws for the signed-in user."""

from __future__ import annotations

import json
import time
from collections import Counter

from fastapi import APIRouter, Depends
from fastapi.responses import HTMLResponse

from .. import dashboard
from ..context import Services, services
from ..models import DashboardInfo
from ..models import error_responses as _errors
from .auth import current_user
from .endpoints import endpoint_info

router = APIRouter()


@router.get("/v1/dashboard", response_model=DashboardInfo, tags=["operations"], responses=_errors())
async def dashboard_data(user: str = Depends(current_user), svc: Services = Depends(services)) -> DashboardInfo:
    """What the dashboard shows: your endpoints with their workers, your open tasks, and
    from your most recent tasks (at most ``window``) their states over time, throughput,
    task groups and failures."""
    now = time.time()
    views, db = svc.dashboard_views, svc.db
    cached = views.get(user)
    if cached is not None and now - cached[0] < 1.0:
        return cached[1]
    await svc.relay.flush_deferred()
    rows = await db.recent_tasks(user, dashboard.WINDOW)
    failed = sorted((r for r in rows if r.state == "failed"), key=lambda r: r.t_done or 0, reverse=True)[:20]
    failures = []
    for r in sorted(await db.get_tasks(user, [r.id for r in failed]), key=lambda r: r.t_done or 0, reverse=True):
        error = json.loads(r.error) if r.error else {}
        failures.append({"task_id": r.id, "endpoint_id": r.endpoint_id, "group_id": r.group_id, "ts": r.t_done,
                         "error": f"{error.get('type', '?')}: {str(error.get('message', ''))[:300]}"})
    view = DashboardInfo(
        user=await db.user_name(user) or user, user_id=user, now=now,
        endpoints=[endpoint_info(svc.relay, ep) for ep in await db.list_endpoints(user)],
        open_counts=await db.open_by_state(user), task_counts=dict(Counter(r.state for r in rows)),
        window={"tasks": len(rows), "limit": dashboard.WINDOW,
                "since": rows[-1].t_received if rows else None},
        activity=dashboard.activity(rows, now), groups=dashboard.groups(rows), recent_failures=failures)
    if len(views) > 1000:
        views.clear()
    views[user] = (now, view)
    return view


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
@router.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
async def dashboard_page() -> str:
    return dashboard.page()
