"""The one wire protocol that the client, the service and the endpoint all speak.

Every WebSocket frame is a binary msgpack map ``{"t": <type>, "v": PROTOCOL_VERSION, ...}``.
Each frame type is a typed record (a ``msgspec.Struct``), and each receiving side decodes with
the union of the frames its peer may send: a frame is validated once, where it enters (types,
id patterns, list bounds), and no handler ever indexes a raw dict that a peer shaped. The
records are also the encoding, so validation costs nothing extra on the hot path.

Refusals travel as :class:`ErrorCode` values, never as text to be recognised by substring.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from enum import StrEnum
from typing import Annotated, Any, Generic, Literal, TypeVar

import msgspec
from msgspec import Meta, Struct

from .ids import FUNCTION_ID_PATTERN, ID_PATTERN

#: Bumped on any incompatible change to frames or records. Peers refuse other versions in words.
PROTOCOL_VERSION = 3

#: Largest frame a client or an endpoint accepts, and so the most the service sends them (bytes).
DEFAULT_MAX_FRAME = 256 * 1024 * 1024
#: What a frame may hold beyond one task's arguments: the service accepts frames of
#: ``max_payload + FRAME_HEADROOM`` bytes (and says so in its Welcome), so one task of the
#: largest allowed payload, with its function body and record, always fits in a frame.
FRAME_HEADROOM = 1024 * 1024
#: Bytes a frame spends on its envelope (type, version, ref, list headers), beyond its items.
FRAME_ENVELOPE = 4096
#: Bytes one task or result record adds around its bulk fields (ids, keys, timestamps): an
#: upper bound, so that frames sized by :func:`wire_size` never exceed their limit.
ITEM_OVERHEAD = 512
#: Frames are closed at about this size when several items share one (a larger item still goes,
#: alone, up to the frame limit): a big frame holds its connection, and the peer's loop, for long.
TARGET_FRAME = 8 * 1024 * 1024
#: Tasks the service sends an endpoint beyond its workers' number, so that no worker waits for
#: a round trip to the service; the endpoint never holds more than workers + prefetch tasks.
DEFAULT_PREFETCH = 1000
#: Most ids in one frame (subscribe, cancel, collected, received, running, result_ack): a peer
#: splits longer lists, so no single frame can stall a receiver's event loop.
MAX_IDS = 10_000
#: Most tasks or results in one frame.
MAX_BATCH = 10_000
#: Most ids an endpoint reports as held (in flight, and spooled) when it connects: what a daemon
#: sends (it cuts each list here; a task left out is recognised and skipped if sent again). A
#: million made-up ids once stalled the service's loop for seconds and held 160 MiB.
MAX_HELD = MAX_IDS
#: Arguments, results and function bodies larger than this travel as blobs (streamed over HTTP,
#: stored on the service's disk) instead of inside frames; the service announces its own value.
DEFAULT_BLOB_THRESHOLD = 8 * 1024 * 1024
#: Most blobs one task may reference (its arguments and its function body).
MAX_TASK_BLOBS = 8
#: most tasks whose results one task takes as inputs (futures passed as its arguments)
MAX_TASK_INPUTS = 1024


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


class ErrorCode(StrEnum):
    """Why something was refused; the message beside it says it in words."""

    MALFORMED = "malformed"  # the frame does not match the protocol
    INTERNAL = "internal"  # the receiver failed (a bug, logged there); the session goes on
    AUTH_FAILED = "auth_failed"
    UNKNOWN_ENDPOINT = "unknown_endpoint"  # no such endpoint visible to the sender
    ENDPOINT_DELETED = "endpoint_deleted"  # the task's endpoint was deleted by its owner
    UNKNOWN_FUNCTION = "unknown_function"  # not registered by the sender
    FUNCTION_ID_MISMATCH = "function_id_mismatch"  # a function id that is not its body's hash
    UNKNOWN_TASK = "unknown_task"  # never submitted by the sender, or purged
    ID_CONFLICT = "id_conflict"  # the id is already used by another owner
    NOT_DISPATCHED = "not_dispatched"  # an endpoint reported on a task not dispatched to it
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNKNOWN_BLOB = "unknown_blob"  # a task names a blob that is not the submitter's, or not complete
    INVALID_REQUEST = "invalid_request"
    USER_ENDPOINT_FAILED = "user_endpoint_failed"  # a multi-user endpoint could not start the user's endpoint
    QUOTA_EXCEEDED = "quota_exceeded"  # a per-user limit of the service (tasks waiting or running)
    NOT_ADMITTED = "not_admitted"  # a multi-user endpoint's policy no longer admits the user
    BLOB_CORRUPT = "blob_corrupt"  # an upload's bytes are not the size or digest declared (HTTP: see ERROR_HEADER)
    INPUT_FAILED = "input_failed"  # a task this one takes as input failed or was cancelled
    RESULT_LOST = "result_lost"  # a result kept on an endpoint is no longer there (released, expired, evicted)
    ENDPOINT_OFFLINE = "endpoint_offline"  # what was asked for is on an endpoint that is not connected


#: the HTTP response header that names an :class:`ErrorCode` where the status code alone does not
#: say which error it is (a 409 is a corrupt upload or a blob already uploaded)
ERROR_HEADER = "Tether-Error"
#: the digest of the bytes a blob download carries (the service checked them when they arrived)
DIGEST_HEADER = "X-Tether-Digest"


# --- field types ------------------------------------------------------------------------------
Id = Annotated[str, Meta(pattern=ID_PATTERN)]
FunctionId = Annotated[str, Meta(pattern=FUNCTION_ID_PATTERN)]
IdList = Annotated[list[Id], Meta(max_length=MAX_IDS)]
Timestamp = Annotated[float, Meta(ge=0)]
Count = Annotated[int, Meta(ge=0)]
Scalar = int | float | str | bool | None
#: the longest short text field (a message, a name); fit longer text with :func:`fit_short`
SHORT_STR_MAX = 4096
ShortStr = Annotated[str, Meta(max_length=SHORT_STR_MAX)]


def fit_short(text: str, limit: int = SHORT_STR_MAX) -> str:
    """``text`` cut to ``limit`` characters, keeping its start and its end (where a log tail's
    last line is): a message too long for its field is cut, never refused and lost."""
    if len(text) <= limit:
        return text
    marker = " [...] "
    head = (limit - len(marker)) // 2
    return text[:head] + marker + text[len(text) - (limit - len(marker) - head):]
#: a blob's BLAKE3 digest in hex (:mod:`tether.digest`)
Digest = Annotated[str, Meta(pattern=r"^[0-9a-f]{64}$")]
#: a digest, or "" where it is not known yet: a blob whose uploader hashes it while sending and
#: declares its digest at the end of the upload (the service checks it there), a kept result not
#: hashed until it is uploaded
DigestOrLater = Annotated[str, Meta(pattern=r"^([0-9a-f]{64})?$")]


# --- records carried inside frames ------------------------------------------------------------
class Task(Struct, omit_defaults=True):
    """A task as it travels client -> service -> endpoint.

    ``id`` is made by the client (a uuid), so resubmission after a reconnect is idempotent;
    ``function`` is the content hash of its body; ``payload`` the serialized (args, kwargs);
    ``spec`` the resource specification; ``uec`` the user endpoint config.
    """

    id: Id
    function: FunctionId
    endpoint: Id
    payload: bytes
    group: Id | None = None
    spec: dict[str, Any] | None = None
    uec: dict[str, Any] | None = None
    #: C->S: ids of the blobs the payload or the function body refer to (see :class:`BlobRef`);
    #: the service accepts the task only if the submitter owns each, and lets the endpoint the
    #: task is dispatched to read them (endpoints find the blobs in the stubs themselves).
    blobs: Annotated[list[Id], Meta(max_length=MAX_TASK_BLOBS)] = []
    #: ids of tasks whose results this task takes as arguments (``tether.refs.TaskInput`` stands
    #: for each in the payload); the endpoint puts the values in before the call, from its own
    #: kept results where it can, so data computed there never leaves it
    inputs: Annotated[list[Id], Meta(max_length=MAX_TASK_INPUTS)] = []
    #: a result serialized to more bytes than this stays on the endpoint (a kept result); by
    #: default those over the blob threshold. The Dask plugin keeps smaller ones too.
    keep: Count | None = None

    def __post_init__(self) -> None:
        if self.spec is not None:
            _check_plain_data(self.spec, "a resource specification")
        if self.uec is not None:
            _check_plain_data(self.uec, "a user endpoint config")


class ErrorInfo(Struct, omit_defaults=True):
    """What went wrong with a task: the remote exception's type name, message and traceback."""

    type: str
    message: str
    traceback: str = ""
    code: str | None = None  # an ErrorCode when the service or endpoint refused the task


