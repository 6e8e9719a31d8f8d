"""The event bus between service replicas: RabbitMQ (aio-pika) when there are several.

One service process keeps its routing state in memory: which endpoints are connected to it,
which client sessions watch which tasks. Several replicas behind one URL share the database,
but an endpoint is connected to one replica and the client that waits for its results maybe to
another. The bus carries the *news* between them; the database stays the only truth:

* ``ep.<endpoint id>``: work was stored for an endpoint (``refill``: the ids of the new tasks,
  which that replica sends at once if the endpoint has room), a frame must reach it
  (``frame``: a stop, an audit record, a start request), tasks were cancelled (``cancel``), it
  must be disconnected (``close``), or it connected elsewhere (``takeover``). Bound by the
  replica that holds the endpoint's WebSocket.
* ``user.<user id>``: results were stored (``results``: ids; the receiver reads them from the
  database) or tasks changed state (``status``). Bound by every replica with a client session of
  that user.

Events are hints, not payloads: losing one delays news and never loses work or results. Each
replica re-reads the database when the broker reconnects and at a slow interval (see
:meth:`tether.service.relay.Relay.reconcile`), and tasks and results live in the database.
Messages are acknowledged after the relay has acted on them, in order, one at a time.

Publishing never makes the relay wait: an event joins an outbox, and one task sends what has
gathered there, merging events of one kind for one target (the ids of many result frames
become one message). Awaiting the broker per event capped a replica at ~100 tasks/s: every
publish waits its turn on the channel, behind every other frame of a busy loop.

Without a broker (the embedded default), :class:`LocalBus` does nothing: everything is in one
process already.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack

log = logging.getLogger("tether.service.bus")

EXCHANGE = "tether.events"
#: events whose data is a list of items (ids, states): merged in the outbox, cut to this many
LIST_KINDS = frozenset({"results", "status", "cancel", "refill"})
MAX_EVENT_ITEMS = 10_000
Handler = Callable[[str, str, Any], Awaitable[None]]  # (kind, target id, data)


def endpoint_key(endpoint_id: str) -> str:
    return f"ep.{endpoint_id}"


def user_key(user_id: str) -> str:
    return f"user.{user_id}"


class LocalBus:
    """One process: nobody else to tell."""

    remote = False

    def __init__(self, replica_id: str | None = None):
        self.replica_id = replica_id or "local"

    async def start(self, handler: Handler, on_reconnect: Callable[[], Awaitable[None]]) -> None:
        return None

    async def bind(self, key: str) -> None:
        return None

    async def unbind(self, key: str) -> None:
        return None

    async def publish(self, key: str, kind: str, target: str, data: Any = None) -> bool:
        return True

    async def close(self) -> None:
        return None


class RabbitBus:
    """Replicas talking through a RabbitMQ topic exchange, each with its own exclusive queue.

    The connection is aio-pika's robust one: after a broker restart it reconnects, declares
    the queue again with its bindings, and then ``on_reconnect`` lets the relay catch up on
    whatever news was lost meanwhile (read from the database).
    """

    remote = True

    def __init__(self, url: str, replica_id: str | None = None, prefetch: int = 512):
        self.url = url
        self.replica_id = replica_id or uuid.uuid4().hex[:12]
        self.prefetch = prefetch
        self._connection: Any = None
        self._exchange: Any = None
        self._queue: Any = None
        self._inbox: asyncio.Queue[Any] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        #: events waiting to be sent, (routing key, kind) -> (target, items); list kinds are merged
        self._outbox: dict[tuple[str, str], tuple[str, list[Any]]] = {}
        self._seq = itertools.count()
        self._ready = asyncio.Event()
        self._bound: set[str] = set()
        self.published = 0
        self.publish_failures = 0
        self.received = 0

    async def start(self, handler: Handler, on_reconnect: Callable[[], Awaitable[None]]) -> None:
        import aio_pika

        self._connection = await aio_pika.connect_robust(
            self.url, client_properties={"connection_name": f"tether-service-{self.replica_id}"})

        async def reconnected(*_args: Any) -> None:
            log.warning("reconnected to the message broker; catching up on news from the database")
            asyncio.get_running_loop().create_task(on_reconnect())

        self._connection.reconnect_callbacks.add(reconnected)
        # no publisher confirms: events are hints (see the module docstring), and a confirm per
        # event would put the broker's round trip on every frame the relay handles
        channel = await self._connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=self.prefetch)
        self._exchange = await channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
        # one queue per process: a replica restarted with the same id must not wait for the broker to
        # notice that its previous connection is dead (the queue is exclusive to that connection)
        self._queue = await channel.declare_queue(f"tether.replica.{self.replica_id}.{uuid.uuid4().hex[:8]}",
                                                  exclusive=True, auto_delete=True)
        await self._queue.consume(self._inbox.put_nowait)
        self._worker = asyncio.get_running_loop().create_task(self._work(handler))
        self._sender = asyncio.get_running_loop().create_task(self._send_outbox())
        log.info("replica %s connected to the message broker", self.replica_id)

    async def _work(self, handler: Handler) -> None:
        """Act on events in arrival order; acknowledge each once acted on."""
        while True:
            message = await self._inbox.get()
            self.received += 1
            try:
                event = msgpack.unpackb(message.body, raw=False)
                if event.get("o") != self.replica_id:  # our own news was acted on when it was sent
                    await handler(event["k"], event["t"], event.get("d"))
            except Exception:  # noqa: BLE001 - one bad event must not stop the others
                log.exception("acting on a bus event failed")
            with contextlib.suppress(Exception):  # a channel lost meanwhile: the broker redelivers
                await message.ack()

    async def bind(self, key: str) -> None:
        if key not in self._bound:
            self._bound.add(key)
            await self._queue.bind(self._exchange, routing_key=key)

    async def unbind(self, key: str) -> None:
        if key in self._bound:
            self._bound.discard(key)
            with contextlib.suppress(Exception):  # gone with the connection: nothing to undo
                await self._queue.unbind(self._exchange, routing_key=key)

    async def publish(self, key: str, kind: str, target: str, data: Any = None) -> bool:
        """Queue an event for the other replicas (sent by :meth:`_send_outbox`, soon)."""
        slot = (key, kind)
        if kind in LIST_KINDS and slot in self._outbox:
            self._outbox[slot][1].extend(data)  # ids and states of one kind for one target: one message
        else:
            if slot in self._outbox:  # a frame, a close, ...: each its own message, in order
                slot = (key, f"{kind}#{next(self._seq)}")
            self._outbox[slot] = (target, list(data) if kind in LIST_KINDS else [data])
        self._ready.set()
        return True

    async def _send_outbox(self) -> None:
        """Send what gathered in the outbox, merged; a message the broker cannot take now is
        dropped (the reconciliation covers it) and counted."""
        import aio_pika

        while True:
            await self._ready.wait()
            self._ready.clear()
            outbox, self._outbox = self._outbox, {}
            for (key, slot_kind), (target, items) in outbox.items():
                kind = slot_kind.split("#", 1)[0]
                chunks = [items[i : i + MAX_EVENT_ITEMS] for i in range(0, len(items), MAX_EVENT_ITEMS)] \
                    if kind in LIST_KINDS else [items]
                for chunk in chunks:
                    data = chunk if kind in LIST_KINDS else chunk[0]
                    body = msgpack.packb({"o": self.replica_id, "k": kind, "t": target, "d": data},
                                         use_bin_type=True)
                    try:
                        await self._exchange.publish(aio_pika.Message(body), routing_key=key)
                    except Exception as exc:  # noqa: BLE001 - broker down: news waits for the reconciliation
                        self.publish_failures += 1
                        log.warning("could not publish '%s' for %s on the message broker: %s", kind, key, exc)
                    else:
                        self.published += 1

    async def close(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
        if self._worker is not None:
            self._worker.cancel()
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()


def make_bus(broker_url: str | None, replica_id: str | None = None) -> LocalBus | RabbitBus:
    """The bus for a service: RabbitMQ when a ``broker_url`` is configured, else none."""
    if not broker_url:
        return LocalBus(replica_id)
    if not broker_url.startswith(("amqp://", "amqps://")):
        raise ValueError(f"broker_url must be an amqp:// or amqps:// URL (RabbitMQ), not {broker_url!r}")
    return RabbitBus(broker_url, replica_id)
