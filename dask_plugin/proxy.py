"""Proxy mode: a Dask worker on the user's side whose tasks run on a Tether endpoint.

The worker keeps Dask's state machine and scheduling; the computation moves, and so does the
data. Its executor receives each task as ``_run_task_simple(task, data, time_delay)`` (see
:mod:`tether.dask._compat`), sends it with its inputs through the service, and makes the
worker's message from what comes back, so results, timings and the task's own exceptions look
exactly as with a local worker. Nothing connects to the user's machine: the endpoint only talks
to the service.

A large value stays on the endpoint (a kept result, see ``docs/payloads.md``): the worker's
``data`` holds its :class:`tether.RemoteValue`, the scheduler plans with its real size, the next
task that needs it reads it on the endpoint, and releasing the key frees it there. Only what
leaves the worker (``compute``/``gather`` to the client) is fetched: a handle fetches its value
when it is pickled.

Tasks that need the worker object itself (P2P shuffle transfer/unpack, actors, ``get_worker()``)
run here, in a thread, as a thread-pool worker would run them, with their inputs fetched.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import threading
from collections.abc import Callable
from time import time
from typing import Any

import cloudpickle
from dask.sizeof import sizeof
from distributed import Worker
from distributed.diagnostics.plugin import WorkerPlugin
from distributed.threadpoolexecutor import ThreadPoolExecutor

from tether import Executor, RemoteValue, TetherError, TetherFuture

from . import remote
from ._compat import failed, finished, functions_in, rescheduled, run_task_on_worker, run_task_simple

# the endpoint needs dask/distributed, not this plugin: remote.py travels by value
cloudpickle.register_pickle_by_value(remote)

logger = logging.getLogger("tether.dask")

#: a value that serializes to more bytes than this stays on the endpoint (partitions, chunks);
#: smaller ones (scalars, small aggregates) come back with the answer
KEEP_OVER = 64 * 1024

#: code from these packages needs the worker it runs on (P2P shuffle plugins, actors, worker_client)
_WORKER_BOUND_PACKAGE = "distributed"


@functools.lru_cache(maxsize=4096)
def _cached_worker_bound(fn: Any) -> bool:
    return _worker_bound(fn, depth=0)


def _worker_bound(fn: Any, depth: int) -> bool:
    """Does ``fn`` come from ``distributed``, import from it, or close over a function that does?

    dask's P2P wrappers (``_shuffle_transfer``, ``assign_index_merge_transfer``) live in dask but
    import or capture ``distributed.shuffle`` functions: this finds them without a list of names.
    """
    while isinstance(fn, functools.partial):
        fn = fn.func
    module = getattr(fn, "__module__", None) or ""
    if module == _WORKER_BOUND_PACKAGE or module.startswith(_WORKER_BOUND_PACKAGE + "."):
        return True
    code = getattr(fn, "__code__", None)
    if code is None:
        return False
    if any(n == _WORKER_BOUND_PACKAGE or n.startswith(_WORKER_BOUND_PACKAGE + ".") for n in code.co_names):
        return True
    if depth < 2:
        for cell in getattr(fn, "__closure__", None) or ():
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if callable(value) and _worker_bound(value, depth + 1):
                return True
    return False


def needs_worker(fn: Any) -> bool:
    """Whether a task function must run on a Dask worker (here) rather than on the endpoint."""
    try:
        return _cached_worker_bound(fn)
    except TypeError:  # unhashable callable
        return _worker_bound(fn, depth=0)


class _ProxyFuture(concurrent.futures.Future):
    """What ``Worker.execute`` awaits; cancelling it (worker closing) cancels the remote task."""

    remote: TetherFuture | None = None

    def cancel(self) -> bool:
        if self.remote is not None:
            self.remote.cancel()
        return super().cancel()


class EndpointTaskExecutor(concurrent.futures.Executor):
    """A worker's default executor that runs each Dask task on a Tether endpoint.

    Args:
        tether: the Executor tasks go through (owned by the cluster, not shut down here).
        local: threads for calls that must stay here (worker-bound tasks, the worker's own
            housekeeping such as its disk benchmark).
    """

    def __init__(self, tether: Executor, local: ThreadPoolExecutor):
        self.tether = tether
        self.local = local
        self.worker: Worker | None = None
        self._in_flight: dict[Any, _ProxyFuture] = {}
        #: keys whose values the endpoint keeps: released there when the worker releases the key
        #: (not left to garbage collection: the worker's bookkeeping may hold a message a while)
        self._kept: dict[Any, RemoteValue] = {}
        self._lock = threading.Lock()
        #: counters a user (and the tests) can read: where tasks ran
        self.counts = {"endpoint": 0, "local": 0, "fallback": 0}

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        if fn is not run_task_simple or self.worker is None:
            return self.local.submit(fn, *args, **kwargs)
        task, data, time_delay = args
        if self._needs_worker(task):
            self.counts["local"] += 1
            return self.local.submit(_run_here, self.worker, task, data, time_delay)
        return self._submit_remote(task, data, time_delay)

    def _needs_worker(self, task: Any) -> bool:
        if self.worker is not None and task.key in self.worker.state.actors:  # an actor lives where it is made
            return True
        return any(needs_worker(fn) for fn in functions_in(task))

    def _submit_remote(self, task: Any, data: dict, time_delay: float) -> _ProxyFuture:
        start = time()
        outer = _ProxyFuture()
        try:
            inner = self.tether.submit_task(remote.run_dask_task, (task, data, time_delay), keep_over=KEEP_OVER)
        except TetherError as exc:  # refused before it left (payload too large, bad credentials, ...)
            outer.set_result(failed(exc, start, time()))
            return outer
        self.counts["endpoint"] += 1
        outer.remote = inner
        with self._lock:
            self._in_flight[task.key] = outer
        inner.add_done_callback(functools.partial(self._remote_done, task, data, time_delay, outer, start))
        return outer

    def _remote_done(self, task: Any, data: dict, time_delay: float, outer: _ProxyFuture, start: float,
                     inner: concurrent.futures.Future) -> None:
        with self._lock:
            if self._in_flight.get(task.key) is outer:
                del self._in_flight[task.key]
        if outer.done():  # cancelled by the worker: nobody waits for this attempt
            return
        if inner.cancelled():
            outer.set_result(rescheduled(start, time()))
            return
        exc = inner.exception()
        if exc is not None:  # Tether could not run it (endpoint worker died, ...): the task errs with that
            outer.set_result(failed(exc, start, time()))
            return
        kept = inner.remote_value()  # a large value stays on the endpoint: its handle, not its bytes
        value = kept if kept is not None else inner.result()
        if type(value) is str and value == remote.NEEDS_WORKER and self.worker is not None:
            self.counts["fallback"] += 1
            logger.info("task %s needs a Dask worker (get_worker/get_client); running it on the proxy worker",
                        task.key)
            local = self.local.submit(_run_here, self.worker, task, data, time_delay)
            local.add_done_callback(functools.partial(_copy_outcome, outer))
            return
        if type(value) is tuple and len(value) == 2 and value[0] == remote.ERRED:
            outer.set_result(value[1])
            return
        times = inner.transitions
        if kept is not None:
            with self._lock:
                self._kept[task.key] = kept
        nbytes = kept.size if kept is not None else sizeof(value)
        outer.set_result(finished(value, nbytes, times.get("running", start), times.get("success", time())))

    def cancel_key(self, key: Any) -> None:
        """The worker released a task it is executing (``client.cancel``): kill it on the endpoint."""
        with self._lock:
            outer = self._in_flight.pop(key, None)
        if outer is not None and outer.remote is not None:
            outer.remote.cancel()

    def release_key(self, key: Any) -> None:
        """The worker dropped a key's value: the endpoint may free it now."""
        with self._lock:
            kept = self._kept.pop(key, None)
        if kept is not None:
            kept.release()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """The worker is closing: remote tasks still running are cancelled (their results are
        unwanted), values the endpoint keeps are released; the local threads are the worker's
        to stop."""
        with self._lock:
            in_flight, self._in_flight = list(self._in_flight.values()), {}
            kept, self._kept = list(self._kept.values()), {}
        for outer in in_flight:
            outer.cancel()
        for value in kept:  # the cluster is closing: nothing will read them again
            value.release()


