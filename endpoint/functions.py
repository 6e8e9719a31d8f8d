"""Function bodies the endpoint was sent: a bounded set in memory, every one on disk.

The service sends each body once per connection, so the endpoint must still have it when a
task for that function arrives much later; but an endpoint that runs many distinct functions
(every closure over a different value is one) must not keep them all in memory. Recently used
bodies stay in memory; the others are read back from ``functions/`` in the endpoint directory,
which starts empty with each run (a new connection is sent the bodies again).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tether.bounded import BoundedCache
from tether.ids import InvalidIdentifier, check_function_id, child_path


class FunctionStore:
    def __init__(self, directory: Path, max_items: int = 1024, max_bytes: int = 64 * 1024 * 1024):
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True, mode=0o700)
        self.dir = directory
        self._recent: BoundedCache[str, bytes] = BoundedCache(max_items=max_items, max_bytes=max_bytes)

    def _path(self, fid: str) -> Path:
        return child_path(self.dir, fid, "function id", check=lambda value, _kind: check_function_id(value))

    def add(self, fid: str, body: bytes) -> None:
        """Keep a body (callers check that ``fid`` is its hash)."""
        path = self._path(fid)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(body)
        os.replace(tmp, path)
        self._recent[fid] = body

    def get(self, fid: str) -> bytes | None:
        body = self._recent.get(fid)
        if body is None:
            try:
                body = self._path(fid).read_bytes()
            except (OSError, InvalidIdentifier):
                return None
            self._recent[fid] = body
        return body
