"""Parsl monitoring through Tether: messages ride back to the DataFlowKernel with each result.

Parsl's monitoring wrapper runs around an app *on the worker* and sends what it sees (the try
started and ended, the resource use of the app's process tree) through the executor's
``remote_monitoring_radio``. Parsl's radios need the worker to reach the submitting host (UDP,
ZMQ) or a shared file system; a Tether endpoint may have neither, by design (it only makes
outbound connections to the service). :class:`ResultRadio` needs nothing: on the endpoint its
sender appends each message to a per-task spool file; when the app returns, the messages travel
back inside the task's result; on the submit side the executor puts them into the DFK's
monitoring queue. The price: the monitoring database learns about a try when it ends (with the
right timestamps), not while it runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import struct
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.queues import Queue
from typing import Any

from parsl.monitoring.radios.base import MonitoringRadioReceiver, MonitoringRadioSender, RadioConfig

log = logging.getLogger("tether.parsl")

#: the spool of the task running in this thread; a forked resource monitor inherits it
_current = threading.local()
_HEADER = struct.Struct("!I")


@dataclass
class MonitoredResult:
    """An app's return value plus the monitoring messages its try produced on the endpoint."""

    value: Any
    messages: list[Any] = field(default_factory=list)


class _Spool:
    """An append-only file of length-prefixed pickles, written by the task and its forked monitor."""

    def __init__(self) -> None:
        self.path = os.path.join(tempfile.gettempdir(), f"tether-parsl-monitoring-{uuid.uuid4().hex}")

    def append(self, message: Any) -> None:
        data = pickle.dumps(message)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, _HEADER.pack(len(data)) + data)  # one write per record: O_APPEND keeps records whole
        finally:
            os.close(fd)

    def read(self) -> list[Any]:
        try:
            with open(self.path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return []
        messages, pos = [], 0
        while pos + _HEADER.size <= len(data):
            (size,) = _HEADER.unpack_from(data, pos)
            pos += _HEADER.size
            messages.append(pickle.loads(data[pos:pos + size]))
            pos += size
        return messages

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


@contextlib.contextmanager
def collect_messages() -> Iterator[_Spool]:
    """Make :class:`ResultRadio` senders created in this thread (and its forks) write to a new spool."""
    spool = _Spool()
    _current.spool = spool
    try:
        yield spool
    finally:
        _current.spool = None
        spool.remove()


class _SpoolSender(MonitoringRadioSender):
    def __init__(self, spool: _Spool | None):
        self.spool = spool

    def send(self, message: object) -> None:
        if self.spool is None:
            log.debug("monitoring message outside a Tether task dropped: %r", message)
            return
        self.spool.append(message)


class _Receiver(MonitoringRadioReceiver):
    def shutdown(self) -> None:  # nothing runs on the submit side: results bring the messages
        pass


class ResultRadio(RadioConfig):
    """The ``remote_monitoring_radio`` of :class:`~tether.parsl.TetherExecutor` (see the module doc)."""

    def __init__(self) -> None:
        self.queue: Queue | None = None

    def create_receiver(self, *, run_dir: str, resource_msgs: Queue) -> MonitoringRadioReceiver:
        self.queue = resource_msgs
        return _Receiver()

    def create_sender(self) -> MonitoringRadioSender:
        return _SpoolSender(getattr(_current, "spool", None))

    def deliver(self, messages: list[Any]) -> None:
        """Submit side: hand messages that came back with a result to the DFK's monitoring."""
        if self.queue is None:
            return
        for message in messages:
            self.queue.put(message)

    def __getstate__(self) -> dict[str, Any]:
        # a multiprocessing queue cannot travel (and the endpoint has no use for it)
        return {**self.__dict__, "queue": None}

    def __repr__(self) -> str:
        return "ResultRadio()"
