"""The store, awaited: what keeps a database across the network from stalling the event loop.

:class:`~tether.service.store.Store` is synchronous SQLAlchemy Core: short transactions, easy to
read and to test. The service never calls it directly from a coroutine; it awaits the same
method through :class:`AsyncStore`:

* SQLite (the embedded default) runs inline. A local WAL database answers in microseconds, and
  a hop to a thread per call would cost more than the query (the no-op path is one of our
  benchmarks).
* Any other database (PostgreSQL) runs in a bounded pool of threads, each with its own
  connection from the engine's pool: a slow query, a lock wait or a database restart holds a
  thread, never the loop that serves every WebSocket.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .store import Store

#: threads (and so database connections) per service process for a remote database
DEFAULT_DB_THREADS = 4


class AsyncStore:
    """Every public method of a :class:`Store`, as a coroutine with the same arguments.

    ``await db.get_endpoint(eid)`` is ``store.get_endpoint(eid)``, run inline or in the pool.
    """

    def __init__(self, store: Store, threads: int = DEFAULT_DB_THREADS):
        self.store = store
        self.inline = store.engine.dialect.name == "sqlite"
        self._pool = None if self.inline else ThreadPoolExecutor(threads, thread_name_prefix="tether-db")

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        method = getattr(self.store, name)
        if name.startswith("_") or not callable(method):
            raise AttributeError(name)
        if self.inline:
            async def call(*args: Any, **kwargs: Any) -> Any:
                return method(*args, **kwargs)
        else:
            pool = self._pool

            async def call(*args: Any, **kwargs: Any) -> Any:
                return await asyncio.get_running_loop().run_in_executor(
                    pool, functools.partial(method, *args, **kwargs))
        call.__doc__ = method.__doc__
        setattr(self, name, call)  # made once per method
        return call

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self.store.close()
