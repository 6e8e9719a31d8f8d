"""``/v1/tasks``, ``/v1/batch_status`` and ``/v1/task_groups``: the REST way to submit, read and
cancel tasks (the WebSocket is the fast way; both go through the same relay)."""

from __future__ import annotations

import base64
import json
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request

from tether.protocol import ErrorCode, Submit, Task, to_builtins

from ..context import Services, services
from ..guard import bearer
from ..models import (
    BatchAck,
    GroupInfo,
    GroupTask,
    PathId,
    RestBatch,
    RestRefusal,
    TaskCancelResult,
    TaskIds,
    TaskInfo,
)
from ..models import error_responses as _errors
from ..store import row_to_result, transitions
from .auth import current_user
from .functions import b64

router = APIRouter()


def task_info(row: Any) -> TaskInfo:  # callers flush deferred states first
    res = row_to_result(row)
    return TaskInfo(
        task_id=row.id, state=row.state, endpoint_id=row.endpoint_id, group_id=row.group_id,
        transitions=transitions(row),
        result=base64.b64encode(row.result).decode() if row.result else None,
        error=to_builtins(res.error) if res.error else None,
        resource_specification=json.loads(row.spec) if row.spec else None,
        user_endpoint_config=json.loads(row.uec) if row.uec else None,
    )


@router.post("/v1/tasks", response_model=BatchAck, tags=["tasks"], responses=_errors(400, 429))
async def submit_batch(body: RestBatch, request: Request, user: str = Depends(current_user),
                       svc: Services = Depends(services)) -> BatchAck:
    tasks = [Task(id=t.task_id, endpoint=t.endpoint_id, function=t.function_id, payload=b64(t.payload, "payload"),
                  group=t.group_id, spec=t.resource_specification) for t in body.tasks]
    ack = await svc.relay.submit(None, user, Submit(ref=0, tasks=tasks),
                                 token=bearer(request.headers.get("authorization")) or "")
    quota = [v.message for v in ack.rejected.values() if v.code == ErrorCode.QUOTA_EXCEEDED]
    if quota and not ack.accepted:  # nothing taken, for a per-user limit: a 429 the caller can back off on
        raise HTTPException(429, quota[0])
    rejected = {k: RestRefusal(code=v.code.value, message=v.message) for k, v in ack.rejected.items()}
    return BatchAck(accepted=ack.accepted, rejected=rejected)


@router.get("/v1/tasks/{task_id}", response_model=TaskInfo, tags=["tasks"], responses=_errors(404))
async def get_task(task_id: PathId, user: str = Depends(current_user), svc: Services = Depends(services)) -> TaskInfo:
    await svc.relay.flush_deferred()
    rows = await svc.db.get_tasks(user, [task_id])
    if not rows:
        raise HTTPException(404, f"unknown task {task_id}")
    return task_info(rows[0])


@router.post("/v1/batch_status", response_model=dict[str, TaskInfo], tags=["tasks"], responses=_errors(400))
async def batch_status(body: TaskIds, user: str = Depends(current_user),
                       svc: Services = Depends(services)) -> dict[str, TaskInfo]:
    await svc.relay.flush_deferred()
    return {r.id: task_info(r) for r in await svc.db.get_tasks(user, body.task_ids)}


@router.post("/v1/tasks/{task_id}/cancel", response_model=TaskCancelResult, tags=["tasks"], responses=_errors(404))
async def cancel_task(task_id: PathId, user: str = Depends(current_user),
                      svc: Services = Depends(services)) -> TaskCancelResult:
    if not await svc.db.get_tasks(user, [task_id]):
        raise HTTPException(404, f"unknown task {task_id}")
    return TaskCancelResult(task_id=task_id, cancelled=bool(await svc.relay.cancel(user, [task_id])))


@router.get("/v1/task_groups/{group_id}", response_model=GroupInfo, tags=["tasks"], responses=_errors())
async def get_group(group_id: PathId, user: str = Depends(current_user),
                    svc: Services = Depends(services)) -> GroupInfo:
    await svc.relay.flush_deferred()
    rows = await svc.db.group_task_ids(user, group_id)
    return GroupInfo(group_id=group_id, tasks=[GroupTask(task_id=r.id, state=r.state) for r in rows])
