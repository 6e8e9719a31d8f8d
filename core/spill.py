"""Where a value is serialized to before it travels: memory while small, a file once large.

:class:`Spill` sits on every task's path (each argument tuple and each result goes through
one), so it costs nothing until it spills; :func:`hash_and_write` and :func:`write_sliced` are
how large bytes reach a file here and in the service's blob store (in 256 KiB slices: see
``CHUNK``). Uploading what spilled is :mod:`tether.transfer`'s.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .digest import digest_of

#: bytes per slice written to a file, hashed first where it is hashed: small enough to stay in
#: the CPU's cache between the two (on the project's machine a gibibyte costs 0.9 CPU
#: seconds to hash and write in 256 KiB slices, 2.5 s in slices of 1 MiB or more: each byte is
#: then read from memory twice)
CHUNK = 256 * 1024
#: bytes per piece streamed to or from a socket (a blob's upload and download, the service's raw
#: receive and the readers following it): each piece costs a pass through Python, a hand-over
#: of the GIL and a system call or two, so fewer, larger pieces cost less (2026-12-07: a 1 GiB
#: round trip took 12% less CPU in 1 MiB pieces than in ``CHUNK``'s; 2 and 4 MiB no less than
#: 1). Files are still written in ``CHUNK`` slices (see :func:`write_sliced`)
PIECE = 1024 * 1024
#: a ``bytes`` this large that a by-reference Spill is given is kept, not written to its file
BY_REFERENCE_MIN = 1024 * 1024


class Spill(io.RawIOBase):
    """A write-only binary file that stays in memory up to ``threshold`` bytes and moves to
    ``directory/name`` beyond.

    Serializing into it (``tether.serialize.serialize_into``) means a large value exists once
    in memory (the object) and once on disk (its pickle), never twice in memory.

    It sits on every task's path (each argument tuple and each result goes through one), so it
    costs nothing until it spills: no file-system call. ``directory`` may be a callable, resolved
    (and the directory made) only on the first spill; one that names no directory (None) keeps
    the value in memory. Nothing spilled is hashed here: an upload hashes the bytes as it sends
    them (:meth:`BlobClient.send`), in the same pass; a kept result that is never uploaded is
    never hashed. The digest of a small value is computed when asked for.
    """

    def __init__(self, threshold: int, directory: Path | str | Callable[[], Path | str | None],
                 name: str, *, by_reference: bool = False):
        super().__init__()
        self.threshold = threshold
        self._directory = directory
        self.name_in_dir = name
        self.path: Path | None = None
        self._buffer: io.BytesIO | None = io.BytesIO()
        self._file: Any = None
        self._size = 0  # bytes written past the threshold, to the file or kept (the buffer knows its own)
        # by_reference: the value, in order, as runs of the file (their lengths) and kept bytes objects;
        # only for a reader in this process (a worker's result is read by the daemon: it goes whole to the file)
        self._by_reference = by_reference
        self._parts: list[int | bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        kept = self._by_reference and type(data) is bytes and len(data) >= BY_REFERENCE_MIN
        if not isinstance(data, bytes):  # pickle also writes memoryviews and PickleBuffers
            data = memoryview(data).cast("B")
        buffer = self._buffer
        if buffer is not None:
            if buffer.tell() + len(data) <= self.threshold or not self._move_to_file():
                return buffer.write(data)
        self._size += len(data)
        if kept:  # immutable, and alive as long as the caller's value: no need for a copy on disk
            self._parts.append(data)
        else:
            write_sliced(data, self._file)
            if self._parts and isinstance(self._parts[-1], int):
                self._parts[-1] += len(data)
            else:
                self._parts.append(len(data))
        return len(data)

    def _move_to_file(self) -> bool:
        """Past the threshold: what was buffered goes to the file. False (and everything stays
        in memory) if ``directory`` is a callable that names none."""
        assert self._buffer is not None
        named = self._directory() if callable(self._directory) else self._directory
        if named is None:
            self.threshold = sys.maxsize
            return False
        directory = Path(named)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = directory / self.name_in_dir
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        held = self._buffer.getbuffer()
        self._file.write(held)
        self._size = len(held)
        self._parts = [len(held)]
        del held
        self._buffer = None
        return True

    @property
    def spilled(self) -> bool:
        return self.path is not None

    @property
    def size(self) -> int:
        return self._buffer.tell() if self._buffer is not None else self._size

    @property
    def digest(self) -> str:
        """The digest of a value that stayed in memory; "" for a spilled one (its upload hashes it
        as it sends it, and declares the digest at the end)."""
        if self._buffer is not None:
            return digest_of(self._buffer.getbuffer())
        return ""

    def getvalue(self) -> bytes:
        """The bytes written, when they stayed in memory."""
        assert self._buffer is not None, "spilled to a file: read it from .path"
        return self._buffer.getvalue()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        super().close()

    def discard(self) -> None:
        """Close and delete the spilled file, if any, and let go of the bytes kept by reference."""
        self.close()
        self._parts = []
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    def pieces(self) -> Iterator[memoryview]:
        """The spilled value, in order, in pieces of at most ``PIECE`` bytes: the file's runs read
        into one reused buffer, the bytes kept by reference sliced without a copy. Each piece is
        valid only until the next one is asked for."""
        assert self.path is not None, "not spilled: use getvalue()"
        self.close()
        buffer = bytearray(PIECE)
        with open(self.path, "rb", buffering=0) as fh:
            for part in self._parts:
                if isinstance(part, int):
                    left = part
                    while left:
                        n = fh.readinto(memoryview(buffer)[: min(PIECE, left)])
                        if not n:
                            raise OSError(f"{self.path} ended {left} bytes early")
                        left -= n
                        yield memoryview(buffer)[:n]
                else:
                    view = memoryview(part)
                    for start in range(0, len(view), PIECE):
                        yield view[start : start + PIECE]


def write_sliced(data: Any, out: Any) -> None:
    """Write ``data`` to ``out`` in slices of ``CHUNK`` bytes. One write of a gibibyte into a file
    costs the kernel 1.2-1.6 s the first time in a process on the project's machine (it maps
    the page cache in large pieces), 256 KiB slices 0.25 s every time."""
    view = memoryview(data).cast("B")
    for start in range(0, len(view), CHUNK):
        out.write(view[start : start + CHUNK])


def hash_and_write(data: Any, digest: Any, out: Any) -> None:
    """Hash ``data`` and write it to ``out``, slice by slice (``CHUNK``): each slice is written
    while the hashing has left it in the CPU's cache, so the bytes are read from memory once."""
    view = memoryview(data).cast("B")
    for start in range(0, len(view), CHUNK):
        piece = view[start : start + CHUNK]
        digest.update(piece)
        out.write(piece)

