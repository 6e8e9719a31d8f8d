"""A cache bounded in entries and bytes: what every long-lived process keeps per function.

Clients, services and endpoints see an unbounded number of distinct functions over their life
(every closure over a different value hashes to a new function id); what they remember about
them must not grow with that number. Least recently used entries go first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class BoundedCache(Generic[K, V]):
    """An LRU mapping holding at most ``max_items`` entries and ``max_bytes`` of ``bytes`` values.

    Thread-safe: the client's user threads and its connection thread share some.
    """

    def __init__(self, max_items: int = 4096, max_bytes: int = 256 * 1024 * 1024):
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._data: OrderedDict[K, V] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: K, default: V | None = None) -> V | None:
        with self._lock:
            value = self._data.get(key, default)
            if key in self._data:
                self._data.move_to_end(key)
            return value

    def __getitem__(self, key: K) -> V:
        with self._lock:
            value = self._data[key]
            self._data.move_to_end(key)
            return value

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def __setitem__(self, key: K, value: V) -> None:
        with self._lock:
            self._set(key, value)

    def _set(self, key: K, value: V) -> None:
        if key in self._data:
            self._bytes -= _size(self._data.pop(key))
        self._data[key] = value
        self._bytes += _size(value)
        while self._data and (len(self._data) > self.max_items or self._bytes > self.max_bytes):
            _, old = self._data.popitem(last=False)
            self._bytes -= _size(old)

    def setdefault(self, key: K, value: V) -> V:
        with self._lock:
            if key in self._data:
                return self._data[key]
            self._set(key, value)
            return value

    def pop(self, key: K, default: V | None = None) -> V | None:
        with self._lock:
            if key not in self._data:
                return default
            value = self._data.pop(key)
            self._bytes -= _size(value)
            return value

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._bytes = 0

    def update(self, keys: object) -> None:
        """Add every key of an iterable with the value None (a bounded set)."""
        with self._lock:
            for key in keys:  # type: ignore[attr-defined]
                self._set(key, None)  # type: ignore[arg-type]

    def discard(self, key: K) -> None:
        self.pop(key)


def _size(value: object) -> int:
    return len(value) if isinstance(value, bytes | bytearray) else 0
