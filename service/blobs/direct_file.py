"""A file written past the page cache (``O_DIRECT``), for large uploads received on their own
socket (:mod:`tether.service.blobs.raw_transfer`): the disk's DMA instead of a CPU copy, page
faults and the kernel's write-back on the service's CPUs (see :class:`DirectFile`).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import queue
import threading
from pathlib import Path

#: the alignment O_DIRECT asks of a write's buffer, offset and length (the page size, and a
#: multiple of the usual logical block sizes)
DIRECT_ALIGN = 4096
#: bytes gathered before one write past the page cache
DIRECT_BATCH = 1024 * 1024


#: batches a raw upload may have on their way to the disk at once (memory: this many times
#: :data:`DIRECT_BATCH` per upload), so receiving and hashing never wait on one write
DIRECT_DEPTH = 4


class DirectFile:
    """A blob's file written past the page cache (``O_DIRECT``) where the system allows it, in
    aligned batches of :data:`DIRECT_BATCH` written by a thread of its own (up to
    :data:`DIRECT_DEPTH` on their way); the last unaligned bytes go through the cache.

    Through the page cache each byte of an upload is copied once more by the CPU, takes a page
    the kernel must find (on a virtual machine, first touches of memory the host had taken
    back cost ~2.5 s per GiB: measured on the project's machine, against 0.25 s for pages
    just freed), and is written back later by the kernel's flusher, on the service's CPUs. A
    write past the cache is the disk's DMA: 0.06 CPU seconds per GiB (1.3-1.6 GB/s on the
    project's disk). Readers of the blob read the file as they did (the kernel keeps direct
    writes and cached reads of one file consistent); those following the upload are sent
    its pieces from memory. A file system that refuses ``O_DIRECT`` (tmpfs) gets buffered
    writes, in the caller's thread."""

    def __init__(self, path: Path):
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        direct = getattr(os, "O_DIRECT", 0)
        self.fd = -1
        if direct:
            with contextlib.suppress(OSError):
                self.fd = os.open(path, flags | direct, 0o600)
        self.direct = self.fd >= 0
        if not self.direct:
            self.fd = os.open(path, flags, 0o600)
        #: bytes in the file
        self.offset = 0
        self._queued = 0  # bytes handed to the writer (the file's size once it is done)
        self._stage: mmap.mmap | None = None
        self.staged = 0
        self._error: BaseException | None = None
        if self.direct:
            self._free: queue.Queue[mmap.mmap] = queue.Queue()
            for _ in range(DIRECT_DEPTH):
                self._free.put(mmap.mmap(-1, DIRECT_BATCH))  # page-aligned
            self._todo: queue.Queue[tuple[mmap.mmap, int, int] | None] = queue.Queue()
            self._writer = threading.Thread(target=self._write_batches, name="tether-blob-writer", daemon=True)
            self._writer.start()
            self._stage = self._free.get()

    def write(self, data: memoryview) -> None:
        if self._stage is None:
            self._pwrite(data, self._queued)
            self._queued += len(data)
            self.offset = self._queued
            return
        while len(data):
            n = min(len(data), DIRECT_BATCH - self.staged)
            self._stage[self.staged : self.staged + n] = data[:n]
            self.staged += n
            data = data[n:]
            if self.staged == DIRECT_BATCH:
                self._hand_over()
                self._stage = self._free.get()  # waits while DIRECT_DEPTH batches are on their way

    def _hand_over(self) -> None:
        if self._error is not None:
            raise self._error
        assert self._stage is not None
        self._todo.put((self._stage, self.staged, self._queued))
        self._queued += self.staged
        self.staged = 0

    def _write_batches(self) -> None:
        while (job := self._todo.get()) is not None:
            buffer, length, offset = job
            try:
                if self._error is None:
                    self._pwrite(memoryview(buffer)[:length], offset)
                    self.offset = offset + length
            except BaseException as exc:  # noqa: BLE001 - raised in the receiving thread
                self._error = exc
            finally:
                self._free.put(buffer)

    def _pwrite(self, data: memoryview, offset: int) -> None:
        done = 0
        while done < len(data):
            try:
                done += os.pwrite(self.fd, data[done:], offset + done)
            except OSError as exc:  # a file system that took O_DIRECT at open but wants another alignment
                if exc.errno != errno.EINVAL or not self._buffered():
                    raise

    def _buffered(self) -> bool:
        """Write through the page cache from now on; False if the file already does."""
        if not self.direct:
            return False
        import fcntl  # (Linux only, as O_DIRECT)

        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self.direct = False
        return True

    def close(self) -> None:
        """Wait for the batches on their way, write what is left (through the cache: it need not
        be aligned) and close; again: nothing."""
        if self.fd < 0:
            return
        try:
            if self._stage is not None:
                self._todo.put(None)
                self._writer.join()
                if self._error is not None:
                    raise self._error
                if self.staged:
                    self._buffered()
                    self._pwrite(memoryview(self._stage)[: self.staged], self._queued)
                    self._queued += self.staged
                    self.staged = 0
                self.offset = self._queued
        finally:
            os.close(self.fd)
            self.fd = -1
            if self._stage is not None:
                self._stage.close()
                self._stage = None
                while not self._free.empty():
                    self._free.get().close()
