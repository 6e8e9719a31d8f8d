"""What the endpoint daemon and its engine host (``host.py``) say to each other over the host's
Unix socket: length-prefixed msgpack frames of the records below, typed and validated on decode.

The socket is ``engine.sock`` in the endpoint's directory (mode 0700: only its owner reaches it).
A daemon of a newer release may talk to a host an older one started (a restart after an
upgrade): records only gain fields with defaults, and :data:`WIRE_VERSION` changes when that
is not enough; a daemon that finds a host speaking another version has it stop.
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Generic, TypeVar

import msgspec

from tether.endpoint.execute import TaskSpec
from tether.protocol import Result

#: bumped when a record changes in a way an older host or daemon cannot read
WIRE_VERSION = 1
#: the host's files in the endpoint's directory
SOCKET_NAME, LOCK_NAME, PID_NAME, LOG_NAME = "engine.sock", "engine-host.lock", "engine-host.pid", "engine-host.log"
_LENGTH = struct.Struct(">I")
#: a frame larger than this is a broken peer, not a message (task batches are capped by the daemon)
MAX_FRAME = 1 << 31

T = TypeVar("T")


class HostArgs(msgspec.Struct, frozen=True):
    """How the daemon built the engine: the host builds the same. ``key`` tells a later daemon
    whether a running host was built as it would build one (same config, same release)."""

    config: dict[str, Any]
    allowed_data: list[str] | None
    allowed_functions: list[str] | None
    allowed_plain: list[str] | None  # a plain frozenset allow-list (no Allowlist split)
    retries_on_worker_loss: int
    python_sandbox: bool
    state_dir: str
    key: str


# --- daemon -> host ---------------------------------------------------------------------------------
class Attach(msgspec.Struct, tag="attach"):
    """The first frame of a connection: the daemon's build key and wire version."""

    key: str
    version: int = WIRE_VERSION


class Submit(msgspec.Struct, tag="submit"):
    tasks: list[TaskSpec]


class CancelTasks(msgspec.Struct, tag="cancel"):
    ids: list[str]


class Ack(msgspec.Struct, tag="ack"):
    """The daemon has spooled these results: the host may forget them."""

    ids: list[str]


class AskCapacity(msgspec.Struct, tag="ask_capacity"):
    pass


class Shutdown(msgspec.Struct, tag="shutdown"):
    """A real stop: the host ends every task and block it runs, then exits."""


# --- host -> daemon ---------------------------------------------------------------------------------
class Attached(msgspec.Struct, tag="attached"):
    """The host's answer to :class:`Attach`: what it holds for the daemon."""

    pid: int
    key: str
    version: int
    held: list[str]  # tasks handed to Parsl and not finished (running, or queued in Parsl)
    running: dict[str, float]  # those of them known to run, and since when
    results: list[Result]  # results no daemon has acknowledged yet
    capacity: dict[str, Any]
    failed: str | None = None
    #: the mark in the environment of every process the host's Parsl starts on this host: what
    #: the daemon ends if the host itself dies (engine.py, RUN_MARK)
    run_mark: str | None = None


class Started(msgspec.Struct, tag="started"):
    id: str
    ts: float


class Done(msgspec.Struct, tag="done"):
    results: list[Result]


class Capacity(msgspec.Struct, tag="capacity"):
    figures: dict[str, Any]


class Stopped(msgspec.Struct, tag="stopped"):
    pass


ToHost = Attach | Submit | CancelTasks | Ack | AskCapacity | Shutdown
ToDaemon = Attached | Started | Done | Capacity | Stopped

_encoder = msgspec.msgpack.Encoder()
to_host = msgspec.msgpack.Decoder(ToHost)
to_daemon = msgspec.msgpack.Decoder(ToDaemon)


def frame(message: Any) -> bytes:
    body = _encoder.encode(message)
    return _LENGTH.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> bytes | None:
    """The next frame's body; None at the end of the stream (a partial frame counts as the end:
    its writer died while writing it)."""
    try:
        (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
        if length > MAX_FRAME:
            return None
        return await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


class Gather(Generic[T]):
    """Items bound for the peer, sent as one batch ``delay`` seconds after the first (0: at the end
    of this turn of the event loop), so a burst costs one frame, not one per item. Call on the
    loop."""

    def __init__(self, send: Callable[[list[T]], None], delay: float = 0.0):
        self._send = send
        self._delay = delay
        self._items: list[T] = []
        self._armed = False

    def add(self, items: Iterable[T]) -> None:
        self._items.extend(items)
        if self._items and not self._armed:
            self._armed = True
            loop = asyncio.get_running_loop()
            if self._delay:
                loop.call_later(self._delay, self.flush)
            else:
                loop.call_soon(self.flush)

    def flush(self) -> None:
        """Send what gathered now (a later armed call finds nothing, or what came since)."""
        self._armed = False
        items, self._items = self._items, []
        if items:
            self._send(items)

    def clear(self) -> None:
        """Drop what gathered (it reaches the peer another way)."""
        self._items.clear()


def socket_path(directory: Path) -> tuple[str, int | None]:
    """Where the host's socket is, as a path ``bind``/``connect`` accept (at most 107 bytes): the
    plain path when short enough, else the same file reached through an open descriptor of its
    directory (``/proc/self/fd/N/...``, Linux); the descriptor is returned to be closed later."""
    path = str(directory / SOCKET_NAME)
    if len(os.fsencode(path)) < 100 or not os.path.isdir("/proc/self/fd"):
        return path, None
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    return f"/proc/self/fd/{fd}/{SOCKET_NAME}", fd


__all__ = ["Ack", "AskCapacity", "Attach", "Attached", "CancelTasks", "Capacity", "Done", "Gather", "HostArgs",
           "Started", "Stopped", "Submit", "Shutdown", "ToDaemon", "ToHost", "WIRE_VERSION", "frame", "read_frame",
           "socket_path", "to_daemon", "to_host"]
