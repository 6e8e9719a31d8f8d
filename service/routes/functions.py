"""``/v1/functions``: register a function body (its id is its hash, computed here) and look one up."""

from __future__ import annotations

import base64
import binascii

from fastapi import APIRouter, Depends, HTTPException

from tether.serialize import function_id

from ..context import Services, services
from ..models import FunctionInfo, FunctionRegistration, PathFunctionId
from ..models import error_responses as _errors
from ..submission import function_quota_message
from .auth import current_user

router = APIRouter()


def b64(text: str, what: str) -> bytes:
    """Bytes sent as base64 in a JSON body (400 if they are not)."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(400, f"'{what}' must be base64") from None


@router.post("/v1/functions", response_model=FunctionInfo, tags=["functions"], responses=_errors(400, 429))
async def register_function(body: FunctionRegistration, user: str = Depends(current_user),
                            svc: Services = Depends(services)) -> FunctionInfo:
    raw = b64(body.function, "function")
    fid = function_id(raw)  # the id is the hash of the body, computed here, never taken from the caller
    quota = svc.settings.function_quota_bytes
    if await svc.db.add_functions(user, {fid: raw}, quota):
        raise HTTPException(429, function_quota_message(fid, len(raw), quota))
    return FunctionInfo(function_id=fid)


@router.get("/v1/functions/{function_id}", response_model=FunctionInfo, tags=["functions"], responses=_errors(404))
async def get_function(function_id: PathFunctionId, user: str = Depends(current_user),
                       svc: Services = Depends(services)) -> FunctionInfo:
    if await svc.db.get_function(user, function_id) is None:
        raise HTTPException(404, f"unknown function {function_id}")
    return FunctionInfo(function_id=function_id)
