"""The REST API's request and response models: what ``/openapi.json`` documents.

Ids are checked here against the one definition in :mod:`tether.ids` (a malformed id is a 422
naming the field, before any route runs), and every error answer a route can give is
declared with :func:`error_responses`, so the OpenAPI document describes the service exactly
(``tests/test_fuzz.py`` holds it to that).
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import Path
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from tether.ids import FUNCTION_ID_PATTERN, ID_PATTERN, NAME_PATTERN
from tether.protocol import MAX_BATCH, MAX_IDS

#: the largest user config schema a multi-user endpoint may publish
MAX_SCHEMA_BYTES = 64 * 1024

#: standard base64 (RFC 4648, padded): what the payload fields must be
BASE64_PATTERN = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
Base64Str = Annotated[str, Field(pattern=BASE64_PATTERN)]
IdStr = Annotated[str, Field(pattern=ID_PATTERN)]
FunctionIdStr = Annotated[str, Field(pattern=FUNCTION_ID_PATTERN)]
PathId = Annotated[str, Path(pattern=ID_PATTERN)]
PathFunctionId = Annotated[str, Path(pattern=FUNCTION_ID_PATTERN)]


def _json_integer(value: Any) -> Any:
    """JSON Schema's integer: any number without a fractional part (``922.0`` is one), never a string
    or a boolean; strict mode alone would refuse ``922.0``, lax mode would take ``"922"``."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


#: an integer as JSON Schema means it, inside a strict :class:`Body`
JsonInt = Annotated[int, BeforeValidator(_json_integer)]


class Body(BaseModel):
    """A request body: values must have the documented JSON type (``0`` is not ``false``, ``"1"`` is
    not ``1``), as the OpenAPI document says; a client sending the wrong type hears so (422) instead
    of having its value reinterpreted."""

    model_config = ConfigDict(strict=True)


class ErrorDetail(BaseModel):
    """Every error the service itself raises: what is wrong, in words."""

    detail: str


class WhoAmI(BaseModel):
    user_id: str
    name: str | None


class EndpointRegistration(Body):
    name: str = Field(min_length=1, max_length=128, pattern=NAME_PATTERN)
    endpoint_id: IdStr | None = Field(default=None, description="re-register (rotate the credential of) this endpoint "
                                      "of yours; omit to register a new endpoint (the service makes its id)")
    multi_user: bool = Field(default=False, description="a multi-user endpoint: runs each admitted user's tasks "
                             "in a user endpoint process under that user's local account")


class AuthenticationPolicy(Body):
    """Which identities may send an endpoint tasks (see service/authentication_policy.py)."""

    allowed_domains: list[Annotated[str, Field(max_length=255)]] = Field(
        default_factory=list, max_length=100, description="identities must be user@one-of-these (or a subdomain)")
    max_session_age_s: float | None = Field(default=None, gt=0, description="identities must have signed in within "
                                                                              "this many seconds")


