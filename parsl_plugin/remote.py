"""What runs on the endpoint around a Parsl app: the one piece of the plugin that crosses the wire.

The DataFlowKernel hands :class:`~tether.parsl.TetherExecutor` a function that is already wrapped
by Parsl (``wrap_error``, ``remote_side_bash_executor`` for bash apps, staging and monitoring
wrappers). That function is shipped as it is, so apps behave exactly as Parsl defines them; this
module only supplies what Parsl's own workers would have set up around it:

* the MPI environment (``$PARSL_MPI_PREFIX``, ``PARSL_NUM_RANKS``, ...) when the task's resource
  specification asks for ranks, composed by the endpoint from the task's specification, exactly
  as for :class:`tether.MPIFunction`;
* the executor's ``working_dir`` as the current directory, when one is set;
* for an app whose files travel through Tether (:mod:`tether.parsl.staging`), a fresh directory
  of its own holding its input files, from which its outputs and streams are taken back;
* a place where Parsl's monitoring wrapper can leave its messages, which then travel back with
  the result (see :mod:`tether.parsl.monitoring`).

Imports of endpoint code happen inside the functions: they only ever run on the endpoint.
"""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .monitoring import MonitoredResult, collect_messages
from .staging import STAGING_KWARG

#: keys of a resource specification that make a task an MPI task
_RANK_KEYS = ("num_ranks", "ranks_per_node")
#: os.environ is one per process: apps that change it take turns on an endpoint running tasks in threads
_ENVIRON_LOCK = threading.Lock()


@dataclass(frozen=True)
class RemoteOptions:
    """Per-executor settings the endpoint side needs (pickled with every app)."""

    working_dir: str | None = None
    monitoring: bool = False


class RemoteApp:
    """A Parsl-wrapped app plus the executor's options: the callable the endpoint runs.

    One instance per app function (the executor caches them), so the Tether client serializes
    and registers each app once and the endpoint's workers deserialize it once.
    """

    def __init__(self, func: Callable[..., Any], options: RemoteOptions):
        self.func = func
        self.options = options
        self.__name__ = getattr(func, "__name__", "parsl_app")

    def __repr__(self) -> str:
        return f"RemoteApp({self.__name__})"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        bundle = kwargs.pop(STAGING_KWARG, None)
        with contextlib.ExitStack() as stack:
            spec = _task_spec()
            if spec and any(spec.get(k) for k in _RANK_KEYS):
                stack.enter_context(_mpi_environment())
            directory = None
            if bundle is not None:  # files travel with the app: it runs in a directory of its own
                directory = stack.enter_context(_task_directory(self.options.working_dir))
                bundle.unpack(directory, kwargs)
                if threading.current_thread() is threading.main_thread():
                    stack.enter_context(_working_directory(directory))
            elif self.options.working_dir:
                stack.enter_context(_working_directory(self.options.working_dir))
            spool = stack.enter_context(collect_messages()) if self.options.monitoring else None
            value = self.func(*args, **kwargs)
            if bundle is not None:
                assert directory is not None
                value = bundle.collect(value, self.__name__, directory)  # before the directory goes
            return MonitoredResult(value, spool.read()) if spool is not None else value


def _task_spec() -> dict[str, Any] | None:
    from tether.runtime import current_task

    task = current_task()  # None outside an endpoint (a test calling the app by hand)
    return task.spec if task is not None else None


@contextlib.contextmanager
def _mpi_environment() -> Iterator[None]:
    """Put Parsl's MPI variables in ``os.environ`` for the duration of the app.

    Parsl's bash wrapper starts the command with the worker's environment, so this is where
    ``$PARSL_MPI_PREFIX`` must be. The variables of ``UNSET_FOR_MPI`` are dropped meanwhile.
    """
    from tether.mpi import UNSET_FOR_MPI, task_mpi_environment

    env = task_mpi_environment()  # an unsatisfiable spec fails the app here, in words
    shared = threading.current_thread() is not threading.main_thread()
    if shared:
        _ENVIRON_LOCK.acquire()
    saved = {name: os.environ.get(name) for name in [*env, *UNSET_FOR_MPI]}
    try:
        for name in UNSET_FOR_MPI:
            os.environ.pop(name, None)
        os.environ.update(env)
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if shared:
            _ENVIRON_LOCK.release()


class WorkingDirUnavailable(RuntimeError):
    """``working_dir`` was set, but the endpoint runs tasks in threads of one process."""


@contextlib.contextmanager
def _working_directory(path: str) -> Iterator[None]:
    """Run the app in ``path`` (created if missing), then go back.

    The current directory belongs to the whole process, so this needs an engine that gives each
    running task a process of its own (process, htex, mpi); on the thread engine it fails in words
    rather than moving every other task too.
    """
    if threading.current_thread() is not threading.main_thread():
        raise WorkingDirUnavailable(
            f"working_dir={path!r} needs an endpoint engine that runs each task in its own process "
            f"(process, htex or mpi); this endpoint runs tasks in threads of one process, where changing "
            f"directory would move every other task too. Use absolute paths instead, or another engine"
        )
    target = os.path.abspath(os.path.expanduser(path))
    os.makedirs(target, exist_ok=True)
    previous = os.getcwd()
    os.chdir(target)
    try:
        yield
    finally:
        os.chdir(previous)


@contextlib.contextmanager
def _task_directory(working_dir: str | None) -> Iterator[str]:
    """A fresh directory for one app try whose files travel through Tether, removed afterwards
    (its outputs have been mapped by then): ``<working_dir>/<task id>`` when the executor has a
    ``working_dir``, else the task's own sandbox (``tasks/<task id>`` of the endpoint)."""
    from tether.files import remove_tree
    from tether.runtime import current_task

    task = current_task()
    task_id = task.task_id if task is not None else uuid.uuid4().hex
    if working_dir:
        path = os.path.join(os.path.abspath(os.path.expanduser(working_dir)), task_id)
    elif task is not None and task.sandbox:
        path = os.path.abspath(task.sandbox)
    else:  # not on an endpoint (a test calling the app by hand)
        path = os.path.join(os.path.abspath(os.getcwd()), f"tether-{task_id}")
    os.makedirs(path, mode=0o700, exist_ok=True)
    try:
        yield path
    finally:
        remove_tree(path)