class Result(Struct, omit_defaults=True):
    """A task's outcome as it travels endpoint -> service -> client.

    ``data``: the serialized return value (success) or exception (failed, when it pickles);
    ``times``: ``{state: unix time}`` of the transitions the endpoint saw.
    """

    id: Id
    state: Literal["success", "failed", "cancelled"]
    data: bytes | None = None
    error: ErrorInfo | None = None
    times: Annotated[dict[Annotated[str, Meta(max_length=32)], Timestamp], Meta(max_length=16)] = {}
    #: E (worker -> daemon): the type of a value too large for a frame (see :class:`KeptRef`)
    kind: Annotated[str, Meta(max_length=256)] | None = None


class BlobRef(Struct, array_like=True):
    """Where bytes too large for a frame are: a blob on the service, its size and digest.

    A payload, a result's data or a function body that went as a blob travels in its frame as a
    *stub* (:func:`blob_stub`): a serialization header naming the method ``blob`` and this
    record. The stub is what the service stores and what a function id hashes, so content
    addressing and every size limit of the frames work unchanged; the receiver fetches the
    blob, whose bytes the service checked against this digest as they arrived. An empty digest:
    the uploader declared it at the end of its upload (hashing while it sent, instead of
    before), and the service checked the bytes against it there, before their last byte went to
    any reader.
    """

    id: Id
    size: Count
    digest: DigestOrLater


