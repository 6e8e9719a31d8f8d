"""The one wire protocol that the client, the service and the endpoint all speak.

Every WebSocket frame is a binary msgpack map ``{"v": PROTOCOL_VERSION, "t": <type>, ...}``.
Keeping the message types, the task states and the frame codec in this single module means
the three components cannot drift apart: a change here is a change everywhere.

Records carried inside frames are plain dicts (not classes) because msgpack encodes them
directly and the hot path (thousands of tasks per second) cannot afford per-record objects.
Their keys are documented on the ``*_KEYS`` tuples below.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import msgpack

#: Bumped on any incompatible change to frames or records. Peers refuse other versions in words.
PROTOCOL_VERSION = 1

#: Largest frame a peer accepts unless the service announces otherwise (bytes).
DEFAULT_MAX_FRAME = 256 * 1024 * 1024


class Msg(StrEnum):
    """Frame types. Direction is noted as C (client), S (service), E (endpoint)."""

    WELCOME = "welcome"  # S->C, S->E: session accepted, with limits and identity
    ERROR = "error"  # any direction: a request was refused; carries "message" and maybe "ref"
    # client data plane
    SUBMIT = "submit"  # C->S: {"ref", "tasks": [TASK], "functions": {fid: bytes}}
    SUBMIT_ACK = "submit_ack"  # S->C: {"ref", "accepted": [ids], "rejected": {id: message}}
    SUBSCRIBE = "subscribe"  # C->S: {"ids": [...]}: push me state changes and results of these
    CANCEL = "cancel"  # C->S and S->E: {"ids": [...]}
    STATUS = "status"  # S->C: {"updates": [[id, state, ts], ...]}
    RESULT = "result"  # S->C: {"results": [RESULT]}; E->S: the same, results to store
    COLLECTED = "collected"  # C->S: {"ids": [...]}: results handed to the user; retention starts
    # endpoint data plane
    HELLO = "hello"  # E->S: {"versions", "inflight": [ids], "spooled": [ids]}
    TASKS = "tasks"  # S->E: {"tasks": [TASK], "functions": {fid: bytes}}
    RECEIVED = "received"  # E->S: {"ids": [...], "ts": float}: tasks are in the endpoint's hands
    RUNNING = "running"  # E->S: {"ids": [...], "ts": float}: tasks started
    RESULT_ACK = "result_ack"  # S->E: {"ids": [...]}: results are stored; drop them from the spool
    HEARTBEAT = "heartbeat"  # E->S: {"capacity": {...}, "versions": {...}}
    STOP = "stop"  # S->E: the owner asked the endpoint to shut down


class TaskState(StrEnum):
    """The life of a task, in order. Every transition is stored with a timestamp."""

    RECEIVED = "received"
    WAITING = "waiting-for-endpoint"
    DISPATCHED = "dispatched"
    RUNNING = "running"
    SUCCESS = "success"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_STATES = frozenset({TaskState.SUCCESS, TaskState.FAILED, TaskState.CANCELLED})

#: A task as it travels client -> service -> endpoint.
#: id: client-made uuid (so resubmission after a reconnect is idempotent); function: content hash;
#: endpoint; payload: serialized (args, kwargs); group: task group id; spec: resource specification;
#: uec: user endpoint config.
TASK_KEYS = ("id", "function", "endpoint", "payload", "group", "spec", "uec")

#: A result as it travels endpoint -> service -> client.
#: id; state: success | failed | cancelled; data: serialized return value (success) or exception
#: (failed, when picklable); error: {"type", "message", "traceback"} for failed/cancelled;
#: times: {state: ts} transitions seen by the endpoint.
RESULT_KEYS = ("id", "state", "data", "error", "times")


class ProtocolError(ValueError):
    """A frame that cannot be understood; the message says what is wrong with it."""


def encode(msg_type: Msg | str, **fields: Any) -> bytes:
    """Pack one frame."""
    fields["v"] = PROTOCOL_VERSION
    fields["t"] = str(msg_type)
    return msgpack.packb(fields, use_bin_type=True)


def decode(frame: bytes | str) -> dict[str, Any]:
    """Unpack and check one frame, raising :class:`ProtocolError` with a readable reason."""
    if isinstance(frame, str):
        raise ProtocolError("text frame received; Tether frames are binary msgpack maps")
    try:
        msg = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"frame is not valid msgpack ({type(exc).__name__}: {exc})") from None
    if not isinstance(msg, dict):
        raise ProtocolError(f"frame must be a msgpack map, got {type(msg).__name__}")
    version = msg.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {version!r} is not supported (this side speaks {PROTOCOL_VERSION}); "
            "upgrade the older of client, service and endpoint"
        )
    msg_type = msg.get("t")
    try:
        Msg(msg_type)
    except ValueError:
        raise ProtocolError(f"unknown message type {msg_type!r}") from None
    return msg


def require(msg: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    """Fetch a field of a decoded frame, raising ProtocolError if missing or of the wrong type."""
    value = msg.get(key)
    if not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ProtocolError(f"'{msg.get('t')}' frame needs field '{key}' of type {expected}")
    return value


# WebSocket routes and close codes, shared so both sides agree.
CLIENT_WS_PATH = "/v1/ws/client"
ENDPOINT_WS_PATH = "/v1/ws/endpoint"
CLOSE_AUTH_FAILED = 4401
CLOSE_PROTOCOL = 4400
CLOSE_STOPPED = 4000
