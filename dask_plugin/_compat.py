"""The one seam between Tether and ``distributed``'s private worker API.

A proxy worker (see :mod:`tether.dask.proxy`) replaces a Dask worker's executor. ``Worker.execute``
hands an executor that is not a thread pool ``_run_task_simple(task, data, time_delay)``; the
proxy recognises that call, ships it to the endpoint, and runs tasks that need the worker itself
(P2P shuffles, actors, ``get_worker()``) here with ``_run_task``, as a thread-pool worker would.

Those names, their signatures and the message they return are private to ``distributed``. They
were checked against the versions in :data:`CHECKED_VERSIONS`; :func:`check_supported` verifies
the shape of the installed version at import time and fails in words when it changed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any

import distributed
import distributed.worker as _worker
from distributed.exceptions import Reschedule

from tether.errors import TetherError

#: ``distributed`` releases whose worker internals this module was read and tested against; other
#: releases are accepted when :func:`check_supported` finds the same shape
CHECKED_VERSIONS = ("2026.8.0",)

_EXPECTED = {
    "_run_task_simple": ["task", "data", "time_delay"],
    "_run_task": ["task", "data", "execution_state", "key", "active_threads", "active_threads_lock", "time_delay"],
}


class UnsupportedDistributed(TetherError, ImportError):
    """The installed ``distributed`` changed the worker internals the proxy mode relies on."""


def check_supported() -> None:
    """Fail in words if ``distributed``'s worker no longer has the functions the proxy replaces."""
    problems = []
    for name, params in _EXPECTED.items():
        fn = getattr(_worker, name, None)
        if not callable(fn):
            problems.append(f"distributed.worker.{name} is gone")
            continue
        found = list(inspect.signature(fn).parameters)
        if found != params:
            problems.append(f"distributed.worker.{name}{tuple(found)} (expected {tuple(params)})")
    if not hasattr(_worker, "_worker_cvar"):
        problems.append("distributed.worker._worker_cvar is gone")
    try:
        from dask._task_spec import GraphNode, Task  # noqa: F401  (tasks as objects: dask >= 2024.12)
    except ImportError:
        problems.append("dask._task_spec (GraphNode, Task) is missing: dask is older than 2024.12")
    if problems:
        raise UnsupportedDistributed(
            f"tether.dask does not support distributed {distributed.__version__}: "
            + "; ".join(problems)
            + f". It was checked against distributed {', '.join(CHECKED_VERSIONS)}; "
            "install one of those or a tether release that supports this one."
        )


check_supported()

from dask._task_spec import GraphNode, Task  # noqa: E402  (checked just above)

#: what ``Worker.execute`` submits to a non-thread-pool executor
run_task_simple: Callable[[GraphNode, dict, float], dict[str, Any]] = _worker._run_task_simple


def run_task_on_worker(worker: distributed.Worker, task: GraphNode, data: dict, time_delay: float) -> dict[str, Any]:
    """Run ``task`` in this thread as a thread-pool worker would: ``get_worker()`` and ``secede``
    work, which P2P shuffles, actors and ``worker_client`` need. Call it from a
    :class:`distributed.threadpoolexecutor.ThreadPoolExecutor` thread."""
    return _worker._run_task(task, data, worker.execution_state, task.key, worker.active_threads,
                             worker.active_threads_lock, time_delay)


def rescheduled(start: float, stop: float) -> dict[str, Any]:
    """The message for a task the proxy gave up on (cancelled, worker closing): ``Reschedule``
    makes the worker drop the attempt, and the scheduler run the task again if it still wants it."""
    from distributed.core import error_message

    exc = Reschedule()
    msg: dict[str, Any] = dict(error_message(exc))
    msg.update(op="task-erred", actual_exception=exc, start=start, stop=stop, thread=0)
    return msg


def finished(value: Any, nbytes: int, start: float, stop: float) -> dict[str, Any]:
    """The worker's message for a task that returned ``value`` (``_run_task_simple``'s success
    message): ``nbytes`` is what the scheduler plans with, the real size also for a value the
    endpoint keeps (``value`` is then its small handle)."""
    return {"op": "task-finished", "status": "OK", "result": value, "nbytes": nbytes,
            "type": type(value) if value is not None else None, "start": start, "stop": stop, "thread": 0}


def failed(exc: BaseException, start: float, stop: float) -> dict[str, Any]:
    """The message for a task that failed in Tether rather than in user code (payload too
    large, endpoint worker died, ...): the Dask future raises ``exc``."""
    from distributed.core import error_message

    msg: dict[str, Any] = dict(error_message(exc))
    msg.update(op="task-erred", actual_exception=exc, start=start, stop=stop, thread=0)
    return msg


def functions_in(node: Any, limit: int = 10_000) -> Iterator[Callable[..., Any]]:
    """Every callable a task (and the subgraph it may have fused) would call."""
    stack, seen = [node], 0
    while stack and seen < limit:
        item = stack.pop()
        seen += 1
        if isinstance(item, Task):
            yield item.func
            stack.extend(a for a in item.args if isinstance(a, GraphNode | dict))
            stack.extend(v for v in item.kwargs.values() if isinstance(v, GraphNode | dict))
        elif isinstance(item, dict):  # a fused subgraph: {key: GraphNode}
            stack.extend(v for v in item.values() if isinstance(v, GraphNode))