#: the header of a blob stub: tether.serialize's format, with a method no serializer produces
BLOB_STUB_HEADER = b"tether:1;method=blob\n"
_blob_ref_decoder = msgspec.msgpack.Decoder(BlobRef)


def blob_stub(ref: BlobRef) -> bytes:
    """The bytes that stand, in a frame, for data stored as blob ``ref``."""
    return BLOB_STUB_HEADER + msgspec.msgpack.encode(ref)


def blob_ref_of(data: bytes | None) -> BlobRef | None:
    """The blob a payload, result or function body stands for, or None for inline data.

    A stub that is malformed raises :class:`ProtocolError` (a peer shaped it wrongly)."""
    return _ref_in_stub(data, BLOB_STUB_HEADER, _blob_ref_decoder, "blob reference")


def _ref_in_stub(data: bytes | None, header: bytes, decoder: msgspec.msgpack.Decoder[Any], what: str) -> Any:
    """The record after ``header`` in a stub, or None for data that is no such stub."""
    if not data or not data.startswith(header) or len(data) > 1024:
        return None
    try:
        return decoder.decode(data[len(header):])
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ProtocolError(f"malformed {what}: {exc}") from None


class KeptRef(Struct, array_like=True):
    """A result the endpoint that computed it keeps (``endpoint``), its size and digest.

    A result over the blob threshold stays on its endpoint: its frame carries a *kept stub*
    (:func:`kept_stub`) instead of the bytes. A task on the same endpoint that takes it as an
    input reads it there; anyone else asks for it (``fetch``) and the endpoint uploads it as a
    blob then, once. The stub is what the service stores as the task's result. Its digest is
    empty: the worker writes the result without hashing it (the bytes may never leave the
    endpoint), and the endpoint hashes them when it uploads them, declaring the digest at the
    end of the upload.
    """

    endpoint: Id
    size: Count
    digest: DigestOrLater
    #: the value's type (``module.QualName``), so a proxy can answer ``isinstance`` unfetched
    type: Annotated[str, Meta(max_length=256)] = ""


KEPT_STUB_HEADER = b"tether:1;method=kept\n"
_kept_ref_decoder = msgspec.msgpack.Decoder(KeptRef)


