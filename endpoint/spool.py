"""The result spool: results are on disk before they are sent, and leave it only when the
service says it has stored them. An endpoint killed at any moment loses no result.

The spool is an append-only log in segments: a batch of results costs one ``write`` to an
open file (creating a file per batch cost more than running a no-op task). Memory holds only
where each result is (segment, offset, length), never its bytes: they are read back from disk
when they must be sent again. Acknowledgements are kept in memory only; a segment is deleted
once every result in it is acknowledged. After a crash every result still in a segment is sent
again, and the service drops the ones it already has (results are exactly-once per task id
there), so nothing is lost or doubled.

Each record is a :class:`tether.protocol.Result` as msgpack (:func:`tether.results.pack`): a map with the
keys ``id``, ``state``, ``data``, ``error`` and ``times``, as the dicts an earlier version wrote,
so its segments are read (and decoded as ``Result``) alike. A restart scans the segments with
msgpack's streaming unpacker, which gives each record's offset; a record is decoded, and
validated, only when it is sent again.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import msgpack

from tether.protocol import Result
from tether.results import pack, unpack

log = logging.getLogger("tether.endpoint.spool")

SEGMENT_BYTES = 64 * 1024 * 1024
TRUNCATE_BYTES = 1024 * 1024


class _Segment:
    def __init__(self, path: Path, fh: BinaryIO | None):
        self.path = path
        self.fh = fh
        self.pending: set[str] = set()
        self.size = 0


class ResultSpool:
    def __init__(self, directory: Path, fsync: bool = False, segment_bytes: int = SEGMENT_BYTES):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self._where: dict[str, tuple[_Segment, int, int]] = {}  # id -> (segment, offset, length)
        self._seq = itertools.count()
        self._current: _Segment | None = None
        self._load()

    def _load(self) -> None:
        for path in sorted(self.dir.glob("*.spool")):
            segment = _Segment(path, None)
            try:
                with open(path, "rb") as fh:
                    unpacker = msgpack.Unpacker(fh, raw=False)
                    offset = 0
                    for record in unpacker:
                        end = unpacker.tell()
                        self._remember(segment, record["id"], offset, end - offset)
                        offset = end
            except Exception as exc:  # noqa: BLE001 - a torn tail from a crash mid-write
                log.warning("spool segment %s ends in a partial record (%s); kept what precedes it", path, exc)
            if not segment.pending:
                path.unlink(missing_ok=True)
        if self._where:
            log.info("spool: %d results from a previous run await the service", len(self._where))

    def _remember(self, segment: _Segment, tid: str, offset: int, length: int) -> None:
        if tid in self._where:
            return
        self._where[tid] = (segment, offset, length)
        segment.pending.add(tid)

    def _segment(self) -> _Segment:
        if self._current is None or self._current.size >= self.segment_bytes:
            path = self.dir / f"{time.time_ns():020d}-{os.getpid()}-{next(self._seq)}.spool"
            self._current = _Segment(path, open(path, "ab"))
        return self._current

    def write(self, results: list[Result]) -> None:
        """Append a batch; it is on disk (in the page cache, or fsynced if asked) on return."""
        segment = self._segment()
        packed = [pack(r) for r in results]
        assert segment.fh is not None
        segment.fh.write(b"".join(packed))
        segment.fh.flush()
        if self.fsync:
            os.fsync(segment.fh.fileno())
        offset = segment.size
        for r, data in zip(results, packed, strict=True):
            self._remember(segment, r.id, offset, len(data))
            offset += len(data)
        segment.size = offset

    def ack(self, ids: list[str]) -> None:
        """The service stored these: forget them, deleting segments that became fully acknowledged."""
        for tid in ids:
            where = self._where.pop(tid, None)
            if where is None:
                continue
            segment = where[0]
            segment.pending.discard(tid)
            if not segment.pending:
                self._drop(segment)

    def _drop(self, segment: _Segment) -> None:
        if segment is self._current:
            # keep the open file; empty it once it is worth a syscall (a crash before that only
            # re-sends results the service already has, and it drops those)
            if segment.size >= TRUNCATE_BYTES and segment.fh is not None:
                segment.fh.truncate(0)
                segment.size = 0
            return
        if segment.fh is not None:
            segment.fh.close()
        segment.path.unlink(missing_ok=True)

    def __contains__(self, task_id: str) -> bool:
        return task_id in self._where

    def __len__(self) -> int:
        return len(self._where)

    def ids(self) -> list[str]:
        return list(self._where)

    def pending(self) -> Iterator[Result]:
        """Every result not yet acknowledged, read back from disk one at a time."""
        by_segment: dict[Path, list[tuple[int, int]]] = {}
        for segment, offset, length in list(self._where.values()):
            by_segment.setdefault(segment.path, []).append((offset, length))
        for path, spans in by_segment.items():
            try:
                fh = open(path, "rb")
            except OSError:  # acknowledged (and deleted) meanwhile
                continue
            with fh:
                for offset, length in sorted(spans):
                    fh.seek(offset)
                    yield unpack(fh.read(length))
