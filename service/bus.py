"""The event bus between service replicas: RabbitMQ (aio-pika) when there are several.

One service process keeps its routing state in memory: which endpoints are connected to it,
which client sessions watch which tasks. Several replicas behind one URL share the database,
but an endpoint is connected to one replica and the client that waits for its results maybe to
another. The bus carries the *news* between them; the database stays the only truth:

* ``ep.<endpoint id>``: work was stored for an endpoint (``Offered``: small tasks whole, which
  that replica offers as its own submissions; ``Refill``: the ids of larger ones, read back), a frame must reach it
  (``Forward``: a stop, an audit record), one of its user endpoints is to be started
  (``StartUser``), tasks were cancelled (``CancelOn``), it must be disconnected (``Close``), or
  it connected elsewhere (``Takeover``). Bound by the replica that holds the endpoint's WebSocket.
* ``user.<user id>``: results were stored (``ResultsPushed``: small results whole;
  ``ResultsStored``: ids, read back) or tasks changed state (``StatusChanged``). Bound by every
  replica with a client session of that user.
* ``replica.<replica id>``: small tasks for the endpoints one replica holds (``OfferedTo``),
  one message per batch; bound by that replica.

The events are typed records (:mod:`tether.service.replica_events`), each tagged with its kind
and the bus version: a replica decodes them in one place and matches on their type.

Events are hints: losing one delays news and never loses work or results (small tasks and
results ride in their events to spare the receiver a read, but each was stored first). Each
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

from .replica_events import Event, ReplicaEvent, decode_event, encode_event, items_of, tag_of, with_items

log = logging.getLogger("tether.service.bus")

EXCHANGE = "tether.events"
#: mergeable events (lists of ids or states) carry at most this many items per message
MAX_EVENT_ITEMS = 10_000
Handler = Callable[[ReplicaEvent], Awaitable[None]]


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

    async def publish(self, event: Event) -> bool:
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
        #: events waiting to be sent, (routing key, kind) -> event; mergeable kinds are merged
        self._outbox: dict[tuple[str, str], Event] = {}
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
        await self._queue.consume(self._arrived)
        self._worker = asyncio.get_running_loop().create_task(self._work(handler))
        self._sender = asyncio.get_running_loop().create_task(self._send_outbox())
        log.info("replica %s connected to the message broker", self.replica_id)

    async def _arrived(self, message: Any) -> None:
        """Hand a delivery to :meth:`_work`, in order.

        A coroutine on purpose: aio-pika warns about a plain callback on *every* delivery, and
        builds that warning's text first, with the repr of the bound method's queue: every
        message waiting in the inbox, pretty-printed. Under load that was quadratic, and took 90%
        of a busy replica's event loop (py-spy, bench_replicas.py, 2 replicas).
        """
        self._inbox.put_nowait(message)

    async def _work(self, handler: Handler) -> None:
        """Act on events in arrival order; acknowledge each once acted on."""
        while True:
            message = await self._inbox.get()
            self.received += 1
            try:
                event = decode_event(message.body)
                if event.origin != self.replica_id:  # our own news was acted on when it was sent
                    await handler(event)
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

    async def publish(self, event: Event) -> bool:
        """Queue an event for the other replicas (sent by :meth:`_send_outbox`, soon)."""
        key, kind = event.key, tag_of(event)
        slot = (key, kind)
        items = items_of(event)
        queued = self._outbox.get(slot)
        if items is not None and queued is not None:
            items_of(queued).extend(items)  # type: ignore[union-attr]  # one kind, one target: one message
        else:
            if queued is not None:  # a frame, a close, ...: each its own message, in order
                slot = (key, f"{kind}#{next(self._seq)}")
            # a mergeable event is copied: what later events add must not touch the caller's list
            self._outbox[slot] = event if items is None else with_items(event, list(items))
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
            for (key, _slot), event in outbox.items():
                items = items_of(event)
                parts = [event] if items is None else [
                    with_items(event, items[i : i + MAX_EVENT_ITEMS]) for i in range(0, len(items), MAX_EVENT_ITEMS)]
                for part in parts:
                    part.origin = self.replica_id
                    body = encode_event(part)
                    try:  # not mandatory: news for an endpoint no replica holds (yet) is dropped, not
                        # returned to us and logged as an error by aiormq (its replica reads the store)
                        await self._exchange.publish(aio_pika.Message(body), routing_key=key, mandatory=False)
                    except Exception as exc:  # noqa: BLE001 - broker down: news waits for the reconciliation
                        self.publish_failures += 1
                        log.warning("could not publish '%s' for %s on the message broker: %s", tag_of(part), key,
                                    exc)
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