def _run_here(worker: Worker, task: Any, data: dict, time_delay: float) -> dict[str, Any]:
    """Run a worker-bound task in this thread, its inputs kept on the endpoint fetched first."""
    data = {k: v.fetch() if type(v) is RemoteValue else v for k, v in data.items()}
    return run_task_on_worker(worker, task, data, time_delay)


def _copy_outcome(outer: concurrent.futures.Future, done: concurrent.futures.Future) -> None:
    if outer.done():
        return
    exc = done.exception()
    if exc is not None:
        outer.set_exception(exc)
    else:
        outer.set_result(done.result())


class _CancelOnRelease(WorkerPlugin):
    """Turns the worker's release of an executing task into a cancel on the endpoint, and its
    release of a value the endpoint keeps into a release there.

    A thread-pool worker cannot stop a running task and lets it finish; Tether can kill it.
    """

    name = "tether-cancel-on-release"

    def __init__(self, executor: EndpointTaskExecutor):
        self.executor = executor

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if start in ("executing", "long-running") and finish in ("released", "cancelled", "forgotten"):
            self.executor.cancel_key(key)
        elif start == "memory" and finish in ("released", "forgotten", "error"):
            self.executor.release_key(key)


class ProxyWorker(Worker):
    """A Dask worker whose ``nthreads`` slots are tasks in flight on a Tether endpoint.

    ``executor="local"`` in a task's annotations (``with dask.annotate(executor="local")``)
    keeps that task on this side.
    """

    def __init__(self, scheduler_ip: str | None = None, *, tether_executor: Executor, nthreads: int,
                 **kwargs: Any):
        local = ThreadPoolExecutor(max(2, nthreads), thread_name_prefix="tether-proxy-local")
        self.endpoint_executor = EndpointTaskExecutor(tether_executor, local)
        super().__init__(scheduler_ip, nthreads=nthreads,
                         executor={"default": self.endpoint_executor, "local": local},
                         plugins=(_CancelOnRelease(self.endpoint_executor),), **kwargs)
        self.endpoint_executor.worker = self
