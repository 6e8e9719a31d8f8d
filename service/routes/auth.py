"""Who is asking: the bearer-token dependency every REST route uses, and ``/v1/whoami``."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Request

from ..context import Services, services
from ..guard import bearer
from ..models import WhoAmI
from ..models import error_responses as _errors

router = APIRouter()


async def current_user(request: Request, svc: Services = Depends(services)) -> str:
    """Authenticate. Async on purpose: sync dependencies run in a thread pool, and the store's
    single connection must only be used from the event loop."""
    token = bearer(request.headers.get("authorization"))
    if not token:
        raise HTTPException(401, "missing credentials: send 'Authorization: Bearer <token>'")
    user = await svc.authenticator.user_for(token)
    if user is None:
        raise HTTPException(401, "invalid token: it is unknown to this service, was revoked, or has expired")
    return user


@router.get("/v1/whoami", response_model=WhoAmI, tags=["auth"], responses=_errors())
async def whoami(user: str = Depends(current_user), svc: Services = Depends(services)) -> WhoAmI:
    return WhoAmI(user_id=user, name=await svc.db.user_name(user))