def kept_stub(ref: KeptRef) -> bytes:
    """The bytes that stand, in a result frame, for a result kept on its endpoint."""
    return KEPT_STUB_HEADER + msgspec.msgpack.encode(ref)


def kept_ref_of(data: bytes | None) -> KeptRef | None:
    """The kept result a result's data stands for, or None (inline data or a blob stub)."""
    ref: KeptRef | None = _ref_in_stub(data, KEPT_STUB_HEADER, _kept_ref_decoder, "kept-result reference")
    return ref


class Refusal(Struct):
    """Why one task of a submission was not accepted."""

    code: ErrorCode
    message: str


class EndpointBrief(Struct, omit_defaults=True):
    """Enough about an endpoint for the client to warn, before any task runs, of what will fail."""

    online: bool
    python: str | None = None
    versions: dict[str, str] = {}
    #: with several replicas: the URL of the replica that holds the endpoint's connection, as it
    #: advertises it (``advertise_url``); a client may send that endpoint's tasks there directly
    #: and spare each task a hop between replicas each way (None: no such replica, or no URL)
    service: Annotated[str, Meta(max_length=2048)] | None = None


Capacity = Annotated[dict[Annotated[str, Meta(max_length=64)], Scalar], Meta(max_length=64)]
Versions = Annotated[dict[Annotated[str, Meta(max_length=64)], ShortStr], Meta(max_length=64)]
#: heartbeat figures that must be counts (the dashboard and /metrics add them up)
CAPACITY_COUNTS = ("workers_total", "workers_idle", "tasks_queued", "tasks_running")
#: the most a capacity count may say: more workers than the largest machines have, more tasks
#: than an endpoint may hold; one endpoint's made-up figure must not distort service-wide sums
MAX_CAPACITY_COUNT = 10_000_000


def _check_capacity(capacity: dict[str, Any]) -> None:
    for key in CAPACITY_COUNTS:
        value = capacity.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or not 0 <= value <= MAX_CAPACITY_COUNT):
            raise ValueError(f"capacity '{key}' must be a count from 0 to {MAX_CAPACITY_COUNT:,}, got {value!r}")
    for key, value in capacity.items():  # other figures are shown and summed: plausible numbers only
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**53:
            raise ValueError(f"capacity '{key}' is implausibly large ({value})")


