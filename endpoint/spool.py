"""The result spool: results are on disk before they are sent, and leave it only when the
service says it has stored them. An endpoint killed at any moment loses no result.

One file per batch of results (a batch is what one loop iteration produced), so the cost is
one small write per batch rather than per task; a file is deleted when every result in it has
been acknowledged.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from pathlib import Path
from typing import Any

import msgpack

log = logging.getLogger("tether.endpoint.spool")


class ResultSpool:
    def __init__(self, directory: Path, fsync: bool = False):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.fsync = fsync
        self._results: dict[str, dict[str, Any]] = {}
        self._file_of: dict[str, Path] = {}
        self._pending_in_file: dict[Path, set[str]] = {}
        self._seq = itertools.count()
        self._load()

    def _load(self) -> None:
        for path in sorted(self.dir.glob("*.spool")):
            try:
                results = msgpack.unpackb(path.read_bytes(), raw=False)
            except Exception as exc:  # noqa: BLE001 - a torn write from a crash mid-write
                log.warning("spool file %s is unreadable (%s); its results will be recomputed", path, exc)
                path.unlink(missing_ok=True)
                continue
            self._index(path, results)
        if self._results:
            log.info("spool: %d results from a previous run await the service", len(self._results))

    def _index(self, path: Path, results: list[dict[str, Any]]) -> None:
        ids = set()
        for r in results:
            if r["id"] in self._results:
                continue
            self._results[r["id"]] = r
            self._file_of[r["id"]] = path
            ids.add(r["id"])
        if ids:
            self._pending_in_file[path] = ids
        else:
            path.unlink(missing_ok=True)

    def write(self, results: list[dict[str, Any]]) -> None:
        """Persist a batch (atomically: written to a temporary name, then renamed)."""
        path = self.dir / f"{time.time_ns():020d}-{os.getpid()}-{next(self._seq)}.spool"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            fh.write(msgpack.packb(results, use_bin_type=True))
            if self.fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        self._index(path, results)

    def ack(self, ids: list[str]) -> None:
        """The service stored these: forget them, deleting files that became empty."""
        for tid in ids:
            self._results.pop(tid, None)
            path = self._file_of.pop(tid, None)
            if path is None:
                continue
            pending = self._pending_in_file.get(path)
            if pending is not None:
                pending.discard(tid)
                if not pending:
                    del self._pending_in_file[path]
                    path.unlink(missing_ok=True)

    def __contains__(self, task_id: str) -> bool:
        return task_id in self._results

    def __len__(self) -> int:
        return len(self._results)

    def ids(self) -> list[str]:
        return list(self._results)

    def pending(self) -> list[dict[str, Any]]:
        return list(self._results.values())
