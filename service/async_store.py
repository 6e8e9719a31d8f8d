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


class Offloaded:
    """Every public method of ``target``, as a coroutine with the same arguments: run inline, or
    in ``pool`` (a method that touches the database must not run on the event loop)."""

    def __init__(self, target: Any, pool: ThreadPoolExecutor | None):
        self._target = target
        self._pool = pool

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        method = getattr(self._target, name)
        if name.startswith("_") or not callable(method):
            raise AttributeError(name)
        pool = self._pool
        if pool is None:
            async def call(*args: Any, **kwargs: Any) -> Any:
                return method(*args, **kwargs)
        else:
            async def call(*args: Any, **kwargs: Any) -> Any:
                return await asyncio.get_running_loop().run_in_executor(
                    pool, functools.partial(method, *args, **kwargs))
        call.__doc__ = method.__doc__
        setattr(self, name, call)  # made once per method
        return call


class AsyncStore(Offloaded):
    """Every public method of a :class:`Store`, as a coroutine with the same arguments.

    ``await db.get_endpoint(eid)`` is ``store.get_endpoint(eid)``, run inline or in the pool;
    :meth:`offload` gives the same for another object that queries the store (the blob index).
    """

    def __init__(self, store: Store, threads: int = DEFAULT_DB_THREADS):
        self.store = store
        self.inline = store.engine.dialect.name == "sqlite"
        super().__init__(store, None if self.inline else ThreadPoolExecutor(threads, thread_name_prefix="tether-db"))

    def offload(self, target: Any) -> Offloaded:
        """``target``'s methods, run where this store's are."""
        return Offloaded(target, self._pool)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self.store.close()
