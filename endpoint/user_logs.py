"""User endpoint logs: what a user endpoint, and everything it starts, prints.

The multi-user endpoint (root) keeps each user endpoint's output in a file only the
administrator reads. The user's code decides how much it prints, so the file is not handed to
the child: the child writes into a pipe, and this module keeps what comes out of it

* within ``max_bytes`` per file: past that the file is renamed to ``NAME.1`` (replacing the
  previous one) and a new one is started, so a flood costs at most twice the cap on disk;
* at no more than ``bytes_per_s`` on average: past that the pipe is not read for a while, the
  pipe fills and the flooding processes block on their own writes. They slow themselves; the
  multi-user endpoint's loop, which serves every other user, spends a bounded share on them.

Tails for error messages are read from the end of the file (and the previous one, when the
current is new), never the whole file.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any, cast

#: bytes read from the end of a log for its last lines
TAIL_BYTES = 16 * 1024


def open_private(path: Path, text: bool = False) -> Any:
    """Open a file to append to that only this account reads (0600, also when it existed with
    other bits): a user endpoint's log, unbuffered bytes; the audit log, ``text``."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "a") if text else os.fdopen(fd, "ab", buffering=0)


class UserLog(asyncio.Protocol):
    """The reading end of one user endpoint's output pipe, written to a capped, rotated file."""

    def __init__(self, path: Path, max_bytes: int, bytes_per_s: int):
        self.path = path
        self.max_bytes = max_bytes
        self.bytes_per_s = bytes_per_s
        self._file = open_private(path)
        self._size = self._file.tell() if path.exists() else 0
        self._budget = float(bytes_per_s)  # a token bucket: one second's worth of burst
        self._refilled = 0.0
        self._transport: asyncio.ReadTransport | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a read transport, but not necessarily a subclass of asyncio's (uvloop's is not)
        self._transport = cast(asyncio.ReadTransport, transport)
        self._refilled = asyncio.get_running_loop().time()

    def data_received(self, data: bytes) -> None:
        self._write(data)
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._budget = min(float(self.bytes_per_s), self._budget + (now - self._refilled) * self.bytes_per_s)
        self._refilled = now
        self._budget -= len(data)
        if self._budget < 0 and self._transport is not None:
            self._transport.pause_reading()  # the writers block on a full pipe until we read again
            loop.call_later(-self._budget / self.bytes_per_s, self._resume)

    def _resume(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def _write(self, data: bytes) -> None:
        if len(data) > self.max_bytes:
            data = data[-self.max_bytes :]
        if self._size + len(data) > self.max_bytes:
            self._file.close()
            os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            self._file = open_private(self.path)
            self._size = 0
        self._file.write(data)
        self._size += len(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._file.close()
        self._transport = None
        if not self.closed.done():
            self.closed.set_result(None)


async def keep_output(read_fd: int, path: Path, max_bytes: int, bytes_per_s: int) -> UserLog:
    """Start keeping what arrives on ``read_fd`` (a pipe's reading end, now owned here) in ``path``."""
    loop = asyncio.get_running_loop()
    _, protocol = await loop.connect_read_pipe(lambda: UserLog(path, max_bytes, bytes_per_s),
                                               os.fdopen(read_fd, "rb", buffering=0))
    return protocol


def tail(path: Path, lines: int = 5) -> str:
    """The last lines of a user endpoint's log, read from its end (and its previous file's, when
    the current one was just started), joined with `` | ``."""
    text = ""
    for candidate in (path, path.with_name(path.name + ".1")):
        try:
            with open(candidate, "rb") as fh:
                fh.seek(max(0, os.fstat(fh.fileno()).st_size - TAIL_BYTES))
                text = fh.read(TAIL_BYTES).decode(errors="replace") + text
        except OSError:
            continue
        if len(text.strip().splitlines()) >= lines:
            break
    if not text.strip():
        return "(no log)"
    return " | ".join(text.strip().splitlines()[-lines:])