def _check_plain_data(value: Any, what: str) -> None:
    """``value`` must be JSON data (it is stored as JSON and shown): no bytes, no huge integers."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be plain JSON data (strings, numbers, lists, maps): {exc}") from None


# --- frames ----------------------------------------------------------------------------------
class Frame(Struct, tag_field="t", kw_only=True):
    """Base of every frame: the type tag ``t`` and the protocol version ``v``."""

    v: int = PROTOCOL_VERSION


class Welcome(Frame, tag="welcome"):
    """S->C, S->E: the session is accepted; the limits that apply to it.

    ``max_frame``: the largest frame the service accepts (bytes); a peer that sends more is
    disconnected, so peers size their frames by it (:func:`frame_batches`). ``prefetch``
    (to endpoints): how many tasks beyond its workers the service will send it.
    """

    version: str = ""
    user_id: str | None = None
    endpoint_id: str | None = None
    max_payload: int | None = None
    max_ids: int = MAX_IDS
    max_frame: int = DEFAULT_MAX_FRAME
    max_batch: int = MAX_BATCH
    prefetch: int | None = None
    #: payloads above this many bytes go as blobs (None: a service without a blob store)
    blob_threshold: int | None = None


class Error(Frame, tag="error"):
    """Any direction: a request was refused. ``ref``/``ids`` say which; ``fatal``: the session ends."""

    code: ErrorCode = ErrorCode.MALFORMED
    message: str = ""
    ref: int | None = None
    ids: list[str] | None = None
    fatal: bool = False


class Submit(Frame, tag="submit"):
    """C->S: tasks, and the bodies of functions the service does not have yet."""

    ref: int
    tasks: Annotated[list[Task], Meta(max_length=MAX_BATCH)]
    functions: dict[FunctionId, bytes] = {}


class SubmitAck(Frame, tag="submit_ack"):
    """S->C: which tasks of submission ``ref`` are stored (accepted) and which are refused, why."""

    ref: int | None
    accepted: list[str] = []
    rejected: dict[str, Refusal] = {}
    ts: float = 0.0
    endpoints: dict[str, EndpointBrief] = {}


class Subscribe(Frame, tag="subscribe"):
    """C->S: push me state changes and results of these tasks (a reloaded task group)."""

    ids: IdList


class Cancel(Frame, tag="cancel"):
    """C->S and S->E: cancel these tasks."""

    ids: IdList


class Status(Frame, tag="status"):
    """S->C: ``[task id, state, unix time]`` for each change."""

    updates: list[tuple[str, str, float | None]]


class Results(Frame, tag="result"):
    """E->S: results to store; S->C: results of tasks the client watches."""

    results: Annotated[list[Result], Meta(max_length=MAX_BATCH)]


class Collected(Frame, tag="collected"):
    """C->S: results handed to the user; their retention period starts."""

    ids: IdList


class Fetch(Frame, tag="fetch"):
    """Results kept on an endpoint, asked for where they are needed.

    C->S: the data of these tasks' results (the user asked for a value). E->S: the results of
    these tasks, inputs of tasks the endpoint holds that it does not keep itself. S->E: upload
    these kept results as blobs (someone elsewhere needs them). Each is answered by ``fetched``.
    """

    ids: IdList


class Fetched(Frame, tag="fetched"):
    """The answer to ``fetch``: per task, its result's data (inline bytes or a blob stub) or why
    there is none (``result_lost``, ``endpoint_offline``, ``input_failed``, ``unknown_task``)."""

    data: Annotated[dict[Id, bytes], Meta(max_length=MAX_IDS)] = {}
    errors: Annotated[dict[Id, ErrorInfo], Meta(max_length=MAX_IDS)] = {}


class Release(Frame, tag="release"):
    """C->S, S->E: nobody holds these kept results any more; the endpoint may free them."""

    ids: IdList


class Hello(Frame, tag="hello"):
    """E->S, first frame: what the endpoint runs and which tasks it already holds."""

    versions: Versions = {}
    capacity: Capacity = {}
    inflight: Annotated[list[Id], Meta(max_length=MAX_HELD)] = []
    spooled: Annotated[list[Id], Meta(max_length=MAX_HELD)] = []

    def __post_init__(self) -> None:
        _check_capacity(self.capacity)


class Tasks(Frame, tag="tasks"):
    """S->E: tasks to run, and function bodies the endpoint has not been sent yet."""

    tasks: Annotated[list[Task], Meta(max_length=MAX_BATCH)]
    functions: dict[FunctionId, bytes] = {}


class Received(Frame, tag="received"):
    """E->S: these tasks are in the endpoint's hands."""

    ids: IdList
    ts: Timestamp | None = None


class Running(Frame, tag="running"):
    """E->S: these tasks started."""

    ids: IdList
    ts: Timestamp | None = None


class ResultAck(Frame, tag="result_ack"):
    """S->E: these results are stored (or refused for good): drop them from the spool."""

    ids: IdList


class Heartbeat(Frame, tag="heartbeat"):
    """E->S: capacity and versions, every few seconds."""

    capacity: Capacity = {}
    versions: Versions = {}

    def __post_init__(self) -> None:
        _check_capacity(self.capacity)


class Stop(Frame, tag="stop"):
    """S->E: the owner asked the endpoint to shut down."""


# --- multi-user endpoints ----------------------------------------------------------------------
class Identity(Struct):
    """Who submitted: the service's user id and user name (what identity mapping rules see)."""

    id: str
    username: str


class StartUserEndpoint(Frame, tag="start_user_endpoint"):
    """S->E (multi-user endpoint): start (or restart) the user endpoint process
    ``user_endpoint_id`` for ``identity`` with ``config``, authenticated by ``secret`` (a
    credential for that user endpoint only; the multi-user endpoint hands it over on a pipe)."""

    user_endpoint_id: Id
    identity: Identity
    config: dict[str, Any]
    secret: Annotated[str, Meta(max_length=256)]


class UserEndpointStarted(Frame, tag="user_endpoint_started"):
    """E->S: a user endpoint process runs, as this local account."""

    user_endpoint_id: Id
    local_user: ShortStr
    uid: int