class EndpointPolicy(Body):
    """Who may send tasks to a multi-user endpoint (its owner always may)."""

    public: bool = Field(default=False, description="every user of this service")
    users: list[Annotated[str, Field(max_length=255)]] = Field(default_factory=list, max_length=10_000,
                                                               description="user names or ids")
    user_config_schema: dict[str, Any] | None = Field(
        default=None, description="the JSON Schema a user's user_endpoint_config must satisfy (shown to the users "
                                  "the policy admits)")
    user_config_variables: list[Annotated[str, Field(max_length=255)]] = Field(
        default_factory=list, max_length=1000, description="the variables the user config template uses")
    authentication: AuthenticationPolicy | None = Field(
        default=None, description="which identities may send tasks (any endpoint, not only multi-user ones)")

    @field_validator("user_config_schema")
    @classmethod
    def _bounded(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and len(json.dumps(value)) > MAX_SCHEMA_BYTES:
            raise ValueError(f"a user config schema is at most {MAX_SCHEMA_BYTES} bytes of JSON")
        return value


class UserConfigSchema(BaseModel):
    """What a user may pass as ``user_endpoint_config`` to a multi-user endpoint."""

    endpoint_id: str
    schema_: dict[str, Any] | None = Field(alias="schema", serialization_alias="schema",
                                           description="the JSON Schema the values must satisfy (null: none given)")
    variables: list[str] = Field(description="the variables the endpoint's user config template uses")

    model_config = {"populate_by_name": True}


class UserEndpointInfo(BaseModel):
    endpoint_id: str
    user: str | None = Field(description="the user it serves (shown to the multi-user endpoint's owner)")
    local_user: str | None = Field(description="the local account it runs as (shown to its owner)")
    online: bool
    config: dict[str, Any]


class EndpointCredential(BaseModel):
    endpoint_id: str
    secret: str = Field(description="the endpoint's own credential; keep it in a 0600 file")


class EndpointInfo(BaseModel):
    endpoint_id: str
    name: str
    online: bool
    last_seen: float | None
    status: dict[str, Any]


class EndpointAction(BaseModel):
    endpoint_id: str
    stop_sent: bool | None = None
    deleted: bool | None = None
    tasks_failed: int | None = None


class FunctionRegistration(Body):
    function: Base64Str = Field(description="base64 of the serialized function (tether.serialize)")


class FunctionInfo(BaseModel):
    function_id: str


class TaskInfo(BaseModel):
    task_id: str
    state: str
    endpoint_id: str
    group_id: str | None
    transitions: dict[str, float]
    result: str | None = Field(default=None, description="base64 of the serialized result, when finished")
    error: dict[str, Any] | None = None
    resource_specification: dict[str, Any] | None = None
    user_endpoint_config: dict[str, Any] | None = None


class TaskIds(Body):
    task_ids: list[IdStr] = Field(max_length=MAX_IDS)


class RestTask(Body):
    task_id: IdStr
    endpoint_id: IdStr
    function_id: FunctionIdStr
    payload: Base64Str = Field(description="base64 of serialized (args, kwargs)")
    group_id: IdStr | None = None
    resource_specification: dict[str, Any] | None = None


class RestBatch(Body):
    tasks: list[RestTask] = Field(max_length=MAX_BATCH)


class RestRefusal(BaseModel):
    code: str = Field(description="a tether.protocol.ErrorCode")
    message: str


class BatchAck(BaseModel):
    accepted: list[str]
    rejected: dict[str, RestRefusal]


class TaskCancelResult(BaseModel):
    task_id: str
    cancelled: bool


class GroupTask(BaseModel):
    task_id: str
    state: str


class GroupInfo(BaseModel):
    group_id: str
    tasks: list[GroupTask]


class DashboardInfo(BaseModel):
    """What the dashboard draws (see service/dashboard.py): bounded, whatever the user has run."""

    user: str
    user_id: str
    now: float
    endpoints: list[EndpointInfo]
    open_counts: dict[str, int] = Field(description="your open tasks by state")
    task_counts: dict[str, int] = Field(description="your most recent tasks (see window) by state")
    window: dict[str, Any] = Field(description="how many recent tasks the figures cover, at most, and since when")
    activity: dict[str, Any] = Field(description="by state, finished and submitted, per step of the last 10 minutes")
    groups: list[dict[str, Any]]
    recent_failures: list[dict[str, Any]]


class Health(BaseModel):
    status: str
    version: str
    protocol: int
    uptime_s: float


class BlobCreate(Body):
    """Declare a blob before sending its bytes: the limits are checked on these figures, so a
    refused upload costs no transfer."""

    size: JsonInt = Field(ge=0, le=2**62, description="exact number of bytes that will be sent")
    digest: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$", description=(
        "hex BLAKE3 digest of those bytes; the upload is refused if they hash to anything else. Omitted: "
        "declared at the end of the upload instead (the body of `PUT /v1/blobs/{blob_id}` is then the "
        "bytes followed by their 64-character hex digest), so the uploader hashes while it sends"))
    task_id: IdStr | None = Field(default=None, description="endpoints only: the task whose result this is (a "
                                  "task dispatched to the endpoint and still open)")

    @model_validator(mode="before")
    @classmethod
    def _no_sha256(cls, value: Any) -> Any:
        """An uploader written for protocol 2 declared ``sha256``: told what to send instead, rather
        than having the field ignored and its upload refused later for a missing digest."""
        if isinstance(value, dict) and "sha256" in value:
            raise ValueError("blobs are named by their BLAKE3 digest since protocol 3: declare `digest` (64 hex "
                             "characters, tether.digest.digest_of) instead of `sha256`, or leave it out and send it "
                             "after the bytes")
        return value


class BlobInfo(BaseModel):
    blob_id: str
    size: int
    digest: str = Field(description=(
        "hex BLAKE3 digest of the bytes; empty until they are uploaded when it was not declared"))
    state: str = Field(description="reserved (declared, no bytes yet), uploading, or complete")


_DESCRIPTIONS = {
    400: "The request body is not valid JSON, or not valid base64 where base64 is due; or an upload broke off",
    403: "The request is not one this kind of caller may make (a user or an endpoint)",
    401: "Missing, unknown or revoked token",
    404: "No such object visible to you",
    413: "The declared blob is larger than this service accepts (its max blob size)",
    409: "The id is taken (by another user, or by something deleted), or the endpoint is not of the kind the "
         "request needs; or a blob's bytes differ from its declared size or digest, or are not all there yet",
    429: "A per-user limit of this service is reached (the message names it: open tasks, or stored blob bytes); "
         "try again once some of your tasks have finished",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error answers a route gives (401 for every authenticated route)."""
    return {code: {"model": ErrorDetail, "description": _DESCRIPTIONS[code]} for code in sorted({401, *codes})}
