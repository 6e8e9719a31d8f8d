"""``/v1/endpoints``: register (or rotate the credential of) an endpoint, list and read them, set
a multi-user endpoint's policy, list its user endpoints, stop and delete."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Depends, HTTPException

from tether.protocol import CLOSE_CREDENTIAL_ROTATED

from ..context import Services, services
from ..models import (
    EndpointAction,
    EndpointCredential,
    EndpointInfo,
    EndpointPolicy,
    EndpointRegistration,
    PathId,
    UserConfigSchema,
    UserEndpointInfo,
)
from ..models import error_responses as _errors
from ..registry import EndpointIdTaken
from ..relay import Relay
from .auth import current_user

router = APIRouter()


async def own_endpoint(svc: Services, endpoint_id: str, user: str, admitted: bool = False) -> dict[str, Any]:
    """The endpoint if ``user`` owns it (or, with ``admitted``, may send it tasks); else 404."""
    ep = await svc.db.get_endpoint(endpoint_id)
    if ep is None or not (ep["owner_id"] == user or (admitted and await svc.relay.admits(user, ep))):
        raise HTTPException(404, f"unknown endpoint {endpoint_id}")
    if ep["deleted_at"] is not None:
        raise HTTPException(404, f"unknown endpoint {endpoint_id}: it was deleted")
    return ep


def endpoint_info(relay: Relay, ep: dict[str, Any]) -> EndpointInfo:
    """An endpoint as the API shows it: live status from its session here, else its stored status."""
    session = relay.endpoints.get(ep["id"])
    status = session.status if session else (json.loads(ep["status"]) if ep.get("status") else {})
    return EndpointInfo(
        endpoint_id=ep["id"], name=ep["name"], online=relay.is_online(ep), last_seen=ep.get("last_seen"),
        status={k: v for k, v in status.items() if k not in ("online", "replica")},
    )


@router.post("/v1/endpoints", response_model=EndpointCredential, tags=["endpoints"], responses=_errors(400, 404, 409))
async def register_endpoint(body: EndpointRegistration, user: str = Depends(current_user),
                            svc: Services = Depends(services)) -> EndpointCredential:
    """Register a new endpoint, or rotate the credential of one of yours (``endpoint_id``):
    the old credential stops working and its connection is closed at once."""
    try:
        eid, secret = await svc.db.register_endpoint(user, body.name, body.endpoint_id, body.multi_user)
    except KeyError:
        raise HTTPException(404, f"unknown endpoint {body.endpoint_id}; omit endpoint_id to register a new "
                                 "endpoint") from None
    except EndpointIdTaken:
        raise HTTPException(409, f"endpoint id {body.endpoint_id} is not yours to use (another user's, or "
                                 "deleted); omit endpoint_id to register a new endpoint") from None
    if body.endpoint_id:
        await svc.relay.disconnect_endpoint(eid, CLOSE_CREDENTIAL_ROTATED, "this endpoint's credential was rotated")
    return EndpointCredential(endpoint_id=eid, secret=secret)


@router.get("/v1/endpoints", response_model=list[EndpointInfo], tags=["endpoints"], responses=_errors())
async def list_endpoints(user: str = Depends(current_user), svc: Services = Depends(services)) -> list[EndpointInfo]:
    return [endpoint_info(svc.relay, ep) for ep in await svc.db.list_endpoints(user)]


@router.get("/v1/endpoints/{endpoint_id}", response_model=EndpointInfo, tags=["endpoints"], responses=_errors(404))
async def get_endpoint(endpoint_id: PathId, user: str = Depends(current_user),
                       svc: Services = Depends(services)) -> EndpointInfo:
    return endpoint_info(svc.relay, await own_endpoint(svc, endpoint_id, user, admitted=True))


@router.get("/v1/endpoints/{endpoint_id}/status", response_model=EndpointInfo, tags=["endpoints"],
            responses=_errors(404))
async def endpoint_status(endpoint_id: PathId, user: str = Depends(current_user),
                          svc: Services = Depends(services)) -> EndpointInfo:
    return endpoint_info(svc.relay, await own_endpoint(svc, endpoint_id, user, admitted=True))


@router.put("/v1/endpoints/{endpoint_id}/policy", response_model=EndpointPolicy, tags=["endpoints"],
            responses=_errors(400, 404, 409))
async def set_policy(endpoint_id: PathId, body: EndpointPolicy, user: str = Depends(current_user),
                     svc: Services = Depends(services)) -> EndpointPolicy:
    """Who may send tasks to your endpoint: for a multi-user endpoint, which users (and what they
    may pass); for any endpoint, which identities (its authentication policy)."""
    ep = await own_endpoint(svc, endpoint_id, user)
    if not ep.get("multi_user") and (body.public or body.users or body.user_config_schema):
        raise HTTPException(409, f"endpoint {endpoint_id} is not a multi-user endpoint; only those admit other users "
                                 "(an authentication policy alone may be set on any endpoint)")
    await svc.db.set_policy(endpoint_id, body.model_dump())
    await svc.relay.enforce_policy(endpoint_id)
    session = svc.relay.endpoints.get(endpoint_id)
    if session is not None:  # connected here: its next submissions are checked against the new policy
        session.authentication = body.authentication.model_dump() if body.authentication else None
    return body


@router.get("/v1/endpoints/{endpoint_id}/user_config_schema", response_model=UserConfigSchema, tags=["endpoints"],
            responses=_errors(404, 409), response_model_by_alias=True)
async def user_config_schema(endpoint_id: PathId, user: str = Depends(current_user),
                             svc: Services = Depends(services)) -> UserConfigSchema:
    """What you may pass as ``user_endpoint_config`` to a multi-user endpoint you may use: the
    JSON Schema its administrator checks values against, and the variables its template uses."""
    ep = await own_endpoint(svc, endpoint_id, user, admitted=True)
    if not ep.get("multi_user"):
        raise HTTPException(409, f"endpoint {endpoint_id} is not a multi-user endpoint; it takes no "
                                 "user_endpoint_config")
    policy = json.loads(ep["policy"]) if ep.get("policy") else {}
    return UserConfigSchema(endpoint_id=endpoint_id, schema=policy.get("user_config_schema"),
                            variables=policy.get("user_config_variables") or [])


@router.get("/v1/endpoints/{endpoint_id}/user_endpoints", response_model=list[UserEndpointInfo],
            tags=["endpoints"], responses=_errors(404))
async def user_endpoints(endpoint_id: PathId, user: str = Depends(current_user),
                         svc: Services = Depends(services)) -> list[UserEndpointInfo]:
    """The user endpoint processes of a multi-user endpoint: all of them for its owner, your own
    for anyone else it admits."""
    ep = await own_endpoint(svc, endpoint_id, user, admitted=True)
    owner_view = ep["owner_id"] == user
    rows = await svc.db.user_endpoints(endpoint_id, None if owner_view else user)
    return [UserEndpointInfo(endpoint_id=r["id"], user=await svc.db.user_name(r["owner_id"]) if owner_view else None,
                             local_user=r["local_user"] if owner_view or r["owner_id"] == user else None,
                             online=svc.relay.is_online(r), config=json.loads(r["user_config"] or "{}"))
            for r in rows]


@router.post("/v1/endpoints/{endpoint_id}/stop", response_model=EndpointAction, tags=["endpoints"],
             responses=_errors(404))
async def stop_endpoint(endpoint_id: PathId, user: str = Depends(current_user),
                        svc: Services = Depends(services)) -> EndpointAction:
    await own_endpoint(svc, endpoint_id, user)
    return EndpointAction(endpoint_id=endpoint_id, stop_sent=await svc.relay.stop_endpoint(endpoint_id))


@router.delete("/v1/endpoints/{endpoint_id}", response_model=EndpointAction, tags=["endpoints"],
               responses=_errors(404))
async def delete_endpoint(endpoint_id: PathId, user: str = Depends(current_user),
                          svc: Services = Depends(services)) -> EndpointAction:
    """Delete an endpoint for good: it is stopped, its id is never issued again, and its
    open tasks fail with an error that says the endpoint was deleted."""
    await own_endpoint(svc, endpoint_id, user)
    failed = await svc.relay.delete_endpoint(endpoint_id)
    return EndpointAction(endpoint_id=endpoint_id, deleted=True, tasks_failed=failed)
