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

Each method is declared once, by name, with :func:`awaited`: a type checker sees that
``await db.get_endpoint(eid)`` takes what ``Store.get_endpoint`` takes and returns what it
returns, and a method the store does not have is an error where it is declared, not at a call.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Concatenate, ParamSpec, TypeVar

from .store import Store

#: threads (and so database connections) per service process for a remote database
DEFAULT_DB_THREADS = 4

P = ParamSpec("P")
R = TypeVar("R")


def awaited(method: Callable[Concatenate[Store, P], R]) -> Callable[Concatenate[AsyncStore, P], Coroutine[Any, Any, R]]:
    """``method`` of the store as a coroutine method of :class:`AsyncStore`: run inline (no
    thread hop: SQLite, on every task's path) or in the store's pool."""

    @functools.wraps(method)
    async def call(self: AsyncStore, *args: P.args, **kwargs: P.kwargs) -> R:
        if self._pool is None:
            return method(self.store, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, functools.partial(method, self.store, *args, **kwargs))

    return call


class Offloaded:
    """Every public method of ``target``, as a coroutine with the same arguments: run inline, or
    in ``pool`` (a method that touches the database must not run on the event loop). Untyped:
    for the blob index's queries (``service/blobs/index.py``); the store itself is :class:`AsyncStore`."""

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


class AsyncStore:
    """The methods of a :class:`Store` the service awaits, with the store's signatures.

    ``await db.get_endpoint(eid)`` is ``store.get_endpoint(eid)``, run inline or in the pool;
    :meth:`offload` gives the same (untyped) for another object that queries the store.
    """

    def __init__(self, store: Store, threads: int = DEFAULT_DB_THREADS):
        self.store = store
        self.inline = store.engine.dialect.name == "sqlite"
        self._pool = None if self.inline else ThreadPoolExecutor(threads, thread_name_prefix="tether-db")

    def offload(self, target: Any) -> Offloaded:
        """``target``'s methods, run where this store's are."""
        return Offloaded(target, self._pool)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self.store.close()

    # users and credentials
    user_by_token = awaited(Store.user_by_token)
    user_for_identity = awaited(Store.user_for_identity)
    user_name = awaited(Store.user_name)
    valid_token_hashes = awaited(Store.valid_token_hashes)
    valid_endpoint_secrets = awaited(Store.valid_endpoint_secrets)
    # endpoints
    register_endpoint = awaited(Store.register_endpoint)
    endpoint_by_secret = awaited(Store.endpoint_by_secret)
    get_endpoint = awaited(Store.get_endpoint)
    list_endpoints = awaited(Store.list_endpoints)
    save_endpoint_status = awaited(Store.save_endpoint_status)
    delete_endpoint = awaited(Store.delete_endpoint)
    set_policy = awaited(Store.set_policy)
    user_endpoint_for = awaited(Store.user_endpoint_for)
    user_endpoints = awaited(Store.user_endpoints)
    user_endpoints_with_open_tasks = awaited(Store.user_endpoints_with_open_tasks)
    new_secret = awaited(Store.new_secret)
    void_secret = awaited(Store.void_secret)
    set_local_user = awaited(Store.set_local_user)
    # functions
    add_functions = awaited(Store.add_functions)
    get_function = awaited(Store.get_function)
    purge_functions = awaited(Store.purge_functions)
    # tasks
    insert_tasks = awaited(Store.insert_tasks)
    count_open = awaited(Store.count_open)
    set_state = awaited(Store.set_state)
    redispatch = awaited(Store.redispatch)
    open_task_endpoints = awaited(Store.open_task_endpoints)
    write_results = awaited(Store.write_results)
    fail_open_tasks = awaited(Store.fail_open_tasks)
    open_task_page = awaited(Store.open_task_page)
    load_open_tasks = awaited(Store.load_open_tasks)
    get_tasks = awaited(Store.get_tasks)
    input_readers = awaited(Store.input_readers)
    kept_result_owner = awaited(Store.kept_result_owner)
    finished_among = awaited(Store.finished_among)
    group_task_ids = awaited(Store.group_task_ids)
    cancel = awaited(Store.cancel)
    mark_collected = awaited(Store.mark_collected)
    purge = awaited(Store.purge)
    open_by_state = awaited(Store.open_by_state)
    recent_tasks = awaited(Store.recent_tasks)