class UserEndpointFailed(Frame, tag="user_endpoint_failed"):
    """E->S: a user endpoint could not be started; its waiting tasks fail with ``message``."""

    user_endpoint_id: Id
    message: ShortStr

    def __post_init__(self) -> None:
        # the sender's text (a log tail, say) may be long: the receiver refuses an oversized
        # field, and then the user's tasks would wait forever instead of failing in words
        self.message = fit_short(self.message)


class Audit(Frame, tag="audit"):
    """S->E (multi-user endpoint): task events of its user endpoints, for its audit log:
    ``[user endpoint id, task id, state, unix time]``."""

    events: list[tuple[str, str, str, float]]


# What each side accepts from its peer: anything else is refused as "not a message X may send".
CLIENT_FRAMES = Submit | Subscribe | Cancel | Collected | Fetch | Release
ENDPOINT_FRAMES = (Hello | Received | Running | Results | Heartbeat | UserEndpointStarted | UserEndpointFailed | Fetch
                   | Fetched)
TO_CLIENT_FRAMES = Welcome | Error | SubmitAck | Status | Results | Fetched
TO_ENDPOINT_FRAMES = Welcome | Error | Tasks | Cancel | ResultAck | Stop | StartUserEndpoint | Audit | Fetch | Fetched \
    | Release


class ProtocolError(ValueError):
    """A frame that cannot be understood; the message says what is wrong with it.

    ``ref`` is the frame's ``ref`` when it could still be read, so the refusal names the batch
    it refuses and the sender fails that batch instead of resending it on every reconnect.
    """

    def __init__(self, message: str, ref: int | None = None):
        super().__init__(message)
        self.ref = ref


class _Envelope(Struct):
    """Just the type, version and ref, to explain a frame the full decoder refused."""

    t: Any = None
    v: Any = None
    ref: Any = None


_encoder = msgspec.msgpack.Encoder()
_envelope = msgspec.msgpack.Decoder(_Envelope)


class FrameDecoder:
    """Decodes and validates the frames one peer may send (``sender`` names it in messages)."""

    def __init__(self, frames: Any, sender: str):
        self._decoder = msgspec.msgpack.Decoder(frames)
        self._sender = sender
        self._tags = {cls.__struct_config__.tag for cls in frames.__args__}

    def decode(self, frame: bytes | str | None) -> Any:
        if not isinstance(frame, bytes | bytearray | memoryview):
            raise ProtocolError("text frame received; Tether frames are binary msgpack maps")
        try:
            msg = self._decoder.decode(frame)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise ProtocolError(self._explain(frame, exc), _ref_of(frame)) from None
        if msg.v != PROTOCOL_VERSION:
            raise ProtocolError(_version_message(msg.v))
        return msg

    def _explain(self, frame: bytes, exc: Exception) -> str:
        try:
            env = _envelope.decode(frame)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return f"frame is not a msgpack map ({exc})"
        if env.v != PROTOCOL_VERSION:
            return _version_message(env.v)
        if env.t not in self._tags:
            expected = ", ".join(sorted(self._tags))
            return f"{env.t!r} is not a message {self._sender} may send (expected one of {expected})"
        return f"'{env.t}' frame: {exc}"


def _ref_of(frame: bytes) -> int | None:
    try:
        ref = _envelope.decode(frame).ref
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None
    return ref if isinstance(ref, int) and not isinstance(ref, bool) else None


def _version_message(version: Any) -> str:
    return (f"protocol version {version!r} is not supported (this side speaks {PROTOCOL_VERSION}); "
            "upgrade the older of client, service and endpoint")


def encode(frame: Frame) -> bytes:
    """Pack one frame."""
    return _encoder.encode(frame)


def service_max_frame(max_payload: int) -> int:
    """The largest frame a service with this payload limit accepts (what its Welcome announces)."""
    return max_payload + FRAME_HEADROOM


def _text_size(value: Any) -> int:
    """Encoded bytes of a small nested value (error records, specifications), at most 4/char."""
    return len(_encoder.encode(value)) if value else 0


