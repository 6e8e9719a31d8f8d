"""The news service replicas pass each other over the bus (``bus.py``), as typed records.

Each event is a :class:`msgspec.Struct` tagged with its kind (``t``) and carrying the bus version
(``v``), like the frames of :mod:`tether.protocol`: it is decoded once, where it enters, into
the record its tag names, and the receiver (:meth:`tether.service.relay.Relay.on_event`)
matches on its type. Replicas of one deployment run one version; a replica of another version
(or an old untagged message) is refused in words and logged, never misread.

Small tasks and results travel in their events (``offer``, ``result_items``): a replica that
re-read each batch from the database put two reads on every task that crossed replicas. What is
larger is named by id, and the database stays the only truth either way.

Events name their target: an endpoint (``ep.<id>``, heard by the replica that holds its
WebSocket), a replica (``replica.<id>``: tasks for the endpoints it holds, in one message), a
user (``user.<id>``, heard by every replica with a client of that user). Events are hints:
losing one delays news and never loses work (see ``bus.py``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import msgspec
from msgspec import Struct

from tether.protocol import Result, Task, wire_size

#: bumped when an event changes shape; replicas of one deployment run one version
BUS_VERSION = 2
#: a task or result at most this large (``wire_size``) travels in its event; a larger one is
#: named by id and read from the database by the receiver. Bounds a merged message (10,000
#: items) to ~40 MB, and keeps the broker out of the data plane.
INLINE_BYTES = 4096


def inline(item: Task | Result) -> bool:
    """Whether a task or result is small enough to travel in an event (saves the receiver a read)."""
    return wire_size(item) <= INLINE_BYTES


def endpoint_key(endpoint_id: str) -> str:
    """The routing key of an endpoint's news."""
    return f"ep.{endpoint_id}"


def replica_key(replica_id: str) -> str:
    """The routing key of news for one replica (bound by it alone)."""
    return f"replica.{replica_id}"


def user_key(user_id: str) -> str:
    """The routing key of a user's news."""
    return f"user.{user_id}"


class Event(Struct, tag_field="t", kw_only=True):
    """Base of every event: its tag ``t``, the bus version ``v``, and the replica that sent it
    (``origin``, filled in by the bus: a replica acted on its own news when it sent it)."""

    v: int = BUS_VERSION
    origin: str = ""
    #: the list field the bus merges for events of one kind and target (None: sent one by one)
    merged: ClassVar[str | None] = None

    @property
    def key(self) -> str:
        raise NotImplementedError


class EndpointEvent(Event):
    """News for the replica holding an endpoint's connection."""

    endpoint_id: str

    @property
    def key(self) -> str:
        return endpoint_key(self.endpoint_id)


class UserEvent(Event):
    """News for the replicas holding a user's client sessions."""

    user_id: str

    @property
    def key(self) -> str:
        return user_key(self.user_id)


class Refill(EndpointEvent, tag="refill"):
    """Tasks were stored for the endpoint: sent at once if it has room, else paged in order."""

    ids: list[str]
    merged: ClassVar[str | None] = "ids"


class OwnedTask(Struct, array_like=True):
    """A stored task and its owner, as an :class:`Offered` event carries it."""

    owner: str
    task: Task


class Offered(EndpointEvent, tag="offer"):
    """Small tasks were stored for the endpoint, carried whole: the replica holding it offers
    them as it does its own submissions (sent at once if it has room, else queued), without
    reading them back. Larger ones travel as a :class:`Refill`."""

    tasks: list[OwnedTask]
    merged: ClassVar[str | None] = "tasks"


class OfferedTo(Event, tag="offer_to"):
    """Small tasks for endpoints that one replica holds (as the sender last read it): one message
    per batch for all of them, not one per endpoint (a batch spread over 100 endpoints was ~50
    messages). The receiver offers those it holds and forwards the others as :class:`Offered`."""

    replica: str
    tasks: list[OwnedTask]
    merged: ClassVar[str | None] = "tasks"

    @property
    def key(self) -> str:
        return replica_key(self.replica)


class CancelOn(EndpointEvent, tag="cancel"):
    """Tasks of the endpoint were cancelled: never sent if still queued, killed if running."""

    ids: list[str]
    merged: ClassVar[str | None] = "ids"


class Forward(EndpointEvent, tag="frame"):
    """An encoded frame for the endpoint (a stop, an audit record)."""

    frame: bytes


class StartUser(EndpointEvent, tag="start_user"):
    """The multi-user endpoint (``endpoint_id``) is to start one of its user endpoints."""

    user_endpoint_id: str


class Close(EndpointEvent, tag="close"):
    """The endpoint's connection is to be closed with this WebSocket code and reason."""

    code: int
    reason: str


class Takeover(EndpointEvent, tag="takeover"):
    """The endpoint connected to ``replica``: a connection of it held elsewhere is stale."""

    replica: str


class StatusChanged(UserEvent, tag="status"):
    """Tasks of the user changed state: ``[task id, state, unix time]`` each."""

    updates: list[tuple[str, str, float]]
    merged: ClassVar[str | None] = "updates"


class ResultsStored(UserEvent, tag="results"):
    """Results of the user's tasks were stored (the receiver reads them from the database)."""

    ids: list[str]
    merged: ClassVar[str | None] = "ids"


class ResultsPushed(UserEvent, tag="result_items"):
    """Small results of the user's tasks were stored, carried whole: the receiver pushes them
    without reading them back (larger ones travel as :class:`ResultsStored`)."""

    results: list[Result]
    merged: ClassVar[str | None] = "results"


ReplicaEvent = (Refill | Offered | OfferedTo | CancelOn | Forward | StartUser | Close | Takeover | StatusChanged
                | ResultsStored | ResultsPushed)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(ReplicaEvent)


class EventError(ValueError):
    """A bus message this replica cannot read (another version, or not an event)."""


def encode_event(event: Event) -> bytes:
    return _encoder.encode(event)


def decode_event(body: bytes) -> ReplicaEvent:
    """The event in a bus message; :class:`EventError` if it is not one of this version's."""
    try:
        event = _decoder.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise EventError(f"a bus message that is not an event of bus version {BUS_VERSION} (a replica of "
                         f"another version?): {exc}") from None
    if event.v != BUS_VERSION:
        raise EventError(f"a '{tag_of(event)}' event of bus version {event.v}, not {BUS_VERSION}: replicas of "
                         "one deployment must run one version")
    return event


def tag_of(event: Event) -> str:
    """An event's kind, as it travels (and as the relay counts it)."""
    return str(event.__struct_config__.tag)


def items_of(event: Event) -> list[Any] | None:
    """The list a mergeable event carries (None for the others)."""
    return None if event.merged is None else getattr(event, event.merged)


def with_items(event: Event, items: list[Any]) -> Event:
    """A copy of a mergeable event carrying ``items`` instead."""
    assert event.merged is not None
    return msgspec.structs.replace(event, **{event.merged: items})