def wire_size(item: Task | Result) -> int:
    """An upper bound on the bytes a task or result adds to a frame, without encoding its bulk.

    For a :class:`Task` or a :class:`Result`: the bulk bytes (arguments, return value) are
    counted exactly, small nested values by encoding them, the rest by :data:`ITEM_OVERHEAD`.
    """
    if isinstance(item, Task):
        return len(item.payload) + _text_size(item.spec) + _text_size(item.uec) + ITEM_OVERHEAD
    return len(item.data or b"") + _text_size(item.error) + ITEM_OVERHEAD


T = TypeVar("T")


class TooLarge(Generic[T]):
    """An item that fits no frame (see :func:`frame_batches`), and how big it is."""

    __slots__ = ("item", "size", "limit")

    def __init__(self, item: T, size: int, limit: int):
        self.item, self.size, self.limit = item, size, limit

    def message(self, what: str) -> str:
        return (f"{what} needs {self.size} bytes on the wire, over the {self.limit}-byte frame limit of this "
                "connection; it was not sent")


def frame_batches(items: Iterable[T], max_frame: int, max_count: int = MAX_BATCH,
                  size: Callable[[T], int] = wire_size,
                  target: int = TARGET_FRAME) -> Iterator[list[T] | TooLarge[T]]:
    """Cut ``items`` into batches that each fit one frame of ``max_frame`` bytes and
    ``max_count`` items, in order: the one batching rule of every hop. A batch is closed once
    it holds ``target`` bytes; one item larger than that still goes, alone.

    An item that cannot fit any frame comes out alone as :class:`TooLarge`: the caller fails
    it in words (``PAYLOAD_TOO_LARGE``). It is never sent, so no peer refuses a frame and no
    frame is resent forever.
    """
    budget = max_frame - FRAME_ENVELOPE
    target = min(target, budget)
    batch: list[T] = []
    used = 0
    for item in items:
        need = size(item)
        if need > budget:
            if batch:  # in order: what came before it goes first
                yield batch
                batch, used = [], 0
            yield TooLarge(item, need, max_frame)
            continue
        if batch and (used + need > target or len(batch) >= max_count):
            yield batch
            batch, used = [], 0
        batch.append(item)
        used += need
    if batch:
        yield batch


def task_frames(tasks: list[Task], body_of: Callable[[str], bytes | None], max_frame: int,
                max_count: int = MAX_BATCH) -> Iterator[tuple[list[Task], dict[str, bytes]] | TooLarge[Task]]:
    """:func:`frame_batches` for SUBMIT and TASKS frames: each batch comes with the function
    bodies it must carry. A body (``body_of(function id)``, None when the peer has it) travels
    with the first task that uses it and counts in that task's size."""
    carrier: dict[str, tuple[str, bytes]] = {}
    seen: set[str] = set()
    for t in tasks:
        if t.function not in seen:
            seen.add(t.function)
            body = body_of(t.function)
            if body is not None:
                carrier[t.function] = (t.id, body)

    def size(t: Task) -> int:
        carried = carrier.get(t.function)
        return wire_size(t) + (len(carried[1]) if carried is not None and carried[0] == t.id else 0)

    for batch in frame_batches(tasks, max_frame, max_count, size):
        if isinstance(batch, TooLarge):
            yield batch
            continue
        functions = {}
        for t in batch:
            carried = carrier.get(t.function)
            if carried is not None and carried[0] == t.id:
                functions[t.function] = carried[1]
        yield batch, functions


def to_builtins(record: Any) -> Any:
    """A record as plain dicts and lists (for JSON, logs and the REST API)."""
    return msgspec.to_builtins(record)


# WebSocket routes and close codes, shared so both sides agree.
CLIENT_WS_PATH = "/v1/ws/client"
ENDPOINT_WS_PATH = "/v1/ws/endpoint"
CLOSE_AUTH_FAILED = 4401
CLOSE_PROTOCOL = 4400
CLOSE_STOPPED = 4000
CLOSE_CREDENTIAL_ROTATED = 4402  # the endpoint's credential was replaced: reread it and reconnect
CLOSE_TRY_AGAIN = 1013  # the service cannot go on with this session now (database down, replaced): reconnect
